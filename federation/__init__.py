"""Federated rounds, membership, aggregation strategies and privacy modes (built in a later issue).

Imports only `crypto`; what it needs from the outside (transport, DHT, trainer) it declares as Protocols.
"""
