"""Cryptographic primitives of Mirador: identity keys, signatures (and later HE, DP, masks).

This package is the leaf of the dependency graph: it imports no other project package.
"""
