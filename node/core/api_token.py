"""The per-home API token: every state-changing route of the API requires it (as Jupyter's token does), so that
nothing on this machine but the home's owner (the CLI reads it from MIRADOR_HOME) can make the node train, join,
pull or dial. Inference routes do not need it (local OpenAI clients keep working), unless `[api] token` is set."""

import secrets
from pathlib import Path

from node.core.fsutil import atomic_write_bytes
from node.core.identity_file import IdentityFileError, check_key_permissions

TOKEN_BYTES = 32


def load_or_create_token(path: Path) -> str:
    """The token stored at `path` (0600, the owner's only), created on first use."""
    if not path.exists():
        atomic_write_bytes(path, (secrets.token_urlsafe(TOKEN_BYTES) + "\n").encode(), mode=0o600)
    return read_token(path) or ""


def read_token(path: Path) -> str | None:
    """The token at `path`, None if there is none; IdentityFileError if others may read it."""
    if not path.exists():
        return None
    try:
        check_key_permissions(path)
    except IdentityFileError as exc:
        raise IdentityFileError(str(exc).replace("identity key", "API token")) from None
    return path.read_text().strip() or None
