"""Sealed boxes: only the recipient, under the same context, opens them; any change is refused."""

import os

import pytest

from crypto.identity import Identity
from crypto.sealing import OVERHEAD, SealError, seal, unseal, x25519_public_of

CONTEXT = b"federation:fed-1|recipient:ed25519:0123"


@pytest.fixture(scope="module")
def alice() -> Identity:
    """The recipient."""
    return Identity.generate()


@pytest.fixture(scope="module")
def box(alice: Identity) -> tuple[bytes, bytes]:
    """(plaintext, sealed) for a 1 MB secret sealed to alice."""
    secret = os.urandom(1024 * 1024)
    return secret, seal(x25519_public_of(alice), secret, CONTEXT)


def test_round_trip_of_one_megabyte(alice: Identity, box: tuple[bytes, bytes]) -> None:
    secret, sealed = box
    assert len(sealed) == len(secret) + OVERHEAD
    assert unseal(alice, sealed, CONTEXT) == secret


def test_two_boxes_of_the_same_secret_differ(alice: Identity) -> None:
    pub = x25519_public_of(alice)
    assert seal(pub, b"s", CONTEXT) != seal(pub, b"s", CONTEXT)


def test_wrong_recipient_is_refused(box: tuple[bytes, bytes]) -> None:
    with pytest.raises(SealError, match="wrong recipient"):
        unseal(Identity.generate(), box[1], CONTEXT)


def test_wrong_context_is_refused(alice: Identity, box: tuple[bytes, bytes]) -> None:
    with pytest.raises(SealError, match="wrong context"):
        unseal(alice, box[1], CONTEXT + b"x")
    with pytest.raises(SealError, match="non-empty"):
        unseal(alice, box[1], b"")


@pytest.mark.parametrize("position", [0, 5, 40, 1000, -1])
def test_flipped_byte_is_refused(alice: Identity, box: tuple[bytes, bytes], position: int) -> None:
    sealed = bytearray(box[1])
    sealed[position] ^= 0x01
    with pytest.raises(SealError):
        unseal(alice, bytes(sealed), CONTEXT)


@pytest.mark.parametrize("length", [0, 10, OVERHEAD - 1, OVERHEAD, 4096])
def test_truncated_box_is_refused(alice: Identity, box: tuple[bytes, bytes], length: int) -> None:
    with pytest.raises(SealError):
        unseal(alice, box[1][:length], CONTEXT)


def test_size_limits(alice: Identity, box: tuple[bytes, bytes]) -> None:
    with pytest.raises(SealError, match="more than the limit"):
        seal(x25519_public_of(alice), bytes(2000), CONTEXT, max_bytes=1000)
    with pytest.raises(SealError, match="more than the limit"):
        unseal(alice, box[1], CONTEXT, max_bytes=1000)


def test_bad_recipient_keys_are_refused() -> None:
    with pytest.raises(SealError, match="32 bytes"):
        seal(b"short", b"s", CONTEXT)
    with pytest.raises(SealError, match="unusable recipient"):
        seal(bytes(32), b"s", CONTEXT)  # a low-order point


def test_derived_x25519_key_is_stable_and_distinct(alice: Identity) -> None:
    again = Identity.from_pem(alice.to_pem())
    assert x25519_public_of(alice) == x25519_public_of(again)
    assert len(x25519_public_of(alice)) == 32
    assert x25519_public_of(alice) != x25519_public_of(Identity.generate())
    assert x25519_public_of(alice) != alice.public_key_bytes
