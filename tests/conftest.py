"""Shared fixtures: one real daemon per module for API tests."""

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.daemon_harness import Daemon, running


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """A real daemon (balanced profile) on a fresh home, for the tests of one module."""
    home: Path = tmp_path_factory.mktemp("node") / "home"
    yield from running(home)
