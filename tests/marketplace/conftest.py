"""Fixtures of the marketplace tests: sample files with fixed content, one real IPFS daemon per session."""

import random
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.ipfs_daemon import IpfsDaemon, require_ipfs, running_ipfs

KIB = 1024
MIB = 1024 * 1024
SAMPLE_SIZES = {
    "0B": 0,
    "1KB": 1 * KIB,
    "256KiB": 256 * KIB,
    "256KiB+1": 256 * KIB + 1,
    "5MB": 5 * MIB,
    "50MB": 50 * MIB,
}


def write_random(path: Path, size: int, seed: int) -> Path:
    """Write `size` pseudo-random bytes from `seed` to `path` (in 1 MiB pieces)."""
    rng = random.Random(seed)
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(left, MIB)
            f.write(rng.randbytes(n))
            left -= n
    return path


@pytest.fixture(scope="session")
def sample_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The sample files by name (0 B ... 50 MB), random bytes with a fixed seed per file."""
    folder = tmp_path_factory.mktemp("samples")
    return {
        name: write_random(folder / f"{name}.bin", size, seed=i) for i, (name, size) in enumerate(SAMPLE_SIZES.items())
    }


@pytest.fixture(scope="session")
def ipfs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[IpfsDaemon]:
    """A js-ipfs daemon on 127.0.0.1 for the whole session (skipped when not installed, failed under CI)."""
    require_ipfs()
    yield from running_ipfs(tmp_path_factory.mktemp("ipfs"))
