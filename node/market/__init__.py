"""The node's network marketplace: announce, search and pull over the DHT, block exchange, installs, publish figures."""
