"""Signed DHT registry records: the validator refuses unsigned, forged, mismatched, expired, replayed and
rolled-back records, and selects the newest valid one."""

import enum
import json
import time

import pytest

from crypto.identity import Identity
from marketplace.registry_record import (
    MAX_RECORD_BYTES,
    RecordRejected,
    record_key,
    select_record,
    sign_record,
    validate_record,
)

V1 = {"1.0.0": "bafkreiaaa", "1.1.0": "bafkreibbb"}


@pytest.fixture
def alice() -> Identity:
    return Identity.generate()


def test_a_signed_record_validates_and_lists_versions_highest_first(alice: Identity) -> None:
    # Arrange
    value = sign_record(alice, "finance", V1, seq=1)
    # Act
    valid = validate_record(record_key("finance", alice.fingerprint), value)
    # Assert
    assert [v.version for v in valid.record.versions] == ["1.1.0", "1.0.0"]
    assert str(valid.record.highest()) == "1.1.0"


class Fault(enum.Enum):
    """Ways a record offered to the DHT can be bad."""

    UNSIGNED = enum.auto()
    BAD_SIGNATURE = enum.auto()
    EDITED_AFTER_SIGNING = enum.auto()
    KEY_NOT_THE_PUBLISHER = enum.auto()
    WRONG_DHT_KEY = enum.auto()
    EXPIRED = enum.auto()
    REPLAYED_SEQUENCE = enum.auto()
    ROLLED_BACK = enum.auto()
    OVERSIZED = enum.auto()
    GARBAGE = enum.auto()
    BAD_VERSION = enum.auto()


REASON = {
    Fault.UNSIGNED: "unsigned record",
    Fault.BAD_SIGNATURE: "bad signature",
    Fault.EDITED_AFTER_SIGNING: "bad signature",
    Fault.KEY_NOT_THE_PUBLISHER: "not the publisher",
    Fault.WRONG_DHT_KEY: "does not name this record",
    Fault.EXPIRED: "expired record",
    Fault.REPLAYED_SEQUENCE: "replay refused",
    Fault.ROLLED_BACK: "rollback refused",
    Fault.OVERSIZED: "the limit is",
    Fault.GARBAGE: "not a RegistryRecord",
    Fault.BAD_VERSION: "not a semantic version",
}


def _edit(value: bytes, **changes: object) -> bytes:
    doc = json.loads(value)
    doc.update(changes)
    return json.dumps(doc).encode()


def make(fault: Fault, alice: Identity) -> tuple[str, bytes, bytes | None]:
    """(DHT key, offered value, stored value) for one fault."""
    key = record_key("finance", alice.fingerprint)
    good = sign_record(alice, "finance", V1, seq=5)
    if fault is Fault.UNSIGNED:
        return key, _edit(good, signature=""), None
    if fault is Fault.BAD_SIGNATURE:
        return key, _edit(good, signature=json.loads(sign_record(alice, "other", V1, seq=5))["signature"]), None
    if fault is Fault.EDITED_AFTER_SIGNING:
        return key, _edit(good, versions=[{"version": "9.0.0", "envelope_cid": "bafkreievil"}]), None
    if fault is Fault.KEY_NOT_THE_PUBLISHER:
        return key, _edit(good, key=Identity.generate().public_key_b64()), None
    if fault is Fault.WRONG_DHT_KEY:
        return record_key("other", alice.fingerprint), good, None
    if fault is Fault.EXPIRED:
        return key, sign_record(alice, "finance", V1, seq=5, ttl_s=-10), None
    if fault is Fault.REPLAYED_SEQUENCE:
        return key, sign_record(alice, "finance", V1, seq=4), good
    if fault is Fault.ROLLED_BACK:
        return key, sign_record(alice, "finance", {"1.0.0": "bafkreiaaa"}, seq=6), good
    if fault is Fault.OVERSIZED:
        return key, good + b" " * MAX_RECORD_BYTES, None
    if fault is Fault.GARBAGE:
        return key, b"\x00\xffnot json", None
    return key, _edit(good, versions=[{"version": "one", "envelope_cid": "bafkreiaaa"}]), None


@pytest.mark.parametrize("fault", list(Fault))
def test_a_bad_record_is_refused_with_its_reason(alice: Identity, fault: Fault) -> None:
    key, value, stored = make(fault, alice)
    with pytest.raises(RecordRejected, match=REASON[fault]):
        validate_record(key, value, stored)


def test_a_newer_record_replaces_the_stored_one_and_select_prefers_it(alice: Identity) -> None:
    key = record_key("finance", alice.fingerprint)
    old = sign_record(alice, "finance", V1, seq=1)
    new = sign_record(alice, "finance", V1 | {"2.0.0": "bafkreiccc"}, seq=2)
    forged = _edit(new, seq=99)
    assert validate_record(key, new, stored=old).record.seq == 2
    assert select_record(key, [old, forged, new, b"junk"]) == 2
    assert select_record(key, [b"junk"]) == -1
    assert validate_record(key, old, now=time.time()).record.seq == 1


def test_record_keys_are_short_enough_for_py_libp2p_to_walk_to_them(alice: Identity) -> None:
    # py-libp2p 0.8.1 refuses FIND_NODE targets over 50 bytes that are not multihashes
    longest = "a" * 64
    keys = {
        record_key(n, p) for n in ("finance", longest) for p in (alice.fingerprint, Identity.generate().fingerprint)
    }
    assert len(keys) == 4
    assert all(k.startswith("/mirador/") and len(k.encode()) <= 50 for k in keys)
