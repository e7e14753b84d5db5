"""Shared fixtures: one real daemon per module for API tests, the torch twin of the embedded model."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a model hub

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from node.inference.llama_backend import LlamaModel
from tests.daemon_harness import Daemon, extra_buffers_for_tests, running

if TYPE_CHECKING:
    from node.memory.embedder import Embedder


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """A real daemon (balanced profile) on a fresh home, for the tests of one module."""
    home: Path = tmp_path_factory.mktemp("node") / "home"
    yield from running(home)


@pytest.fixture(scope="session")
def torch_base_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The embedded GGUF dequantized once per test session into a torch model folder (~15 s)."""
    from node.inference.models import embedded_model_path
    from node.training.base_model import ensure_torch_base

    return ensure_torch_base(tmp_path_factory.mktemp("models"), embedded_model_path())


@pytest.fixture(scope="session")
def embedder(tmp_path_factory: pytest.TempPathFactory) -> Iterator["Embedder"]:
    """The sentence-embedding model (converted from its PyPI package once per session) on llama.cpp."""
    from node.memory.embedder import Embedder

    e = Embedder(tmp_path_factory.mktemp("embed"))
    yield e
    e.close()


@pytest.fixture(scope="session")
def llama() -> Iterator[LlamaModel]:
    """The embedded GGUF loaded once per test session in llama.cpp (shared read-only by in-process tests)."""
    from node.inference.llama_backend import LlamaModel
    from node.inference.models import embedded_model_path

    m = LlamaModel(embedded_model_path(), extra_buffers=extra_buffers_for_tests())
    yield m
    m.close()
