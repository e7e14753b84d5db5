"""LoRA training on the real SmolLM2-135M twin: loss goes down, files are right, DP accounting is honest, the
training subprocess speaks JSON lines."""

import json
import math
import random
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from node.adapters.check import BaseDims, base_dims_of_file, check_adapter_file
from node.inference.models import BaseModel, embedded_model_path
from node.training.data import Example, Message
from node.training.trainer import (
    DPConfig,
    TrainConfig,
    TrainResult,
    anchor_kl,
    batch_tensors,
    encode_example,
    evaluate_loss,
    load_initial_adapter,
    lora_config,
    merged_base,
    sample_anchor,
    split_examples,
    train_adapter,
)
from tests.daemon_harness import extra_buffers_for_tests

pytestmark = pytest.mark.slow  # LoRA training with torch

REPO = Path(__file__).resolve().parents[2]
KEEPERS = ["Mara", "Tom", "Ines", "Kofi", "Lena", "Ravi", "Sofia", "Jon"]
PARTS = ["brood box", "honey super", "queen excluder", "frame feeder", "entrance reducer", "inner cover"]
SEASONS = ["early spring", "late spring", "midsummer", "early autumn", "late autumn"]
FINDINGS = ["capped brood", "fresh eggs", "pollen stores", "uncapped nectar", "queen cells", "drone comb"]


def beekeeping_texts(n: int, seed: int) -> list[str]:
    """A one-domain corpus: templated beekeeping log entries with random slots."""
    r = random.Random(seed)
    return [
        f"In {r.choice(SEASONS)}, {r.choice(KEEPERS)} opened hive {r.randint(1, 12)} and lifted the "
        f"{r.choice(PARTS)} carefully. The beekeeper counted {r.randint(2, 9)} frames of {r.choice(FINDINGS)} "
        "and smoked the bees gently before closing the hive."
        for _ in range(n)
    ]


def weather_texts(n: int, seed: int) -> list[str]:
    """Another domain: templated weather reports."""
    r = random.Random(seed)
    cities, skies = ["Porto", "Oslo", "Quito", "Perth", "Lagos"], ["clear", "overcast", "stormy", "hazy"]
    return [
        f"Forecast for {r.choice(cities)}: {r.choice(skies)} skies, {r.randint(-5, 35)} degrees, wind from the "
        f"{r.choice(['north', 'south', 'east', 'west'])} at {r.randint(2, 40)} knots."
        for _ in range(n)
    ]


def beekeeping_chats(n: int, seed: int) -> list[dict[str, Any]]:
    """Chat records in the same domain: a question about a hive and a templated answer."""
    r = random.Random(seed)
    chats = []
    for _ in range(n):
        hive, frames, finding = r.randint(1, 12), r.randint(2, 9), r.choice(FINDINGS)
        chats.append(
            {
                "messages": [
                    {"role": "user", "content": f"What did you find in hive {hive}?"},
                    {"role": "assistant", "content": f"Hive {hive} had {frames} frames of {finding}."},
                ]
            }
        )
    return chats


@pytest.fixture(scope="module")
def dims() -> BaseDims:
    return base_dims_of_file(embedded_model_path())


def reloaded_heldout_loss(base_folder: Path, out_dir: Path, examples: list[Example], config: TrainConfig) -> float:
    """Held-out loss of a fresh base + the adapter read back from disk with peft (not the trainer's own model)."""
    from peft import PeftModel

    from node.training.base_model import load_torch_base

    base, tok = load_torch_base(base_folder)
    model = PeftModel.from_pretrained(base, str(out_dir))
    _, held = split_examples(examples, config)
    return evaluate_loss(model, [encode_example(tok, e, config.max_length) for e in held], config, tok.eos_token_id)


def kl_on_merged_text(base_folder: Path, config: TrainConfig, personal: Path) -> float:
    """KL(merged || merged + personal) on 16 texts the merged model writes (seeded): how far the personal adapter
    moves the model it is served with, away from its data."""
    import torch
    from peft import get_peft_model

    from node.training.base_model import load_torch_base

    assert config.merge_adapter is not None
    base, tok = load_torch_base(base_folder)
    model = get_peft_model(
        merged_base(base, config, Path(config.merge_adapter)), lora_config(config.rank, config.alpha, config.targets)
    )
    load_initial_adapter(model, personal / "adapter_model.safetensors")
    model.eval()
    torch.manual_seed(99)
    rows = sample_anchor(model, tok, 16, config.max_length)
    ids, mask, _ = batch_tensors([(r, r) for r in rows], tok.eos_token_id)
    with torch.no_grad():
        return float(anchor_kl(model, ids, mask))


def gguf_arrays(path: Path) -> dict[str, np.ndarray]:
    import gguf

    return {t.name: np.asarray(t.data) for t in gguf.GGUFReader(path).tensors}


def test_split_seed_fixes_the_held_out_examples_across_training_seeds() -> None:
    # Arrange: a federation trains with seed = round; its held-out split must not move with it
    examples = [Example(text=t) for t in beekeeping_texts(40, seed=4)]
    # Act
    by_round = [split_examples(examples, TrainConfig(seed=r, split_seed=0))[1] for r in range(1, 5)]
    unfixed = [split_examples(examples, TrainConfig(seed=r))[1] for r in range(1, 5)]
    # Assert
    assert all(held == by_round[0] for held in by_round)
    assert any(held != unfixed[0] for held in unfixed)


def test_training_lowers_heldout_loss_and_writes_the_trained_adapter(
    torch_base_folder: Path, tmp_path: Path, dims: BaseDims
) -> None:
    # Arrange
    from safetensors.numpy import load_file

    from node.training.lora_export import permute_rows

    examples = [Example(text=t) for t in beekeeping_texts(60, seed=1)]
    config = TrainConfig(steps=20, batch_size=4, max_length=64, seed=0)
    progress: list[Any] = []
    out = tmp_path / "adapter"
    # Act
    result = train_adapter(torch_base_folder, examples, config, out, progress.append)
    # Assert: learning (measured 4.72 -> 0.90 in 20 steps; 30% is a wide margin)
    assert (result.examples, result.heldout_examples) == (54, 6)
    assert result.heldout_loss_after < 0.7 * result.heldout_loss_before, result
    assert result.epsilon is None and result.trainable_params == 30 * 8 * ((576 + 576) + (576 + 192))
    assert [p.step for p in progress] == list(range(1, 21)) and progress[-1].eta_s == 0
    assert all(math.isfinite(p.loss) and p.eta_s >= 0 for p in progress)
    # Assert: exactly the four files, no pickle, no temp leftovers; training.json is the result
    assert sorted(p.name for p in out.iterdir()) == [
        "adapter.gguf",
        "adapter_config.json",
        "adapter_model.safetensors",
        "training.json",
    ]
    assert TrainResult(**json.loads((out / "training.json").read_text())) == result
    # Assert: the GGUF passes the pre-llama.cpp check and holds peft's numbers (q rows permuted)
    check_adapter_file(out / "adapter.gguf", dims)
    peft_state = load_file(str(out / "adapter_model.safetensors"))
    gguf_state = gguf_arrays(out / "adapter.gguf")
    assert len(gguf_state) == len(peft_state) == 30 * 2 * 2
    for layer in (0, 17, 29):
        prefix = f"base_model.model.model.layers.{layer}.self_attn"
        for module, name in (("q_proj", "attn_q"), ("v_proj", "attn_v")):
            a, b = peft_state[f"{prefix}.{module}.lora_A.weight"], peft_state[f"{prefix}.{module}.lora_B.weight"]
            assert np.abs(b).sum() > 0, "lora_B starts at zero: a trained adapter has moved it"
            want_b = permute_rows(b, dims.n_head) if module == "q_proj" else b
            np.testing.assert_array_equal(gguf_state[f"blk.{layer}.{name}.weight.lora_a"], a)
            np.testing.assert_array_equal(gguf_state[f"blk.{layer}.{name}.weight.lora_b"], want_b)
    # Assert: the saved adapter is the trained model (peft reload reproduces the held-out loss)
    reloaded = reloaded_heldout_loss(torch_base_folder, out, examples, config)
    assert reloaded == pytest.approx(result.heldout_loss_after, rel=1e-4)


def test_dp_training_reports_an_honest_epsilon(torch_base_folder: Path, tmp_path: Path) -> None:
    # Arrange
    from opacus.accountants import PRVAccountant

    examples = [Example(text=t) for t in beekeeping_texts(60, seed=2)]
    dp = DPConfig(epsilon=8.0, delta=1e-5, max_grad_norm=1.0)
    config = TrainConfig(steps=8, batch_size=8, physical_batch_size=4, max_length=48, seed=3, dp=dp)
    out = tmp_path / "dp"
    # Act
    result = train_adapter(torch_base_folder, examples, config, out)
    # Assert: epsilon within the target, recorded in training.json
    assert result.epsilon is not None and result.noise_multiplier is not None
    assert math.isfinite(result.epsilon) and 7.9 <= result.epsilon <= 8.0 + 1e-9, result.epsilon
    recorded = json.loads((out / "training.json").read_text())
    assert (recorded["epsilon"], recorded["delta"], recorded["noise_multiplier"]) == (
        result.epsilon,
        1e-5,
        result.noise_multiplier,
    )
    assert result.sample_rate == pytest.approx(1 / math.ceil(54 / 8))
    # Assert: an independent PRV accountant gives the same epsilon for (noise, sample rate, steps)
    accountant = PRVAccountant()
    for _ in range(config.steps):
        accountant.step(noise_multiplier=result.noise_multiplier, sample_rate=result.sample_rate)
    independent = accountant.get_epsilon(delta=1e-5)
    assert abs(independent - result.epsilon) <= 0.01 * independent, (independent, result.epsilon)
    # Assert: opacus issue #820 - the adapter on disk is the DP-trained one
    reloaded = reloaded_heldout_loss(torch_base_folder, out, examples, config)
    assert reloaded == pytest.approx(result.heldout_loss_after, rel=1e-4)
    assert result.heldout_loss_after != result.heldout_loss_before


def test_dp_takes_noise_only_steps_on_empty_poisson_batches(torch_base_folder: Path, tmp_path: Path) -> None:
    # Arrange: 2 training examples sampled at rate 1/2: a Poisson batch is empty with probability 1/4, so one of 40
    # is empty but with probability 0.75^40 = 1e-5 (the sampling is secret, not seeded)
    examples = [Example(text=f"The hive number {i} is calm today.") for i in range(3)]
    dp = DPConfig(epsilon=8.0)
    config = TrainConfig(steps=40, batch_size=1, max_length=16, holdout_fraction=0.34, seed=0, dp=dp)
    # Act
    result = train_adapter(torch_base_folder, examples, config, tmp_path / "tiny")
    # Assert: empty batches are steps too (noise only, counted by the accountant), reported without a loss
    assert result.sample_rate == 0.5 and result.losses.count(None) >= 1, result.losses
    assert result.epsilon is not None and 7.9 <= result.epsilon <= 8.0 + 1e-9
    assert json.loads((tmp_path / "tiny" / "training.json").read_text())["losses"] == result.losses


def test_dp_at_a_given_noise_and_sample_rate_samples_and_accounts_at_exactly_those(
    torch_base_folder: Path, tmp_path: Path
) -> None:
    # Arrange: a federation round's DP-SGD: z and q fixed before training (q = 0.02 on 54 examples: a Poisson batch is
    # empty with probability 0.98^54 ≈ 0.34, fewer than 5 of 60 with probability ~1e-6; at opacus' own rate for batch
    # 4, 1/14, it would be ≈ 0.02 per step, 5 or more of 60 with probability ~0.005)
    from crypto.dp import epsilon

    examples = [Example(text=t) for t in beekeeping_texts(60, seed=2)]
    dp = DPConfig(noise_multiplier=0.9, sample_rate=0.02, delta=1e-5, max_grad_norm=1.0)
    config = TrainConfig(steps=60, batch_size=4, max_length=32, seed=5, dp=dp)
    # Act
    result = train_adapter(torch_base_folder, examples, config, tmp_path / "round")
    # Assert
    assert (result.noise_multiplier, result.sample_rate) == (0.9, 0.02)
    assert result.epsilon == pytest.approx(epsilon([(0.9, 0.02, 60)], 1e-5))
    assert result.losses.count(None) >= 5, result.losses  # ≈ 20 of 60 steps expected empty at q = 0.02


def test_dp_noise_and_sampling_are_secret_even_when_the_seed_is_public(torch_base_folder: Path, tmp_path: Path) -> None:
    # Arrange: a federation round's seed is its round number, which every member and the aggregator know
    from safetensors.numpy import load_file

    examples = [Example(text=t) for t in beekeeping_texts(20, seed=3)]
    dp = DPConfig(noise_multiplier=1.0, sample_rate=0.25, delta=1e-5, max_grad_norm=1.0)
    config = TrainConfig(steps=2, batch_size=4, max_length=32, seed=7, dp=dp)
    plain = TrainConfig(steps=2, batch_size=4, max_length=32, seed=7)
    # Act: the same run twice, with DP-SGD and without
    runs = [train_adapter(torch_base_folder, examples, config, tmp_path / f"dp{i}") for i in range(2)]
    base = [train_adapter(torch_base_folder, examples, plain, tmp_path / f"plain{i}") for i in range(2)]
    # Assert: without DP the seed makes the run reproducible; with DP the noise (and the sample) cannot be replayed
    dp_tensors = [load_file(str(tmp_path / f"dp{i}" / "adapter_model.safetensors")) for i in range(2)]
    plain_tensors = [load_file(str(tmp_path / f"plain{i}" / "adapter_model.safetensors")) for i in range(2)]
    assert all((plain_tensors[0][k] == plain_tensors[1][k]).all() for k in plain_tensors[0])
    assert any((dp_tensors[0][k] != dp_tensors[1][k]).any() for k in dp_tensors[0] if "lora_B" in k)
    assert runs[0].epsilon == runs[1].epsilon and base[0].epsilon is None


def test_chat_loss_is_on_assistant_tokens_and_tokens_match_serving(torch_base_folder: Path) -> None:
    # Arrange
    from transformers import AutoTokenizer

    from node.training.base_model import fix_digit_splitting

    tok = AutoTokenizer.from_pretrained(str(torch_base_folder))
    fix_digit_splitting(tok)
    messages = (
        Message("user", "What did you find in hive 7?"),
        Message("assistant", "Hive 7 had 4 frames of fresh eggs."),
        Message("user", "And hive 12?"),
        Message("assistant", "Queen cells, 2 of them."),
    )
    served = BaseModel("m", embedded_model_path(), extra_buffers=extra_buffers_for_tests())
    # Act
    enc = encode_example(tok, Example(messages=messages), max_length=512)
    prompt = served.chat_tokens([{"role": m.role, "content": m.content} for m in messages[:3]])
    served.close()
    # Assert: loss only on the assistant turns and their end-of-turn token
    learned = tok.decode([t for t, label in zip(enc.ids, enc.labels, strict=True) if label != -100])
    assert learned == "Hive 7 had 4 frames of fresh eggs.<|im_end|>Queen cells, 2 of them.<|im_end|>"
    # Assert: what llama.cpp is served for the conversation so far is exactly the training prefix
    assert enc.ids[: len(prompt)] == prompt
    # Assert: a long chat keeps its last assistant turn
    short = encode_example(tok, Example(messages=messages), max_length=16)
    assert len(short.ids) == 16 and tok.decode(short.ids).endswith("Queen cells, 2 of them.<|im_end|>")


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"targets": "qk"}, "targets"),
        ({"steps": 0}, "steps"),
        ({"rank": 2.5}, "rank"),
        ({"learning_rate": -1.0}, "learning_rate"),
        ({"max_length": 4}, "max_length"),
        ({"holdout_fraction": 0.0}, "holdout_fraction"),
        ({"threads": 0}, "threads"),
        ({"split_seed": -1}, "split_seed"),
        ({"anchor_samples": -1}, "anchor_samples"),
        ({"anchor_weight": 0.0}, "anchor_weight"),
    ],
)
def test_bad_train_config_names_the_field(kwargs: dict[str, Any], field: str) -> None:
    # Act / Assert
    with pytest.raises(ValueError, match=rf"^{field} must"):
        TrainConfig(**kwargs)


def test_an_anchor_needs_an_adapter_merged_under() -> None:
    # Act / Assert: the anchor is text the merged adapter writes
    with pytest.raises(ValueError, match=r"^anchor_samples must come with merge_adapter"):
        TrainConfig(anchor_samples=8)


def test_bad_dp_config_names_the_field() -> None:
    # Act / Assert
    with pytest.raises(ValueError, match=r"^dp.epsilon must"):
        DPConfig(epsilon=0)
    with pytest.raises(ValueError, match=r"^dp.delta must"):
        DPConfig(epsilon=1, delta=1.5)
    with pytest.raises(ValueError, match=r"^dp: give a target epsilon, or"):
        DPConfig(epsilon=1, noise_multiplier=1.0, sample_rate=0.1)
    with pytest.raises(ValueError, match=r"^dp: a noise_multiplier needs its sample_rate"):
        DPConfig(noise_multiplier=1.0)
    with pytest.raises(ValueError, match=r"^dp.sample_rate must"):
        DPConfig(noise_multiplier=1.0, sample_rate=1.5)


def run_job(spec: dict[str, Any], path: Path) -> tuple[int, list[dict[str, Any]], str]:
    path.write_text(json.dumps(spec))
    proc = subprocess.run(
        [sys.executable, "-m", "node.training.job", str(path)], cwd=REPO, capture_output=True, text=True, timeout=240
    )
    events = [json.loads(line) for line in proc.stdout.splitlines()]  # every stdout line must be JSON
    return proc.returncode, events, proc.stderr


def test_job_subprocess_trains_on_chat_data_and_streams_json_lines(torch_base_folder: Path, tmp_path: Path) -> None:
    # Arrange
    data = tmp_path / "chats.jsonl"
    data.write_text("".join(json.dumps(c) + "\n" for c in beekeeping_chats(12, seed=4)))
    out = tmp_path / "adapters" / "bees"
    spec = {
        "gguf": str(embedded_model_path()),
        "models_dir": str(torch_base_folder.parent.parent),
        "data": str(data),
        "examples": None,
        "config": {"steps": 3, "batch_size": 2, "max_length": 48, "targets": "all", "dp": None},
        "out_dir": str(out),
    }
    # Act
    code, events, stderr = run_job(spec, tmp_path / "spec.json")
    # Assert
    assert code == 0, stderr
    kinds = [e["event"] for e in events]
    assert kinds == ["started", "progress", "progress", "progress", "done"], events
    assert events[0]["examples"] == 12 and events[0]["steps"] == 3
    assert [e["step"] for e in events[1:4]] == [1, 2, 3]
    assert all({"loss", "elapsed_s", "eta_s", "steps"} <= e.keys() for e in events[1:4])
    done = events[-1]["result"]
    assert done["targets"] == "all" and done["steps"] == 3 and done["epsilon"] is None
    assert json.loads((out / "training.json").read_text()) == done
    assert (out / "adapter.gguf").is_file() and (out / "adapter_model.safetensors").is_file()
    assert sorted(p.name for p in out.parent.iterdir()) == ["bees"], "no temp folder may be left behind"


def test_job_with_bad_data_exits_2_naming_the_line_and_leaves_no_out_dir(
    torch_base_folder: Path, tmp_path: Path
) -> None:
    # Arrange
    data = tmp_path / "data.jsonl"
    data.write_text('{"text": "one"}\n{"text": "two"}\n{"text": "three", "label": 3}\n')
    out_parent = tmp_path / "adapters"
    spec = {
        "gguf": str(embedded_model_path()),
        "models_dir": str(torch_base_folder.parent.parent),
        "data": str(data),
        "config": {"steps": 2},
        "out_dir": str(out_parent / "broken"),
    }
    # Act
    code, events, _ = run_job(spec, tmp_path / "spec.json")
    # Assert
    assert code == 2
    assert [e["event"] for e in events] == ["error"]
    assert f"{data}:3:" in events[0]["message"] and "label" in events[0]["message"]
    assert not out_parent.exists()


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"steps": "ten"}, "config.steps: Expected `int`, got `str`"),
        ({"epochs": 3}, "unknown field `epochs`"),
        ({"dp": {"epsilon": -1}}, "dp.epsilon must be a positive number"),
    ],
)
def test_job_with_a_bad_spec_exits_2(tmp_path: Path, config: dict[str, Any], message: str) -> None:
    # Arrange
    data = tmp_path / "d.txt"
    data.write_text("one\n\ntwo\n")
    spec = {"gguf": "x.gguf", "models_dir": str(tmp_path), "data": str(data), "config": config, "out_dir": "o"}
    # Act
    code, events, _ = run_job(spec, tmp_path / "spec.json")
    # Assert
    assert code == 2 and len(events) == 1 and message in events[0]["message"], events


def test_training_can_start_from_a_given_adapter(torch_base_folder: Path, tmp_path: Path) -> None:
    # Arrange: a first adapter, trained a few steps (a federation's global adapter, say)
    examples = [Example(text=t) for t in beekeeping_texts(40, seed=2)]
    config = TrainConfig(steps=6, batch_size=4, max_length=48, seed=0)
    first = train_adapter(torch_base_folder, examples, config, tmp_path / "global")
    init = str(tmp_path / "global" / "adapter_model.safetensors")
    # Act: continue from it; and try to start a rank-4 run from the rank-8 adapter
    second = train_adapter(torch_base_folder, examples, replace(config, steps=1, init_adapter=init), tmp_path / "next")
    with pytest.raises(ValueError, match="does not fit this LoRA config") as misfit:
        train_adapter(torch_base_folder, examples, replace(config, rank=4, init_adapter=init), tmp_path / "bad")
    # Assert: the second run started exactly where the first ended (same held-out split, same weights)
    assert second.heldout_loss_before == pytest.approx(first.heldout_loss_after, rel=1e-5)
    assert "wrong shape" in str(misfit.value) and not (tmp_path / "bad").exists()


@pytest.fixture(scope="module")
def global_adapter(torch_base_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A federation's global adapter, of sorts: 6 steps on beekeeping logs."""
    out = tmp_path_factory.mktemp("global")
    examples = [Example(text=t) for t in beekeeping_texts(40, seed=2)]
    train_adapter(torch_base_folder, examples, TrainConfig(steps=6, batch_size=4, max_length=48, seed=0), out)
    return str(out / "adapter_model.safetensors")


def test_an_anchored_personal_adapter_learns_its_data_and_leaves_the_global_model_s_own_text_alone(
    torch_base_folder: Path, tmp_path: Path, global_adapter: str
) -> None:
    # Arrange: a personal adapter of another domain (weather reports), trained over the global one
    examples = [Example(text=t) for t in weather_texts(60, seed=3)]
    free = TrainConfig(steps=12, batch_size=4, max_length=48, seed=1, merge_adapter=global_adapter)
    anchored = replace(free, anchor_samples=16, anchor_weight=4.0)
    # Act
    free_result = train_adapter(torch_base_folder, examples, free, tmp_path / "free")
    anchored_result = train_adapter(torch_base_folder, examples, anchored, tmp_path / "anchored")
    # Assert: both learn their data; the anchored one moves the served pair far less on text the global writes
    kl_free = kl_on_merged_text(torch_base_folder, free, tmp_path / "free")
    kl_anchored = kl_on_merged_text(torch_base_folder, anchored, tmp_path / "anchored")
    assert anchored_result.heldout_loss_after < 0.8 * anchored_result.heldout_loss_before, anchored_result
    assert free_result.heldout_loss_after < 0.8 * free_result.heldout_loss_before, free_result
    assert kl_anchored < 0.5 * kl_free, (kl_anchored, kl_free)
    assert anchored_result.anchor_kl is not None and free_result.anchor_kl is None


def test_an_anchor_under_dp_sgd_changes_nothing_in_the_accounting(
    torch_base_folder: Path, tmp_path: Path, global_adapter: str
) -> None:
    # Arrange: a personal adapter trained with DP-SGD at a federation's z and q, anchored
    from crypto.dp import epsilon

    examples = [Example(text=t) for t in weather_texts(60, seed=3)]
    dp = DPConfig(noise_multiplier=0.6, sample_rate=0.15, delta=1e-5, max_grad_norm=1.0)
    config = TrainConfig(
        steps=12, batch_size=8, max_length=48, seed=1, dp=dp, merge_adapter=global_adapter, anchor_samples=16
    )
    # Act
    result = train_adapter(torch_base_folder, examples, config, tmp_path / "anchored")
    # Assert: the anchor reads no training data, so it takes no privacy: exactly the accounted z, q, steps and ε (an
    # anchor batch seen by opacus' per-example hooks would also break its next step); and the adapter still learns
    assert (result.noise_multiplier, result.sample_rate) == (0.6, 0.15)
    assert result.epsilon == pytest.approx(epsilon([(0.6, 0.15, 12)], 1e-5))
    assert result.anchor_kl is not None and result.anchor_kl > 0
    assert result.heldout_loss_after < result.heldout_loss_before, result
