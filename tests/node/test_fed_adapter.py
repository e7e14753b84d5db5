"""The node side of a federated round: the seeded round-1 LoRA, global adapter folders and installs, and local
training through the real training subprocess (SmolLM2-135M twin) that returns tensors and installs nothing."""

import json
import math
import threading
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from federation.descriptor import LocalDpSgd
from federation.update import Layout
from node.adapters.check import BaseDims, check_adapter_file
from node.adapters.store import AdapterStore
from node.core.home import NodeHome
from node.fed.adapter import (
    LocalTrainingError,
    LocalTrainingStopped,
    adapter_layout,
    base_dims,
    initial_adapter,
    install_global,
    round_sample_rate,
    targets_key,
    train_locally,
    write_adapter_folder,
)
from node.inference.models import embedded_model_path
from node.training.data import load_examples
from node.training.job import JobSpec, _ConfigSpec, _DPSpec, train_config
from node.training.trainer import DP_BATCH_SIZE, DP_LEARNING_RATE, TARGET_MODULES, TrainConfig, split_examples
from tests.node.test_trainer import beekeeping_texts

pytestmark = pytest.mark.slow  # local training through the training subprocess

QV, ALL = TARGET_MODULES["qv"], TARGET_MODULES["all"]
FAST = {"batch_size": 2, "max_length": 32}  # tiny steps: the tests check plumbing, not learning


@pytest.fixture(scope="module")
def gguf() -> Path:
    return embedded_model_path()


@pytest.fixture(scope="module")
def dims(gguf: Path) -> BaseDims:
    return base_dims(gguf)


@pytest.fixture
def home(tmp_path: Path, torch_base_folder: Path) -> NodeHome:
    """A node home whose models folder already holds the session's torch twin (no second dequantization)."""
    root = tmp_path / "home"
    root.mkdir()
    (root / "models").symlink_to(torch_base_folder.parent.parent)
    return NodeHome(root)


@pytest.fixture
def data(tmp_path: Path) -> Path:
    path = tmp_path / "bees.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in beekeeping_texts(12, seed=5)))
    return path


def assert_nothing_left(home: NodeHome, dims: BaseDims) -> None:
    assert AdapterStore(home.adapters_dir, dims).names() == [], "local training must never install its result"
    assert not (home.root / "train").exists() or not any((home.root / "train").iterdir()), "temp folders left"


@pytest.mark.parametrize("targets", [QV, ALL])
def test_initial_adapter_is_seeded_and_starts_as_the_identity(gguf: Path, dims: BaseDims, targets: tuple) -> None:
    # Act
    first = initial_adapter(gguf, 4, 8.0, targets, seed="fed-1")
    again = initial_adapter(gguf, 4, 8.0, tuple(reversed(targets)), seed="fed-1")
    other = initial_adapter(gguf, 4, 8.0, targets, seed="fed-2")
    # Assert: the same inputs give the same tensors (target order irrelevant), another seed others
    assert Layout.of(first) == Layout.of(again) == Layout.of(other) == adapter_layout(gguf, 4, targets)
    assert len(first) == dims.n_layer * len(targets) * 2
    assert all(np.array_equal(first[k], again[k]) for k in first)
    a_names = [k for k in first if k.endswith("lora_A.weight")]
    assert all(not np.array_equal(first[k], other[k]) for k in a_names)
    # Assert: peft's default init: lora_A uniform in +-1/sqrt(in) (not degenerate), lora_B zero, float32
    for name, array in first.items():
        assert array.dtype == np.float32 and array.flags.c_contiguous
        if name.endswith("lora_B.weight"):
            assert not array.any()
        else:
            bound = 1 / math.sqrt(array.shape[1])
            assert np.abs(array).max() <= bound and np.abs(array).max() > 0.9 * bound
            assert abs(float(array.std()) - bound / math.sqrt(3)) < 0.1 * bound
    # Assert: every projection has its base matrix's (out, in), e.g. layer 0 of SmolLM2 (576 wide, 3 kv heads)
    kv = dims.n_head_kv * dims.head_dim
    attn = "base_model.model.model.layers.0.self_attn"
    assert first[f"{attn}.q_proj.lora_A.weight"].shape == (4, dims.n_embd)
    assert first[f"{attn}.v_proj.lora_B.weight"].shape == (kv, 4)
    if targets == ALL:
        assert first["base_model.model.model.layers.0.mlp.down_proj.lora_A.weight"].shape == (4, dims.n_ff)
        assert first["base_model.model.model.layers.0.mlp.up_proj.lora_B.weight"].shape == (dims.n_ff, 4)


def test_targets_key_maps_module_names_to_the_trainer_key() -> None:
    # Act / Assert
    assert targets_key(("v_proj", "q_proj")) == "qv"
    assert targets_key(sorted(ALL)) == "all"
    with pytest.raises(ValueError, match="not a module set the trainer supports"):
        targets_key(("q_proj", "k_proj"))
    with pytest.raises(ValueError, match="twice"):
        targets_key(("q_proj", "q_proj", "v_proj"))


def test_global_adapter_folder_passes_the_checks_and_installs_as_new_versions(
    gguf: Path, dims: BaseDims, tmp_path: Path
) -> None:
    # Arrange
    tensors = initial_adapter(gguf, 2, 16.0, QV, seed=7)
    trained = {k: v + np.float32(0.01) for k, v in tensors.items()}
    store = AdapterStore(tmp_path / "adapters", dims)
    # Act
    write_adapter_folder(tmp_path / "global", tensors, gguf, 2, 16.0, QV)
    first = install_global(store, "fed-bees", tensors, gguf, 2, 16.0, QV)
    second = install_global(store, "fed-bees", trained, gguf, 2, 16.0, QV)
    # Assert: exactly peft's two files plus the GGUF, which passes the pre-llama.cpp check
    folder = tmp_path / "global"
    assert sorted(p.name for p in folder.iterdir()) == [
        "adapter.gguf",
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapters", "global"], "no temp folder may be left"
    check_adapter_file(folder / "adapter.gguf", dims)
    config = json.loads((folder / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], sorted(config["target_modules"])) == (2, 16.0, sorted(QV))
    assert (config["peft_type"], config["task_type"]) == ("LORA", "CAUSAL_LM")
    saved = load_file(str(folder / "adapter_model.safetensors"))
    assert Layout.of(saved) == Layout.of(tensors) and all(np.array_equal(saved[k], tensors[k]) for k in tensors)
    # Assert: installed as v1 then v2; the current version holds the second adapter's tensors
    assert (first.version, second.version) == ("v1", "v2")
    assert store.current("fed-bees") == second
    assert sorted(p.name for p in second.folder.iterdir()) == sorted(p.name for p in folder.iterdir())
    current = load_file(str(store.current("fed-bees").folder / "adapter_model.safetensors"))
    assert all(np.array_equal(current[k], trained[k]) for k in trained)
    assert store.names() == ["fed-bees"], "the install temp folder is never listed as an adapter"


def test_bad_global_tensors_are_refused_before_anything_is_written(gguf: Path, dims: BaseDims, tmp_path: Path) -> None:
    # Arrange
    tensors = initial_adapter(gguf, 2, 16.0, QV, seed=7)
    name = next(iter(tensors))
    store = AdapterStore(tmp_path / "adapters", dims)
    # Act / Assert
    with pytest.raises(ValueError, match="missing"):
        write_adapter_folder(tmp_path / "a", {k: v for k, v in tensors.items() if k != name}, gguf, 2, 16.0, QV)
    with pytest.raises(ValueError, match="has shape"):
        write_adapter_folder(tmp_path / "b", {**tensors, name: tensors[name][:1]}, gguf, 2, 16.0, QV)
    with pytest.raises(ValueError, match="NaN"):
        install_global(store, "x", {**tensors, name: tensors[name] * np.nan}, gguf, 2, 16.0, QV)
    with pytest.raises(ValueError, match="rank-4"):
        install_global(store, "x", tensors, gguf, 4, 16.0, QV)
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "file").write_text("x")
    with pytest.raises(FileExistsError):
        write_adapter_folder(tmp_path / "c", tensors, gguf, 2, 16.0, QV)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists() and store.names() == []


def test_dp_sgd_rounds_sample_the_dp_batch_unless_the_member_names_one(tmp_path: Path) -> None:
    # Arrange: 300 entries, of which the trainer keeps the held-out tenth apart
    data = tmp_path / "many.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in beekeeping_texts(300, seed=2)))
    trained_on = len(split_examples(load_examples(data), TrainConfig())[0])
    job = {"gguf": "m.gguf", "models_dir": "models", "out_dir": "out", "data": str(data)}
    # Act
    q, q_named = round_sample_rate(data), round_sample_rate(data, {"batch_size": 8})
    private = train_config(JobSpec(**job, config=_ConfigSpec(dp=_DPSpec(noise_multiplier=1.0, sample_rate=q))))
    plain = train_config(JobSpec(**job))
    # Assert: the round is accounted at the batch its training job then draws (a DP batch of 4 learns ~nothing)
    assert q == pytest.approx(DP_BATCH_SIZE / trained_on) and q_named == pytest.approx(8 / trained_on)
    assert private.batch_size == DP_BATCH_SIZE == round(q * trained_on)
    assert private.learning_rate == DP_LEARNING_RATE
    assert (plain.batch_size, plain.learning_rate) == (TrainConfig().batch_size, TrainConfig().learning_rate)


def test_train_locally_returns_trained_tensors_and_installs_nothing(
    gguf: Path, dims: BaseDims, home: NodeHome, data: Path, tmp_path: Path
) -> None:
    # Arrange
    from peft import LoraConfig

    start = initial_adapter(gguf, 2, 16.0, QV, seed="fed-bees")
    # Act
    result = train_locally(home, gguf, start, 2, 16.0, QV, data, steps=3, seed=1, dp_sgd=None, options=FAST)
    # Assert: the real trainer's tensors have exactly the round-1 layout (names and shapes peft creates)
    assert Layout.of(result.tensors) == Layout.of(start)
    assert all(v.dtype == np.float32 and np.isfinite(v).all() for v in result.tensors.values())
    assert any(result.tensors[k].any() for k in result.tensors if k.endswith("lora_B.weight")), "lora_B moved"
    assert result.examples > 0 and result.steps == 3 and result.seconds > 0
    assert math.isfinite(result.heldout_loss_before) and math.isfinite(result.heldout_loss_after)
    assert result.epsilon is None and result.noise_multiplier is None and 0 < result.sample_rate <= 1
    assert_nothing_left(home, dims)
    # Assert: the trained tensors make a global adapter folder whose config peft reads as the trainer's
    write_adapter_folder(tmp_path / "next", result.tensors, gguf, 2, 16.0, QV)
    config = LoraConfig.from_pretrained(str(tmp_path / "next"))
    assert (config.r, config.lora_alpha, set(config.target_modules)) == (2, 16.0, set(QV))
    assert (config.task_type, config.bias, config.lora_dropout) == ("CAUSAL_LM", "none", 0.0)


def test_train_locally_with_dp_sgd_and_frozen_a_on_every_module_reports_its_epsilon(
    gguf: Path, dims: BaseDims, home: NodeHome, data: Path
) -> None:
    # Arrange: FFA-LoRA under opacus (the frozen lora_A have no per-example gradients)
    start = initial_adapter(gguf, 2, 4.0, ALL, seed="fed-dp")
    dp = LocalDpSgd(epsilon=8.0, delta=1e-5, max_grad_norm=1.0)
    # Act
    result = train_locally(
        home, gguf, start, 2, 4.0, ALL, data, steps=2, seed=0, dp_sgd=dp, options=FAST, freeze_a=True
    )
    # Assert: every lora_A bit for bit as it started, every lora_B trained
    assert Layout.of(result.tensors) == Layout.of(start)
    a_names = [k for k in start if k.endswith("lora_A.weight")]
    assert a_names and all(np.array_equal(result.tensors[k], start[k]) for k in a_names)
    assert all(result.tensors[k].any() for k in start if k.endswith("lora_B.weight"))
    assert result.epsilon is not None and 0 < result.epsilon <= 8.0 + 1e-9
    assert result.noise_multiplier is not None and result.noise_multiplier > 0
    assert result.examples > 0 and math.isfinite(result.heldout_loss_after)
    assert_nothing_left(home, dims)


def test_a_failed_or_stopped_local_job_raises_and_cleans_up(
    gguf: Path, dims: BaseDims, home: NodeHome, tmp_path: Path
) -> None:
    # Arrange
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "one"}\n{"text": "two"}\n{"text": "three", "label": 3}\n')
    good = tmp_path / "good.jsonl"
    good.write_text('{"text": "one"}\n{"text": "two"}\n')
    start = initial_adapter(gguf, 2, 16.0, QV, seed=1)
    stop = threading.Event()
    stop.set()
    # Act / Assert: the job's own message; a set stop event ends the job; bad arguments never start one
    with pytest.raises(LocalTrainingError, match=r"bad\.jsonl:3:.*label"):
        train_locally(home, gguf, start, 2, 16.0, QV, bad, steps=1, seed=0, dp_sgd=None)
    with pytest.raises(LocalTrainingStopped):
        train_locally(home, gguf, start, 2, 16.0, QV, good, steps=1, seed=0, dp_sgd=None, stop=stop)
    with pytest.raises(ValueError, match="may not set steps"):
        train_locally(home, gguf, start, 2, 16.0, QV, good, steps=1, seed=0, dp_sgd=None, options={"steps": 9})
    with pytest.raises(ValueError, match="rank-2 LoRA"):
        train_locally(home, gguf, start, 2, 16.0, ALL, good, steps=1, seed=0, dp_sgd=None)
    assert_nothing_left(home, dims)


def test_a_personal_adapter_trains_on_top_of_the_merged_global(
    gguf: Path, dims: BaseDims, home: NodeHome, data: Path
) -> None:
    # Arrange: a global adapter that changes the model (lora_B nonzero), a personal one starting at zero B
    start = initial_adapter(gguf, 2, 16.0, QV, seed="fed-global")
    rng = np.random.default_rng(4)
    global_tensors = {
        k: (rng.normal(0, 0.05, v.shape).astype(np.float32) if k.endswith("lora_B.weight") else v)
        for k, v in start.items()
    }
    personal = initial_adapter(gguf, 2, 16.0, QV, seed="fed-global/personal")
    # Act: the global trained on its own, and the personal trained over the merged global
    alone = train_locally(home, gguf, global_tensors, 2, 16.0, QV, data, steps=1, seed=1, dp_sgd=None, options=FAST)
    over = train_locally(
        home, gguf, personal, 2, 16.0, QV, data, steps=1, seed=1, dp_sgd=None, options=FAST, under=global_tensors
    )
    plain = train_locally(home, gguf, personal, 2, 16.0, QV, data, steps=1, seed=1, dp_sgd=None, options=FAST)
    # Assert: before training, base + merged global + zero personal is exactly base + global (the same held-out
    # loss), not the base alone; what comes back is the personal adapter's layout, never the global's values
    assert over.heldout_loss_before == pytest.approx(alone.heldout_loss_before, abs=1e-4)
    assert abs(over.heldout_loss_before - plain.heldout_loss_before) > 1e-3
    assert Layout.of(over.tensors) == Layout.of(personal)
    assert all(np.array_equal(over.tensors[k], personal[k]) is False for k in personal if k.endswith("lora_B.weight"))
    assert_nothing_left(home, dims)
