"""The node's side of federated learning: join and rounds (service), wire, state, adapters, DHT descriptors, Flower."""
