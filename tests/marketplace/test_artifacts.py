"""Publish and pull signed artifacts through the embedded content store; every refusal leaves nothing behind."""

import base64
import enum
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from crypto.dsse import Envelope, Signature
from crypto.identity import Identity
from crypto.statement import build_statement, sign_statement
from marketplace.artifacts import ENVELOPE_FILE, ArtifactRefused, Marketplace
from marketplace.content_store import EmbeddedStore
from marketplace.manifest import AdapterInfo, LoraInfo
from marketplace.registry import Registry
from node.adapters.check import base_dims_of_file
from node.inference.models import embedded_model_path
from tests.lora_files import write_adapter

ADAPTER_INFO = AdapterInfo("ab" * 32, "smollm2-135m-instruct", LoraInfo(8, 16.0, ["q_proj", "v_proj"]))


@dataclass
class Node:
    """One node's marketplace: its own registry and artifacts folder; the content store is shared."""

    market: Marketplace
    registry: Registry
    root: Path


@pytest.fixture
def store(tmp_path: Path) -> EmbeddedStore:
    return EmbeddedStore(tmp_path / "blocks")


def make_node(tmp_path: Path, name: str, store: EmbeddedStore, identity: Identity) -> Node:
    registry = Registry(tmp_path / f"{name}.db")
    root = tmp_path / name / "artifacts"
    return Node(Marketplace(root, store, registry, identity), registry, root)


@pytest.fixture
def alice() -> Identity:
    return Identity.generate()


@pytest.fixture
def adapter_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "src"
    folder.mkdir()
    write_adapter(folder / "adapter.gguf", base_dims_of_file(embedded_model_path()), r=4)
    (folder / "adapter_config.json").write_text('{"r": 4}')
    return folder


def publish(node: Node, folder: Path, version: str = "1.0.0") -> str:
    return node.market.publish(
        folder, name="finance", version=version, kind="adapter", license="Apache-2.0", adapter=ADAPTER_INFO
    ).envelope_cid


def test_publish_then_pull_on_another_node(
    tmp_path: Path, store: EmbeddedStore, alice: Identity, adapter_folder: Path
) -> None:
    # Arrange
    a = make_node(tmp_path, "a", store, alice)
    b = make_node(tmp_path, "b", store, Identity.generate())
    cid = publish(a, adapter_folder)
    b.registry.trust(alice.fingerprint, alice.public_key_b64(), "alice")
    progress: list[tuple[str, int, int]] = []
    # Act
    pulled = b.market.pull(cid, progress=lambda n, d, t: progress.append((n, d, t)))
    verified = b.market.verify("finance")
    # Assert
    assert pulled.folder == b.root / "finance" / "1.0.0" and pulled.publisher_trusted
    assert (pulled.folder / "adapter.gguf").read_bytes() == (adapter_folder / "adapter.gguf").read_bytes()
    assert (pulled.folder / ENVELOPE_FILE).is_file() and verified.manifest.version == "1.0.0"
    assert progress and progress[-1][1] == progress[-1][2]
    assert b.market.pull("finance@1.0.0").envelope_cid == cid  # known by name now
    actions = [(e.action, e.result) for e in b.registry.audit_log()]
    assert ("pull", "ok") in actions and ("verify", "ok") in actions


class Fault(enum.Enum):
    """Ways a pulled artifact can be bad."""

    UNSIGNED = enum.auto()
    BAD_SIGNATURE = enum.auto()
    UNTRUSTED = enum.auto()
    NO_TRUST_AT_ALL = enum.auto()
    DIGEST_MISMATCH = enum.auto()
    CID_POINTS_ELSEWHERE = enum.auto()
    TRAVERSAL = enum.auto()
    PICKLE = enum.auto()
    BAD_GGUF_HEADER = enum.auto()
    RESERVED_NAME = enum.auto()
    ROLLBACK = enum.auto()


REASON = {
    Fault.UNSIGNED: "unsigned (no signatures)",
    Fault.BAD_SIGNATURE: "bad signature",
    Fault.UNTRUSTED: "is not trusted",
    Fault.NO_TRUST_AT_ALL: "no publisher is trusted",
    Fault.DIGEST_MISMATCH: "does not match the signed",
    Fault.CID_POINTS_ELSEWHERE: "does not match the signed",
    Fault.TRAVERSAL: "not a plain relative path",
    Fault.PICKLE: "pickle format",
    Fault.BAD_GGUF_HEADER: "GGUF header does not parse",
    Fault.RESERVED_NAME: "reserved name",
    Fault.ROLLBACK: "rollback refused",
}


def craft(
    store: EmbeddedStore,
    tmp_path: Path,
    identity: Identity,
    files: dict[str, bytes],
    *,
    version: str = "1.0.0",
    digest_of: Callable[[str, bytes], str] | None = None,
    cid_of: Callable[[str, str], str] | None = None,
) -> bytes:
    """A signed envelope for `files`, built by hand so that it can lie; the files go into the store."""
    import hashlib

    entries, digests = [], {}
    for name, data in files.items():
        path = tmp_path / f"craft-{len(entries)}"
        path.write_bytes(data)
        cid = store.add(path, "v1-raw").cid
        sha = hashlib.sha256(data).hexdigest()
        digests[name] = digest_of(name, sha) if digest_of else sha
        entries.append(
            {
                "name": name,
                "size": len(data),
                "sha256": digests[name],
                "cid": cid_of(name, cid) if cid_of else cid,
                "chunking": "v1-raw",
            }
        )
    manifest: dict[str, Any] = {
        "schema": "mirador.manifest/v1",
        "kind": "model",
        "name": "finance",
        "version": version,
        "files": entries,
        "license": "MIT",
    }
    statement = build_statement(digests, manifest, identity.public_key)
    return sign_statement(identity, statement).to_json()


def put_envelope(store: EmbeddedStore, tmp_path: Path, envelope: bytes) -> str:
    path = tmp_path / "envelope.json"
    path.write_bytes(envelope)
    return store.add(path, "v1-raw").cid


GOOD = {"notes.txt": b"good content\n"}


def faulty_envelope(fault: Fault, store: EmbeddedStore, tmp_path: Path, alice: Identity) -> bytes:
    if fault is Fault.UNSIGNED:
        env = json.loads(craft(store, tmp_path, alice, GOOD))
        env["signatures"] = []
        return json.dumps(env).encode()
    if fault is Fault.BAD_SIGNATURE:
        raw = json.loads(craft(store, tmp_path, alice, GOOD))
        sig = bytearray(base64.b64decode(raw["signatures"][0]["sig"]))
        sig[0] ^= 1
        raw["signatures"][0]["sig"] = base64.b64encode(bytes(sig)).decode()
        return json.dumps(raw).encode()
    if fault is Fault.UNTRUSTED:
        return craft(store, tmp_path, Identity.generate(), GOOD)
    if fault is Fault.DIGEST_MISMATCH:
        return craft(store, tmp_path, alice, GOOD, digest_of=lambda n, s: "0" * 64)
    if fault is Fault.CID_POINTS_ELSEWHERE:
        other = tmp_path / "other.txt"
        other.write_bytes(b"evil content\n")  # same size: only the digest can tell
        elsewhere = store.add(other, "v1-raw").cid
        return craft(store, tmp_path, alice, GOOD, cid_of=lambda n, c: elsewhere)
    if fault is Fault.TRAVERSAL:
        return craft(store, tmp_path, alice, {"../evil.txt": b"x"})
    if fault is Fault.PICKLE:
        return craft(store, tmp_path, alice, {"model.bin": b"\x80\x04pickle"})
    if fault is Fault.BAD_GGUF_HEADER:
        return craft(store, tmp_path, alice, {"model.gguf": b"GGUF\x03\x00\x00\x00garbage"})
    if fault is Fault.RESERVED_NAME:  # installing it would overwrite the envelope kept next to the files
        return craft(store, tmp_path, alice, {"notes.txt": b"notes\n", ENVELOPE_FILE: b'{"a": 1}'})
    raise AssertionError(fault)


@pytest.mark.parametrize("fault", [f for f in Fault if f not in (Fault.ROLLBACK, Fault.NO_TRUST_AT_ALL)])
def test_a_bad_artifact_is_refused_and_nothing_is_installed(
    tmp_path: Path, store: EmbeddedStore, alice: Identity, fault: Fault
) -> None:
    # Arrange
    b = make_node(tmp_path, "b", store, Identity.generate())
    b.registry.trust(alice.fingerprint, alice.public_key_b64(), "alice")
    try:
        envelope = faulty_envelope(fault, store, tmp_path, alice)
    except ValueError as exc:  # the signer's own library already refuses to build it
        assert fault in (Fault.TRAVERSAL,), exc
        envelope = _sign_unchecked(alice, {"../evil.txt": "ab" * 32})
    cid = put_envelope(store, tmp_path, envelope)
    # Act
    with pytest.raises(ArtifactRefused) as refused:
        b.market.pull(cid)
    # Assert
    assert REASON[fault] in refused.value.detail
    assert not (b.root / "finance").exists()
    assert b.registry.audit_log()[-1].result == "refused"
    assert not [p for p in (b.root / ".staging").iterdir()]


def _sign_unchecked(identity: Identity, digests: dict[str, str]) -> bytes:
    """An in-toto statement built without the library's name checks (a hostile publisher's)."""
    from crypto.dsse import pae
    from crypto.statement import PAYLOAD_TYPE

    statement = {
        "_type": "https://in-toto.io/Statement/v1",
        "subject": [{"name": n, "digest": {"sha256": d}} for n, d in digests.items()],
        "predicateType": "https://mirador.dev/manifest/v1",
        "predicate": {
            "name": "finance",
            "publisher": {"key": identity.public_key_b64(), "fingerprint": identity.fingerprint},
        },
    }
    payload = json.dumps(statement).encode()
    sig = identity.sign(pae(PAYLOAD_TYPE, payload))
    return Envelope(PAYLOAD_TYPE, payload, (Signature(identity.fingerprint, sig),)).to_json()


def test_no_trusted_publisher_refuses_unless_explicitly_allowed(
    tmp_path: Path, store: EmbeddedStore, alice: Identity, adapter_folder: Path
) -> None:
    # Arrange: b trusts only itself; c has no identity and trusts nobody
    a = make_node(tmp_path, "a", store, alice)
    b = make_node(tmp_path, "b", store, Identity.generate())
    c = Marketplace(tmp_path / "c", store, Registry(tmp_path / "c.db"))
    cid = publish(a, adapter_folder)
    # Act / Assert
    with pytest.raises(ArtifactRefused, match=REASON[Fault.UNTRUSTED]):
        b.market.pull(cid)
    with pytest.raises(ArtifactRefused, match=REASON[Fault.NO_TRUST_AT_ALL]):
        c.pull(cid)
    pulled = b.market.pull(cid, trust_publisher=True)
    assert pulled.publisher_trusted is False and (pulled.folder / "adapter.gguf").is_file()
    assert "untrusted, allowed" in b.registry.audit_log()[-1].detail


def test_rollback_is_refused_and_the_installed_version_stays(
    tmp_path: Path, store: EmbeddedStore, alice: Identity, adapter_folder: Path
) -> None:
    # Arrange: alice publishes 1.1.0 and (later, from an older checkout) 1.0.0 with another key's node
    a = make_node(tmp_path, "a", store, alice)
    new = publish(a, adapter_folder, "1.1.0")
    old_node = make_node(tmp_path, "a-old", store, alice)  # a fresh registry signs an older version
    old = publish(old_node, adapter_folder, "1.0.0")
    b = make_node(tmp_path, "b", store, Identity.generate())
    b.registry.trust(alice.fingerprint, alice.public_key_b64(), "alice")
    b.market.pull(new)
    # Act
    with pytest.raises(ArtifactRefused, match=REASON[Fault.ROLLBACK]):
        b.market.pull(old)
    # Assert
    assert sorted(p.name for p in (b.root / "finance").iterdir()) == ["1.1.0"]


def test_publish_refuses_pickles_and_unparseable_headers(tmp_path: Path, store: EmbeddedStore, alice: Identity) -> None:
    a = make_node(tmp_path, "a", store, alice)
    bad_pickle = tmp_path / "model.pt"
    bad_pickle.write_bytes(b"\x80\x04")
    bad_gguf = tmp_path / "model.gguf"
    bad_gguf.write_bytes(b"GGUF\x03\x00")
    bad_st = tmp_path / "model.safetensors"
    bad_st.write_bytes((10**9).to_bytes(8, "little") + b"{}")
    for path, needle in ((bad_pickle, "pickle"), (bad_gguf, "GGUF"), (bad_st, "safetensors")):
        with pytest.raises(ArtifactRefused, match=needle):
            a.market.publish(path, name="m", version="1.0.0", kind="model", license="MIT")
    assert not (a.root / "m").exists()
    assert [e.result for e in a.registry.audit_log()] == ["refused"] * 3


def test_pulling_a_chain_pulls_what_it_references(
    tmp_path: Path, store: EmbeddedStore, alice: Identity, adapter_folder: Path
) -> None:
    # Arrange: alice publishes an adapter and a chain that uses it
    from marketplace.chain import load_chain
    from marketplace.manifest import ArtifactRef

    a = make_node(tmp_path, "a", store, alice)
    publish(a, adapter_folder)
    record = a.registry.find("finance", "1.0.0")
    assert record is not None
    chain_file = tmp_path / "chain.yaml"
    chain_file.write_text(
        "name: brief\nversion: 0.1.0\nsteps:\n  - model: finance@1.0.0\n    prompt: 'Summarize: {input}'\n"
    )
    chain = load_chain(chain_file)
    refs = [ArtifactRef(n, v, record.root_cid, record.envelope_sha256) for n, v in chain.references()]
    cid = a.market.publish(chain_file, name="brief", version="0.1.0", kind="chain", license="MIT", references=refs)
    b = make_node(tmp_path, "b", store, Identity.generate())
    b.registry.trust(alice.fingerprint, alice.public_key_b64(), "alice")
    # Act
    b.market.pull(cid.envelope_cid)
    # Assert
    assert (b.root / "brief" / "0.1.0" / "chain.yaml").is_file()
    assert (b.root / "finance" / "1.0.0" / "adapter.gguf").is_file()
    assert sorted(r.kind for r in b.registry.artifacts()) == ["adapter", "chain"]


def publish_chain(node: Node, tmp_path: Path, name: str, refs: list[Any]) -> str:
    """Publish a chain `name` 1.0.0 using `refs` (marketplace.manifest.ArtifactRef); its envelope CID."""
    chain_file = tmp_path / f"{name}.yaml"
    chain_file.write_text(f"name: {name}\nversion: 1.0.0\nsteps:\n  - model: base\n    prompt: '{{input}}'\n")
    return node.market.publish(
        chain_file, name=name, version="1.0.0", kind="chain", license="MIT", references=refs
    ).envelope_cid


def test_a_chain_pulls_each_artifact_once_however_often_it_is_referenced(
    tmp_path: Path, store: EmbeddedStore, alice: Identity, adapter_folder: Path
) -> None:
    # Arrange: chain level k references level k-1 twice, six levels over one adapter (2^7 - 1 = 127 pulls before)
    from marketplace.manifest import ArtifactRef

    a = make_node(tmp_path, "a", store, alice)
    publish(a, adapter_folder)
    record = a.registry.find("finance", "1.0.0")
    assert record is not None
    ref = ArtifactRef("finance", "1.0.0", record.root_cid, record.envelope_sha256)
    for level in range(1, 7):
        name = f"level{level}"
        cid = publish_chain(a, tmp_path, name, [ref, ref])
        chain = a.registry.find(name, "1.0.0")
        assert chain is not None and chain.root_cid == cid
        ref = ArtifactRef(name, "1.0.0", cid, chain.envelope_sha256)
    b = make_node(tmp_path, "b", store, Identity.generate())
    b.registry.trust(alice.fingerprint, alice.public_key_b64(), "alice")

    # Act
    b.market.pull(ref.envelope_cid)

    # Assert
    pulls = [e for e in b.registry.audit_log(1000) if e.action == "pull" and e.result == "ok"]
    assert len(pulls) == 7, [e.artifact for e in pulls]
    assert sorted(r.name for r in b.registry.artifacts()) == ["finance", *(f"level{k}" for k in range(1, 7))]


@pytest.mark.parametrize("lie", ["sha256", "name", "version"])
def test_a_chain_reference_must_name_exactly_what_was_pulled(
    tmp_path: Path, store: EmbeddedStore, alice: Identity, adapter_folder: Path, lie: str
) -> None:
    # Arrange: a signed chain whose reference points at the adapter's envelope but says something else about it
    from marketplace.manifest import ArtifactRef

    a = make_node(tmp_path, "a", store, alice)
    publish(a, adapter_folder)
    record = a.registry.find("finance", "1.0.0")
    assert record is not None
    fields = {"name": "finance", "version": "1.0.0", "sha256": record.envelope_sha256}
    fields |= {"sha256": "0" * 64} if lie == "sha256" else {lie: {"name": "payroll", "version": "9.9.9"}[lie]}
    cid = publish_chain(
        a, tmp_path, "brief", [ArtifactRef(fields["name"], fields["version"], record.root_cid, fields["sha256"])]
    )
    b = make_node(tmp_path, "b", store, Identity.generate())
    b.registry.trust(alice.fingerprint, alice.public_key_b64(), "alice")

    # Act
    with pytest.raises(ArtifactRefused) as refused:
        b.market.pull(cid)

    # Assert
    assert refused.value.reason == ("name_mismatch" if lie == "name" else "reference_mismatch"), refused.value
    assert b.registry.artifacts() == [], "neither the chain nor what it wrongly references was installed"


def test_a_dag_bomb_is_refused_before_it_is_written(tmp_path: Path, store: EmbeddedStore, alice: Identity) -> None:
    # Arrange: an "envelope" and a signed file entry whose CIDs are DAGs linking one 256 KiB block 174 times
    from marketplace.cid import DAG_PB, RAW, Cid
    from marketplace.unixfs import encode_file_node

    leaf = bytes(256 * 1024)
    leaf_cid = Cid.for_block(leaf, RAW)
    store.blocks.put(leaf_cid, leaf)
    node = encode_file_node([(leaf_cid.to_bytes(), len(leaf), len(leaf))] * 174)
    bomb_cid = Cid.for_block(node, DAG_PB)
    store.blocks.put(bomb_cid, node)
    signed = craft(store, tmp_path, alice, GOOD, cid_of=lambda n, c: str(bomb_cid))  # the file entry is the bomb
    b = make_node(tmp_path, "b", store, Identity.generate())
    b.registry.trust(alice.fingerprint, alice.public_key_b64(), "alice")
    staging = b.root / ".staging"

    # Act
    with pytest.raises(ArtifactRefused) as as_envelope:
        b.market.pull(str(bomb_cid))
    with pytest.raises(ArtifactRefused) as as_file:
        b.market.pull(put_envelope(store, tmp_path, signed))

    # Assert: refused at the root's declared size (43.5 MiB), before a byte of the file was written
    assert f"declares {174 * len(leaf)} bytes, more than the {8 * 1024 * 1024} expected" in as_envelope.value.detail
    assert f"declares {174 * len(leaf)} bytes, more than the {len(GOOD['notes.txt'])} expected" in as_file.value.detail
    assert not any(staging.rglob("*.part")) and b.registry.artifacts() == []


def test_another_publisher_cannot_overwrite_an_installed_name(
    tmp_path: Path, store: EmbeddedStore, alice: Identity, adapter_folder: Path
) -> None:
    # Arrange: alice's finance@1.0.0 is installed on b; mallory publishes her own finance@1.0.0 and 0.9.0
    a = make_node(tmp_path, "a", store, alice)
    b = make_node(tmp_path, "b", store, Identity.generate())
    b.registry.trust(alice.fingerprint, alice.public_key_b64(), "alice")
    b.market.pull(publish(a, adapter_folder))
    mallory_id = Identity.generate()
    mallory = make_node(tmp_path, "m", store, mallory_id)
    evil = tmp_path / "evil"
    shutil.copytree(adapter_folder, evil)
    (evil / "README.md").write_text("not alice's\n")
    older = publish(mallory, evil, version="0.9.0")
    same_version = publish(mallory, evil)

    # Act: the user passes --trust-publisher (anyone's signature is accepted), not --replace-publisher
    refused = []
    for cid in (same_version, older):
        with pytest.raises(ArtifactRefused) as exc:
            b.market.pull(cid, trust_publisher=True)
        refused.append(exc.value)
    kept = [(r.publisher, r.version) for r in b.registry.artifacts("finance")]
    alice_files = sorted(p.name for p in (b.root / "finance" / "1.0.0").iterdir())
    replaced = b.market.pull(same_version, trust_publisher=True, replace_publisher=True)

    # Assert
    assert [e.reason for e in refused] == ["publisher_conflict"] * 2, refused
    assert kept == [(alice.fingerprint, "1.0.0")] and "README.md" not in alice_files
    assert [(r.publisher, r.version) for r in b.registry.artifacts("finance")] == [(mallory_id.fingerprint, "1.0.0")]
    assert (replaced.folder / "README.md").read_text() == "not alice's\n"
