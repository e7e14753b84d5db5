"""CIDs: varints, base58btc, multihashes, CIDv0/v1 binary and string forms, and what is refused."""

import base64
import hashlib

import pytest

from marketplace.cid import (
    DAG_PB,
    RAW,
    Cid,
    CidError,
    b58decode,
    b58encode,
    decode_multihash,
    decode_varint,
    encode_varint,
    multihash_sha256,
)

EMPTY_RAW_V1 = "bafkreihdwdcefgh4dqkjv67uzcmw7ojee6xedzdetojuzjevtenxquvyku"
EMPTY_RAW_V1_B58 = "zb2rhmy65F3REf8SZp7De11gxtECBGgUKaLdiDj7MCGCHxbDW"  # as js-ipfs prints it
EMPTY_FILE_V0 = "QmbFMke1KXqnYyBBWxB74N4c5SBnJMVAiMNRcGu6x1AwQH"


@pytest.mark.parametrize("value", [0, 1, 127, 128, 300, 16383, 16384, 2**32, 2**63 - 1])
def test_varint_round_trip(value: int) -> None:
    # Act
    encoded = encode_varint(value)
    decoded, end = decode_varint(encoded + b"\xff")
    # Assert
    assert (decoded, end) == (value, len(encoded))


@pytest.mark.parametrize(
    ("data", "message"),
    [(b"", "truncated"), (b"\x80", "truncated"), (b"\x80\x00", "non-minimal"), (b"\xff" * 10, "longer than")],
)
def test_varint_refuses_malformed(data: bytes, message: str) -> None:
    # Act / Assert
    with pytest.raises(CidError, match=message):
        decode_varint(data)


def test_varint_refuses_out_of_range() -> None:
    # Act / Assert
    with pytest.raises(CidError):
        encode_varint(-1)
    with pytest.raises(CidError):
        encode_varint(2**63)


@pytest.mark.parametrize("data", [b"", b"\0", b"\0\0\x01", b"hello world", bytes(range(256))])
def test_base58_round_trip(data: bytes) -> None:
    # Act / Assert
    assert b58decode(b58encode(data)) == data


def test_base58_known_value_and_refusal() -> None:
    # Act / Assert
    assert b58encode(b"hello world") == "StV1DL6CwTryKyV"
    with pytest.raises(CidError, match="base58"):
        b58decode("0OIl")


def test_empty_raw_block_cid_in_every_base() -> None:
    # Arrange
    expected = Cid.for_block(b"", RAW)
    # Act
    from_b32 = Cid.parse(EMPTY_RAW_V1)
    from_b58 = Cid.parse(EMPTY_RAW_V1_B58)
    from_upper = Cid.parse(EMPTY_RAW_V1.upper())
    # Assert
    assert from_b32 == from_b58 == from_upper == expected
    assert str(expected) == EMPTY_RAW_V1
    assert expected.encode("base58btc") == EMPTY_RAW_V1_B58
    assert expected.digest == hashlib.sha256(b"").digest()
    assert expected.codec_name == "raw"


def test_v0_round_trip_and_conversion() -> None:
    # Act
    cid = Cid.parse(EMPTY_FILE_V0)
    # Assert
    assert cid.version == 0 and cid.codec == DAG_PB
    assert str(cid) == EMPTY_FILE_V0
    assert Cid.decode(cid.to_bytes()) == cid
    v1 = cid.to_v1()
    assert v1 != cid and v1.multihash == cid.multihash
    assert Cid.parse(str(v1)) == v1 and str(v1).startswith("bafybei")


def test_binary_round_trip_v1() -> None:
    # Arrange
    cid = Cid.v1(DAG_PB, multihash_sha256(b"node"))
    # Act
    again = Cid.decode(cid.to_bytes())
    # Assert
    assert again == cid and hash(again) == hash(cid)
    assert Cid.of(str(cid)) == Cid.of(cid.to_bytes()) == Cid.of(cid) == cid


def test_verify_checks_the_hash() -> None:
    # Arrange
    cid = Cid.for_block(b"data", RAW)
    # Act / Assert
    cid.verify(b"data")
    with pytest.raises(CidError, match="does not match"):
        cid.verify(b"dat4")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "not a CID"),
        ("Qm" + "1" * 44, "version"),
        ("xabc", "multibase"),
        ("b", "empty"),
        ("b!!!!", "base32"),
        ("bafkreihdwdcefgh4dqkjv67uzcmw7ojee6xedzdetojuzjevtenxquvyk", "base32"),  # one character short
        ("bafkreihdwdcefgh4dqkjv67uzcmw7ojee6xedzdetojuzjevtenxquv", "digest"),  # whole bytes missing
        ("z" + b58encode(b"\x02\x55" + multihash_sha256(b"")), "version 2"),
        ("b" + base64.b32encode(multihash_sha256(b"")).decode().rstrip("=").lower(), "multibase prefix"),  # v0 bytes
    ],
)
def test_parse_refuses_malformed(text: str, message: str) -> None:
    # Act / Assert
    with pytest.raises(CidError, match=message):
        Cid.parse(text)


def test_multihash_length_must_match() -> None:
    # Arrange
    mh = multihash_sha256(b"x")
    # Act / Assert
    assert decode_multihash(mh)[0] == 0x12
    with pytest.raises(CidError, match="digest"):
        decode_multihash(mh + b"\0")
    with pytest.raises(CidError, match="sha2-256"):
        decode_multihash(b"\x12\x02ab")


def test_cid_constructor_refuses_inconsistent_values() -> None:
    # Act / Assert
    with pytest.raises(CidError, match="dag-pb"):
        Cid(0, RAW, multihash_sha256(b""))
    with pytest.raises(CidError, match="version"):
        Cid(2, RAW, multihash_sha256(b""))
