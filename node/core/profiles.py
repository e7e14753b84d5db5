"""Energy profiles (`configs/profiles/*.toml`) and the effective inference settings they yield."""

import os
import tomllib
from pathlib import Path
from typing import Annotated, Literal

import msgspec

from node.core.config import ConfigError, InferenceSection, NodeConfig

PROFILES_DIR = Path(__file__).resolve().parents[2] / "configs" / "profiles"


class Profile(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, frozen=True):
    """One energy profile; every inference setting is required."""

    description: str
    threads: Annotated[int, msgspec.Meta(ge=0)]
    n_ctx: Annotated[int, msgspec.Meta(ge=128)]
    max_tokens: Annotated[int, msgspec.Meta(ge=1)]
    batch_size: Annotated[int, msgspec.Meta(ge=1)]
    slots: Annotated[int, msgspec.Meta(ge=1, le=64)]
    adapter_cache_mb: Annotated[int, msgspec.Meta(ge=1)]
    memory_tokens: Annotated[int, msgspec.Meta(ge=0)]


class InferenceSettings(msgspec.Struct, frozen=True, kw_only=True):
    """What the engine runs with: the profile, overridden by `[inference]`, threads resolved to a count."""

    profile: str
    threads: int
    n_ctx: int
    max_tokens: int
    batch_size: int
    slots: int
    adapter_cache_mb: int
    memory_tokens: int = 0
    extra_buffers: Literal["auto", "on", "off"] = "auto"


def load_profile(name: str, folder: Path = PROFILES_DIR) -> Profile:
    """Read and validate `folder/name.toml`."""
    path = folder / f"{name}.toml"
    if not path.is_file():
        known = sorted(p.stem for p in folder.glob("*.toml"))
        raise ConfigError(f"unknown profile {name!r}; known profiles: {', '.join(known)} (in {folder})")
    try:
        return msgspec.convert(tomllib.loads(path.read_text(encoding="utf-8")), Profile)
    except (tomllib.TOMLDecodeError, msgspec.ValidationError) as exc:
        raise ConfigError(f"{path}: {exc}") from None


def resolve_threads(requested: int, cpu_count: int | None = None) -> int:
    """0 means every core; any other value is capped at the number of cores."""
    cores = cpu_count or os.cpu_count() or 1
    return cores if requested == 0 else min(requested, cores)


def effective_settings(cfg: NodeConfig, profile_override: str | None = None) -> InferenceSettings:
    """Merge the chosen profile with the `[inference]` overrides of `cfg`."""
    name = profile_override or cfg.node.profile
    base = msgspec.structs.asdict(load_profile(name))
    base.pop("description")
    overrides = {
        key: value for key in InferenceSection.__struct_fields__ if (value := getattr(cfg.inference, key)) is not None
    }
    merged = base | overrides
    merged["threads"] = resolve_threads(merged["threads"])
    return InferenceSettings(profile=name, **merged)
