"""Tamper fuzz: 500 seeded random corruptions of a published artifact, each refused for the right reason, with the
installed state unchanged.

The store is the embedded one (a real block store on disk). Corruptions of stored blocks model a bad disk or a
lying peer; edits of the envelope model an attacker without the publisher's key; the publisher's own key signing
a lying manifest models a buggy or compromised publisher, which the file checks must still catch.
"""

import base64
import enum
import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from crypto.dsse import Envelope, Signature, pae
from crypto.identity import Identity
from crypto.statement import PAYLOAD_TYPE
from marketplace.artifacts import ArtifactRefused, Marketplace
from marketplace.content_store import EmbeddedStore
from marketplace.registry import Registry
from node.adapters.check import base_dims_of_file
from node.inference.models import embedded_model_path
from tests.lora_files import write_adapter

N_CASES = 500


class Corruption(enum.Enum):
    """What the fuzzer does to the artifact before the pull."""

    BLOCK_BYTE_FLIP = enum.auto()
    BLOCK_TRUNCATED = enum.auto()
    BLOCK_APPENDED = enum.auto()
    FIELD_EDITED = enum.auto()
    FILES_SWAPPED = enum.auto()
    FILES_SWAPPED_RESIGNED = enum.auto()
    SIZE_EDITED_RESIGNED = enum.auto()
    RESIGNED_UNTRUSTED = enum.auto()
    REPLAYED_OLDER = enum.auto()
    ENVELOPE_GARBAGE = enum.auto()


REASONS: dict[Corruption, tuple[str, ...]] = {
    Corruption.BLOCK_BYTE_FLIP: ("is corrupt",),
    Corruption.BLOCK_TRUNCATED: ("is corrupt",),
    Corruption.BLOCK_APPENDED: ("is corrupt",),
    Corruption.FIELD_EDITED: ("bad signature",),
    Corruption.FILES_SWAPPED: ("bad signature",),
    # a file larger than its signed size is refused at its root's declared size, before it is written
    Corruption.FILES_SWAPPED_RESIGNED: ("does not match the signed", "the manifest says", "bytes, more than the"),
    Corruption.SIZE_EDITED_RESIGNED: ("the manifest says", "bytes, more than the"),
    Corruption.RESIGNED_UNTRUSTED: ("is not trusted",),
    Corruption.REPLAYED_OLDER: ("rollback refused",),
    Corruption.ENVELOPE_GARBAGE: ("envelope", "JSON", "payload"),
}


@dataclass
class World:
    """A publisher's artifact in a shared embedded store, already installed on node B."""

    tmp: Path
    store: EmbeddedStore
    alice: Identity
    mallory: Identity
    b: Marketplace
    b_registry: Registry
    envelope: bytes  # 1.1.0, as published
    envelope_cid: str
    older_cid: str  # 1.0.0 by the same publisher
    blocks: list[Path]  # the block files of 1.1.0 (envelope and files)


def _block_files(store_folder: Path) -> set[Path]:
    return {p for p in store_folder.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    tmp = tmp_path_factory.mktemp("fuzz")
    store = EmbeddedStore(tmp / "blocks")
    alice, mallory = Identity.generate(), Identity.generate()
    src = tmp / "src"
    src.mkdir()
    write_adapter(src / "adapter.gguf", base_dims_of_file(embedded_model_path()), r=2)  # ~460 KB: 2 chunks
    (src / "adapter_config.json").write_text('{"r": 2, "lora_alpha": 4, "target_modules": ["q_proj", "v_proj"]}')
    (src / "notes.txt").write_text("trained on my notes\n" * 50)

    def publisher(name: str) -> Marketplace:
        return Marketplace(tmp / name / "artifacts", store, Registry(tmp / f"{name}.db"), alice)

    before = _block_files(tmp / "blocks") if (tmp / "blocks").exists() else set()
    new = publisher("a").publish(src, name="finance", version="1.1.0", kind="model", license="MIT")
    blocks = sorted(_block_files(tmp / "blocks") - before)
    old = publisher("a-old").publish(src, name="finance", version="1.0.0", kind="model", license="MIT")
    b_registry = Registry(tmp / "b.db")
    b_registry.trust(alice.fingerprint, alice.public_key_b64(), "alice")
    b = Marketplace(tmp / "b" / "artifacts", store, b_registry, Identity.generate())
    b.pull(new.envelope_cid)
    envelope = (new.folder / "envelope.json").read_bytes()
    return World(tmp, store, alice, mallory, b, b_registry, envelope, new.envelope_cid, old.envelope_cid, blocks)


def installed_state(w: World) -> dict[str, Any]:
    """Everything a refused pull must leave unchanged."""
    root = w.tmp / "b" / "artifacts"
    files = {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }
    return {
        "files": files,
        "artifacts": [(r.name, r.version, r.envelope_sha256) for r in w.b_registry.artifacts()],
        "highest": w.b_registry.highest_seen("finance", w.alice.fingerprint),
    }


def _payload(envelope: bytes) -> dict[str, Any]:
    return json.loads(base64.b64decode(json.loads(envelope)["payload"]))


def _envelope(payload: dict[str, Any], signer: Identity | None, keep_signatures_of: bytes | None = None) -> bytes:
    """Re-encode a statement; sign it with `signer`, or keep the original envelope's signatures (now invalid)."""
    raw = json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()
    if signer is not None:
        sigs: tuple[Signature, ...] = (Signature(signer.fingerprint, signer.sign(pae(PAYLOAD_TYPE, raw))),)
    else:
        original = json.loads(keep_signatures_of or b"{}")["signatures"]
        sigs = tuple(Signature(s["keyid"], base64.b64decode(s["sig"])) for s in original)
    return Envelope(PAYLOAD_TYPE, raw, sigs).to_json()


def _publish_envelope(w: World, envelope: bytes, rng: random.Random) -> str:
    path = w.tmp / f"env-{rng.getrandbits(32)}.json"
    path.write_bytes(envelope)
    return w.store.add(path, "v1-raw").cid


def _edit_field(manifest: dict[str, Any], rng: random.Random) -> None:
    field = rng.choice(["name", "version", "license", "description", "size", "sha256", "cid"])
    entry = rng.choice(manifest["files"])
    if field == "name":
        manifest["name"] = rng.choice(["finance2", "other", "finance-x"])
    elif field == "version":
        manifest["version"] = rng.choice(["9.9.9", "1.1.1", "2.0.0"])
    elif field in ("license", "description"):
        manifest[field] = manifest.get(field, "") + rng.choice(["x", " ", "!"])
    elif field == "size":
        entry["size"] += rng.choice([-1, 1, 1000])
    elif field == "sha256":
        entry["sha256"] = f"{rng.getrandbits(256):064x}"
    else:
        entry["cid"] = rng.choice([e["cid"] for e in manifest["files"] if e["cid"] != entry["cid"]])


def corrupt(w: World, kind: Corruption, rng: random.Random) -> tuple[str, list[tuple[Path, bytes]]]:
    """Apply one corruption; returns the CID to pull and the block files to restore afterwards."""
    if kind in (Corruption.BLOCK_BYTE_FLIP, Corruption.BLOCK_TRUNCATED, Corruption.BLOCK_APPENDED):
        block = rng.choice(w.blocks)
        original = block.read_bytes()
        data = bytearray(original)
        if kind is Corruption.BLOCK_BYTE_FLIP:
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        elif kind is Corruption.BLOCK_TRUNCATED:
            del data[rng.randrange(len(data)) :]
        else:
            data += rng.randbytes(rng.randint(1, 64))
        block.write_bytes(bytes(data))
        return w.envelope_cid, [(block, original)]
    payload = _payload(w.envelope)
    files = payload["predicate"]["files"]
    if kind is Corruption.FIELD_EDITED:
        _edit_field(payload["predicate"], rng)
        return _publish_envelope(w, _envelope(payload, None, w.envelope), rng), []
    if kind in (Corruption.FILES_SWAPPED, Corruption.FILES_SWAPPED_RESIGNED):
        i, j = rng.sample(range(len(files)), 2)
        files[i]["cid"], files[j]["cid"] = files[j]["cid"], files[i]["cid"]
        signer = w.alice if kind is Corruption.FILES_SWAPPED_RESIGNED else None
        return _publish_envelope(w, _envelope(payload, signer, w.envelope), rng), []
    if kind is Corruption.SIZE_EDITED_RESIGNED:
        rng.choice(files)["size"] += rng.choice([-1, 1, 4096])
        return _publish_envelope(w, _envelope(payload, w.alice), rng), []
    if kind is Corruption.RESIGNED_UNTRUSTED:
        if rng.random() < 0.5:
            _edit_field(payload["predicate"], rng)
        key = w.mallory.public_key
        payload["predicate"]["publisher"] = {"key": key.to_b64(), "fingerprint": key.fingerprint}
        return _publish_envelope(w, _envelope(payload, w.mallory), rng), []
    if kind is Corruption.REPLAYED_OLDER:
        return w.older_cid, []
    garbage = rng.choice([rng.randbytes(rng.randint(1, 300)), b"{}", b'{"payloadType": 1}', w.envelope[:-7]])
    return _publish_envelope(w, garbage, rng), []


def test_every_seeded_corruption_is_refused_with_its_reason_and_nothing_changes(world: World) -> None:
    # Arrange: re-encoding an untouched statement gives the very bytes that were signed (so every edit below is
    # the only change the verifier sees)
    assert _envelope(_payload(world.envelope), None, world.envelope) == world.envelope
    before = installed_state(world)
    seen: dict[Corruption, int] = {}
    kinds = list(Corruption)
    # Act / Assert, case by case
    for seed in range(N_CASES):
        rng = random.Random(seed)
        kind = kinds[seed % len(kinds)] if seed < len(kinds) else rng.choice(kinds)
        target, restore = corrupt(world, kind, rng)
        try:
            with pytest.raises(ArtifactRefused) as refused:
                world.b.pull(target)
        finally:
            for path, data in restore:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(data)  # the store removed the corrupt block: put the good one back
        reason = refused.value.detail
        assert any(r in reason for r in REASONS[kind]), f"seed {seed}, {kind.name}: {reason}"
        assert installed_state(world) == before, f"seed {seed}, {kind.name} changed the installed state"
        seen[kind] = seen.get(kind, 0) + 1
    # every kind was exercised many times, and the good artifact still pulls and verifies
    assert set(seen) == set(Corruption) and min(seen.values()) >= 20, seen
    assert world.b.pull(world.envelope_cid).envelope_cid == world.envelope_cid
    assert not list((world.tmp / "b" / "artifacts" / ".staging").iterdir())
