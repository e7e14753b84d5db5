"""Federated rounds, membership, aggregation strategies and privacy modes.

Imports `crypto` and `marketplace` (names, CIDs), never `node`; what it needs from the outside (transport, DHT,
trainer) it declares as Protocols.
"""
