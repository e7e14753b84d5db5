"""The Mirador node application: config, home, daemon, CLI, HTTP API, inference (and later P2P, training)."""

__version__ = "0.1.0"
