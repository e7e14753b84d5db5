"""Install a pulled adapter into the adapter store when it was made for the model this node serves."""

from typing import Any

from node.core.home import NodeHome


class InstallRefused(Exception):
    """The pulled adapter stays in artifacts/ and is not served; the message says why."""


def install_pulled_adapter(home: NodeHome, done: Any) -> str:
    """Install `done` (marketplace.artifacts.Installed, kind adapter) and return a line saying how to use it."""
    from node.adapters.check import AdapterRejected
    from node.adapters.store import EXTRA_FILES
    from node.cli.adapter import open_store
    from node.core.config import load_config
    from node.inference.models import resolve_model
    from node.training.base_model import file_digest

    manifest = done.manifest
    _, gguf = resolve_model(load_config(home.config_file).model)
    if manifest.adapter.base_sha256 != file_digest(gguf):
        raise InstallRefused(
            f"{manifest.name}@{manifest.version} was trained for {manifest.adapter.base_name} "
            f"(sha256 {manifest.adapter.base_sha256[:16]}...), not the model this node serves ({gguf.name}); "
            f"it stays in {done.folder} but is not installed as an adapter"
        )
    ggufs = [f.name for f in manifest.files if f.name.endswith(".gguf")]
    if len(ggufs) != 1:
        raise InstallRefused(
            f"{manifest.name}@{manifest.version} has {len(ggufs)} GGUF files; an adapter needs exactly one"
        )
    extras = [done.folder / f.name for f in manifest.files if f.name in EXTRA_FILES]
    try:
        installed = open_store(home).install(manifest.name, done.folder / ggufs[0], extras)
    except AdapterRejected as exc:
        raise InstallRefused(f"the pulled adapter is refused: {exc}") from None
    return f"installed as adapter {installed.key}: use model 'base:{manifest.name}' or name it in personalities.toml"
