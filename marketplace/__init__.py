"""Signed manifests, content store, registry records, trust policy and audit log (built in a later issue).

Imports only `crypto`; what it needs from the outside (DHT, content exchange) it declares as Protocols.
"""
