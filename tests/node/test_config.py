"""node.toml validation, environment overrides and energy profiles."""

import re

import pytest

from node.core.config import ConfigError, parse_config
from node.core.profiles import PROFILES_DIR, effective_settings, load_profile, resolve_threads


def test_defaults_bind_loopback() -> None:
    cfg = parse_config("", "node.toml", environ={})
    assert cfg.api.host == "127.0.0.1"
    assert cfg.node.profile == "balanced"


def test_shipped_node_toml_is_valid() -> None:
    cfg = parse_config((PROFILES_DIR.parent / "node.toml").read_text(), "configs/node.toml", environ={})
    assert cfg.api.port == 8484


def test_env_overrides_file_values() -> None:
    cfg = parse_config(
        "[api]\nport = 9000\n",
        "node.toml",
        environ={"MIRADOR_API_PORT": "9100", "MIRADOR_PROFILE": "battery", "MIRADOR_INFERENCE_SLOTS": "3"},
    )
    assert cfg.api.port == 9100
    assert cfg.node.profile == "battery"
    assert cfg.inference.slots == 3


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({"MIRADOR_API_PORT": "eighty"}, "MIRADOR_API_PORT='eighty'"),
        ({"MIRADOR_API_PORT": "0"}, "MIRADOR_API_PORT='0' is invalid for api.port"),
        ({"MIRADOR_NODE_PROFILE": "turbo"}, "MIRADOR_NODE_PROFILE='turbo'"),
    ],
)
def test_bad_env_values_name_the_variable_or_key(environ: dict[str, str], expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config("", "node.toml", environ=environ)
    assert expected in str(info.value)


def test_non_loopback_without_token_is_refused_and_with_token_accepted() -> None:
    with pytest.raises(ConfigError, match=r"api\.token must be set"):
        parse_config('[api]\nhost = "192.0.2.7"\n', "node.toml", environ={})
    cfg = parse_config('[api]\nhost = "192.0.2.7"\ntoken = "t"\n', "node.toml", environ={})
    assert cfg.api.token == "t"


def test_missing_model_file_is_named() -> None:
    with pytest.raises(ConfigError, match=re.escape("model.path = '/nope/model.gguf' is not a file")):
        parse_config('[model]\npath = "/nope/model.gguf"\n', "node.toml", environ={})


@pytest.mark.parametrize("name", ["battery", "balanced", "performance"])
def test_every_shipped_profile_loads(name: str) -> None:
    assert load_profile(name).n_ctx >= 1024


def test_profile_then_inference_overrides() -> None:
    cfg = parse_config("[inference]\nn_ctx = 512\n", "node.toml", environ={})
    s = effective_settings(cfg, "battery")
    assert (s.profile, s.n_ctx, s.slots, s.threads) == ("battery", 512, 1, 1)


def test_unknown_profile_lists_the_known_ones() -> None:
    with pytest.raises(ConfigError, match="known profiles: balanced, battery, performance"):
        load_profile("turbo")


def test_threads_zero_means_all_cores_and_others_are_capped() -> None:
    assert resolve_threads(0, cpu_count=8) == 8
    assert resolve_threads(4, cpu_count=2) == 2
    assert resolve_threads(1, cpu_count=2) == 1


@pytest.mark.parametrize(
    ("servers", "words"),
    [
        ('[[tools.mcp]]\nname = "a"\n', "exactly one of command or url"),
        ('[[tools.mcp]]\nname = "a"\ncommand = ["x"]\nurl = "http://127.0.0.1:1/mcp"\n', "exactly one"),
        ('[[tools.mcp]]\nname = "a"\ncommand = ["x"]\n[[tools.mcp]]\nname = "a"\ncommand = ["y"]\n', "two servers"),
        ('[[tools.mcp]]\nname = "Bad Name"\ncommand = ["x"]\n', "name"),
    ],
)
def test_mcp_servers_in_the_config_are_checked(servers: str, words: str) -> None:
    # Act / Assert
    with pytest.raises(ConfigError, match=words):
        parse_config(servers, "node.toml", environ={})
