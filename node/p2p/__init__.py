"""The node's P2P layer on py-libp2p: the host (Noise, Yamux, TCP, DHT, gossipsub) and framed direct streams."""
