"""Manifest schema, semantic versions and chain files: valid ones parse, bad ones are refused by name."""

from typing import Any

import pytest

from marketplace.chain import ChainError, parse_chain, render
from marketplace.manifest import ManifestError, check_against_subjects, parse_manifest
from marketplace.semver import SemVer, VersionError

SHA = "ab" * 32


def manifest(**changes: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "schema": "mirador.manifest/v1",
        "kind": "adapter",
        "name": "finance",
        "version": "1.2.0",
        "files": [{"name": "adapter.gguf", "size": 10, "sha256": SHA, "cid": "bafkqaaa", "chunking": "v1-raw"}],
        "license": "Apache-2.0",
        "adapter": {
            "base_sha256": SHA,
            "base_name": "smollm2",
            "lora": {"rank": 8, "alpha": 16.0, "targets": ["q_proj", "v_proj"]},
        },
        "benchmarks": {"heldout_loss": 2.1},
    }
    return base | changes


def test_a_valid_manifest_parses() -> None:
    m = parse_manifest(manifest())
    assert (m.kind, m.name, m.semver) == ("adapter", "finance", SemVer(1, 2, 0))
    assert parse_manifest(m.to_dict()) == m


@pytest.mark.parametrize(
    ("changes", "needle"),
    [
        ({"version": "1.2"}, "not a semantic version"),
        ({"kind": "dataset"}, "kind"),
        ({"name": "../etc"}, "name"),
        ({"extra": 1}, "extra"),
        ({"adapter": None}, "required for adapters"),
        ({"kind": "model"}, "only them"),
        ({"files": []}, "files"),
        (
            {"files": [{"name": "../x.gguf", "size": 1, "sha256": SHA, "cid": "bafk", "chunking": "v1"}]},
            "plain relative",
        ),
        (
            {"files": [{"name": "/etc/passwd", "size": 1, "sha256": SHA, "cid": "bafk", "chunking": "v1"}]},
            "plain relative",
        ),
        ({"files": [{"name": "model.bin", "size": 1, "sha256": SHA, "cid": "bafk", "chunking": "v1"}]}, "pickle"),
        ({"files": [{"name": "model.ckpt", "size": 1, "sha256": SHA, "cid": "bafk", "chunking": "v1"}]}, "pickle"),
        ({"files": [{"name": "a.gguf", "size": 1, "sha256": "XY", "cid": "bafk", "chunking": "v1"}]}, "sha256"),
        ({"files": [{"name": "a.gguf", "size": -1, "sha256": SHA, "cid": "bafk", "chunking": "v1"}]}, "size"),
    ],
)
def test_bad_manifests_are_refused_naming_the_field(changes: dict[str, Any], needle: str) -> None:
    with pytest.raises(ManifestError, match=needle):
        parse_manifest(manifest(**changes))


def test_files_must_match_the_signed_subjects() -> None:
    m = parse_manifest(manifest())
    check_against_subjects(m, {"adapter.gguf": SHA})
    with pytest.raises(ManifestError, match="digests differ"):
        check_against_subjects(m, {"adapter.gguf": "cd" * 32})
    with pytest.raises(ManifestError, match="extra"):
        check_against_subjects(m, {"adapter.gguf": SHA, "other.gguf": SHA})


def test_semver_precedence_follows_the_spec() -> None:
    ordered = [
        "1.0.0-alpha",
        "1.0.0-alpha.1",
        "1.0.0-alpha.beta",
        "1.0.0-beta",
        "1.0.0-beta.2",
        "1.0.0-beta.11",
        "1.0.0-rc.1",
        "1.0.0",
        "1.0.1",
        "1.10.0",
        "2.0.0",
    ]
    parsed = [SemVer.parse(v) for v in ordered]
    assert sorted(reversed(parsed)) == parsed
    assert SemVer.parse("1.0.0+build.5") == SemVer.parse("1.0.0")
    with pytest.raises(VersionError):
        SemVer.parse("01.0.0")


CHAIN = """
name: brief-then-translate
version: 1.0.0
steps:
  - personality: financial_expert
    prompt: "Summarize: {input}"
  - model: translator@1.2.0
    prompt: "Translate into French: {previous}"
"""


def test_a_chain_parses_and_renders() -> None:
    chain = parse_chain(CHAIN, "c.yaml")
    assert chain.references() == [("translator", "1.2.0")]
    assert render(chain.steps[1], "x", "Short.") == "Translate into French: Short."


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        (CHAIN.replace("{previous}", "{other}"), "only {input} and {previous}"),
        (CHAIN.replace("{input}", "{previous}"), "first step has no {previous}"),
        (CHAIN.replace("translator@1.2.0", "translator"), "name@version"),
        (CHAIN.replace("personality: financial_expert", "model: a@1.0.0\n    personality: b"), "exactly one"),
        (CHAIN.replace("version: 1.0.0", "version: one"), "version"),
        ("name: x\nversion: 1.0.0\nsteps: []\n", "steps"),
        ("name: [unclosed", "not valid YAML"),
        ("!!python/object/apply:os.system ['true']", "not valid YAML"),
    ],
)
def test_bad_chains_are_refused(text: str, needle: str) -> None:
    with pytest.raises(ChainError, match=needle):
        parse_chain(text, "c.yaml")
