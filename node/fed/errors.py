"""The node's federation error: a federation command that cannot be done."""


class FederationError(Exception):
    """A federation command that cannot be done; the message says why."""
