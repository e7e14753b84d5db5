"""The HTTP API: shared helpers (common), the app with the OpenAI and node routes, federation and market routes."""
