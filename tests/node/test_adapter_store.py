"""The adapter store: versions, the current pointer, atomic installs and refusals that keep the old version."""

from pathlib import Path

import pytest

from node.adapters.check import AdapterRejected, BaseDims, base_dims_of_file
from node.adapters.store import AdapterStore, UnknownAdapterError
from node.inference.models import embedded_model_path
from tests.lora_files import write_adapter


@pytest.fixture(scope="module")
def dims() -> BaseDims:
    return base_dims_of_file(embedded_model_path())


@pytest.fixture
def store(tmp_path: Path, dims: BaseDims) -> AdapterStore:
    return AdapterStore(tmp_path / "adapters", dims)


def test_installs_become_numbered_versions_and_current_moves(
    store: AdapterStore, tmp_path: Path, dims: BaseDims
) -> None:
    # Arrange
    one = write_adapter(tmp_path / "one.gguf", dims, seed=1)
    two = write_adapter(tmp_path / "two.gguf", dims, seed=2)
    training = tmp_path / "training.json"
    training.write_text('{"epsilon": 3.0}')
    # Act
    v1 = store.install("finance", one)
    v2 = store.install("finance", two, [training])
    # Assert
    assert (v1.key, v2.key) == ("finance@v1", "finance@v2")
    assert store.current("finance") == v2 and store.versions("finance") == ["v1", "v2"]
    assert v2.gguf.read_bytes() == two.read_bytes() and (v2.folder / "training.json").is_file()
    assert store.activate("finance", "v1") == v1 and store.current("finance") == v1
    assert store.names() == ["finance"]


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda t, d: write_adapter(t / "wide.gguf", d, n_embd=d.n_embd * 2), "hidden size or architecture"),
        (lambda t, d: (t / "x.pt").write_bytes(b"\x80\x04") and t / "x.pt", "pickle"),
        (
            lambda t, d: (
                (t / "cut.gguf").write_bytes(write_adapter(t / "w.gguf", d).read_bytes()[:500]) and t / "cut.gguf"
            ),
            "truncated",
        ),
    ],
    ids=["hidden-size", "pickle", "truncated"],
)
def test_a_refused_install_leaves_the_previous_version(
    store: AdapterStore, tmp_path: Path, dims: BaseDims, make: object, reason: str
) -> None:
    # Arrange
    good = store.install("finance", write_adapter(tmp_path / "good.gguf", dims))
    bad = make(tmp_path, dims)  # type: ignore[operator]
    # Act
    with pytest.raises(AdapterRejected, match=reason):
        store.install("finance", bad)
    # Assert
    assert store.current("finance") == good and store.versions("finance") == ["v1"]
    assert sorted(p.name for p in (store.root / "finance").iterdir()) == ["current", "v1"]


def test_peft_pickles_are_never_installed_alongside(store: AdapterStore, tmp_path: Path, dims: BaseDims) -> None:
    gguf = write_adapter(tmp_path / "a.gguf", dims)
    (tmp_path / "adapter_model.bin").write_bytes(b"\x80\x04")
    with pytest.raises(AdapterRejected, match="pickle"):
        store.install("a", gguf, [tmp_path / "adapter_model.bin"])
    assert store.names() == []


def test_unknown_names_versions_and_bad_names_are_errors(store: AdapterStore, tmp_path: Path, dims: BaseDims) -> None:
    store.install("a", write_adapter(tmp_path / "a.gguf", dims))
    with pytest.raises(UnknownAdapterError, match="no adapter named 'b'"):
        store.current("b")
    with pytest.raises(UnknownAdapterError, match="no version 'v7'"):
        store.activate("a", "v7")
    with pytest.raises(ValueError, match=r"adapter name '\.\./etc'"):
        store.install("../etc", tmp_path / "a.gguf")
    store.remove("a")
    with pytest.raises(UnknownAdapterError):
        store.current("a")
