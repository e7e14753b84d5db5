"""LoRA training of the torch twin of the served GGUF (peft), optionally with DP-SGD (opacus, PRV accounting).

Outputs in `out_dir`: peft's `adapter_model.safetensors` + `adapter_config.json`, the llama.cpp adapter
`adapter.gguf` and `training.json` (the TrainResult). Every file is written via a temp file and a rename.

Loss: chat examples through the tokenizer's chat template (the GGUF's own, as llama.cpp serves it) with the loss on
assistant tokens only (each assistant turn's content and its end-of-turn token); text examples as plain text with
the loss on every token. Each example's loss is the mean over its own tokens, a batch's loss the mean over its
examples, so that one example's weight never depends on the others (needed for per-example DP clipping).
"""

import json
import math
import os
import random
import secrets
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from node.core.fsutil import atomic_write_text
from node.training.data import Example

TARGET_MODULES: dict[str, tuple[str, ...]] = {
    "qv": ("q_proj", "v_proj"),
    "all": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
}
IGNORE = -100  # label of tokens without loss
ADAPTER_FILES = ("adapter_model.safetensors", "adapter_config.json")
# DP-SGD's defaults where the run names none. The noise of a step's mean gradient is z·C/B per value, and the z a
# budget needs grows more slowly than the batch B (q = B/n), so larger batches learn more per ε; with the noise
# spread over every value, AdamW then needs a larger step than plain training. Measured on 2 × 855 fortunes at ε = 8
# over 24 steps (docs/BENCHMARKS.md, "Choosing DP-SGD's batch and learning rate"): batch 16 at lr 3e-3 kept 21 % of
# plain training's gain, at 1e-2 49 %; batch 64 at 3e-3 49 %, at 1e-2 78 %. Plain training keeps TrainConfig's.
DP_BATCH_SIZE = 64
DP_LEARNING_RATE = 1e-2
_MARK_OPEN, _MARK_CLOSE = "\ue000", "\ue001"  # private-use code points delimiting placeholders in a template
# A personal adapter trained over a federation's global one is anchored to the global on text the global writes
# (`anchor_kl`): in a 4-node fortunes federation the pair was at least as good as training alone at home and within
# 0.05 of the global's loss elsewhere on 3 of 4 nodes, against 1 of 4 unanchored (docs/BENCHMARKS.md, "Personal +
# global, anchored"). Texts are sampled up to what the steps use (`TrainConfig.anchor_batch` per step).
PERSONAL_ANCHOR_SAMPLES = 64
PERSONAL_ANCHOR_WEIGHT = 1.0
ANCHOR_BATCH = 8  # anchor texts per step at most (plain steps of batch 4 take 4)
ANCHOR_START = "<|endoftext|>"  # SmolLM2's document separator: what anchor samples start from (else the eos token)


@dataclass(frozen=True)
class DPConfig:
    """DP-SGD: per-example gradients clipped to max_grad_norm, Poisson-sampled batches, Gaussian noise.

    Either a target `epsilon` over the whole run at `delta` (the noise multiplier is found for it; the sample rate is
    batch_size / examples), or a given `noise_multiplier` and `sample_rate` (a federation round: the node accounted
    (z, q, steps) before training, so the run must use exactly those)."""

    epsilon: float | None = None
    delta: float = 1e-5
    max_grad_norm: float = 1.0
    noise_multiplier: float | None = None
    sample_rate: float | None = None

    def __post_init__(self) -> None:
        if (self.epsilon is None) == (self.noise_multiplier is None):
            raise ValueError("dp: give a target epsilon, or a noise_multiplier with a sample_rate")
        if (self.noise_multiplier is None) != (self.sample_rate is None):
            raise ValueError("dp: a noise_multiplier needs its sample_rate, and a sample_rate its noise_multiplier")
        if self.epsilon is not None and not (math.isfinite(self.epsilon) and self.epsilon > 0):
            raise ValueError(f"dp.epsilon must be a positive number, got {self.epsilon!r}")
        if self.noise_multiplier is not None and not (
            math.isfinite(self.noise_multiplier) and self.noise_multiplier > 0
        ):
            raise ValueError(f"dp.noise_multiplier must be a positive number, got {self.noise_multiplier!r}")
        if self.sample_rate is not None and not 0 < self.sample_rate <= 1:
            raise ValueError(f"dp.sample_rate must be in (0, 1], got {self.sample_rate!r}")
        if not 0 < self.delta < 1:
            raise ValueError(f"dp.delta must be in (0, 1), got {self.delta!r}")
        if not (math.isfinite(self.max_grad_norm) and self.max_grad_norm > 0):
            raise ValueError(f"dp.max_grad_norm must be a positive number, got {self.max_grad_norm!r}")


@dataclass(frozen=True)
class TrainConfig:
    """What to train and how; `batch_size` is the (expected, under DP) logical batch per optimizer step."""

    targets: str = "qv"
    steps: int = 30
    rank: int = 8
    alpha: float = 16.0
    learning_rate: float = 2e-3
    batch_size: int = 4
    max_length: int = 128
    seed: int = 0
    holdout_fraction: float = 0.1
    split_seed: int | None = None  # seeds the held-out split (None: `seed`); fixed across a federation's rounds
    dp: DPConfig | None = None
    threads: int | None = None  # torch threads; None = every core
    physical_batch_size: int | None = None  # examples per forward pass; None = min(batch_size, 8)
    init_adapter: str | None = None  # peft adapter_model.safetensors to start from (a federation's global adapter)
    freeze_a: bool = False  # FFA-LoRA: lora_A keeps its initial values, only lora_B is trained
    merge_adapter: str | None = None  # a LoRA (same rank, alpha, targets) merged into the base first: served with it
    anchor_samples: int = 0  # texts (at most) sampled from the merged model the adapter must not change (`anchor_kl`)
    anchor_weight: float = 1.0  # weight of the anchor's KL term against the data's loss

    def __post_init__(self) -> None:
        if self.targets not in TARGET_MODULES:
            raise ValueError(f"targets must be one of {', '.join(TARGET_MODULES)}, got {self.targets!r}")
        for name in ("steps", "rank", "batch_size"):
            _check_int(name, getattr(self, name), 1)
        _check_int("max_length", self.max_length, 8)
        _check_int("seed", self.seed, 0)
        if self.split_seed is not None:
            _check_int("split_seed", self.split_seed, 0)
        if self.threads is not None:
            _check_int("threads", self.threads, 1)
        if self.physical_batch_size is not None:
            _check_int("physical_batch_size", self.physical_batch_size, 1)
        for name in ("alpha", "learning_rate"):
            value = getattr(self, name)
            if (
                isinstance(value, bool)
                or not isinstance(value, int | float)
                or not (math.isfinite(value) and value > 0)
            ):
                raise ValueError(f"{name} must be a positive number, got {value!r}")
        if not (isinstance(self.holdout_fraction, int | float) and 0 < self.holdout_fraction <= 0.5):
            raise ValueError(f"holdout_fraction must be in (0, 0.5], got {self.holdout_fraction!r}")
        if not isinstance(self.freeze_a, bool):
            raise ValueError(f"freeze_a must be true or false, got {self.freeze_a!r}")
        if self.dp is not None and not isinstance(self.dp, DPConfig):
            raise ValueError(f"dp must be a DPConfig or None, got {self.dp!r}")
        _check_int("anchor_samples", self.anchor_samples, 0)
        if isinstance(self.anchor_weight, bool) or not (
            isinstance(self.anchor_weight, int | float) and math.isfinite(self.anchor_weight) and self.anchor_weight > 0
        ):
            raise ValueError(f"anchor_weight must be a positive number, got {self.anchor_weight!r}")
        if self.anchor_samples and self.merge_adapter is None:
            raise ValueError("anchor_samples must come with merge_adapter: the anchor is text the merged LoRA writes")

    @property
    def anchor_batch(self) -> int:
        """Anchor texts per step."""
        return min(self.batch_size, ANCHOR_BATCH)

    @property
    def physical_batch(self) -> int:
        """Examples per forward/backward pass."""
        return self.physical_batch_size or min(self.batch_size, 8)


def config_with_defaults(**given: Any) -> TrainConfig:
    """TrainConfig(**given), with DP-SGD's own batch and learning rate where DP-SGD training names none."""
    if given.get("dp") is not None:
        given = {"batch_size": DP_BATCH_SIZE, "learning_rate": DP_LEARNING_RATE, **given}
    return TrainConfig(**given)


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


@dataclass
class TrainProgress:
    """One optimizer step done."""

    step: int
    steps: int
    loss: float | None  # None when a Poisson-sampled DP batch was empty (a noise-only step)
    elapsed_s: float
    eta_s: float


@dataclass
class TrainResult:
    """What a training run did and measured (also written as training.json)."""

    steps: int
    examples: int
    heldout_examples: int
    train_loss: float
    heldout_loss_before: float
    heldout_loss_after: float
    epsilon: float | None
    delta: float | None
    noise_multiplier: float | None
    sample_rate: float
    max_grad_norm: float | None
    seconds: float
    seconds_per_step: float
    targets: str
    rank: int
    alpha: float
    trainable_params: int
    losses: list[float | None] = field(default_factory=list)
    eval_examples: int = 0  # a separate evaluation set (e.g. `mirador create`'s unseen chunks), never trained on
    eval_loss_before: float | None = None
    eval_loss_after: float | None = None
    anchor_kl: float | None = None  # with anchor_samples: the anchor's KL over the last steps

    def to_json(self) -> str:
        """The result as one JSON document."""
        return json.dumps(_finite(asdict(self)), allow_nan=False)


def _finite(value: Any) -> Any:
    """`value` with NaN and infinities replaced by None (JSON has neither)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


@dataclass(frozen=True)
class Encoded:
    """Token ids and labels (IGNORE where there is no loss) of one example."""

    ids: list[int]
    labels: list[int]
    where: str
    chat: bool

    def window(self, max_length: int, rng: random.Random | None) -> tuple[list[int], list[int]]:
        """At most max_length tokens: text gets a random window (the first one without rng), chat its fixed one."""
        if len(self.ids) <= max_length:
            return self.ids, self.labels
        start = rng.randrange(len(self.ids) - max_length + 1) if (rng is not None and not self.chat) else 0
        return self.ids[start : start + max_length], self.labels[start : start + max_length]


def encode_example(tokenizer: Any, example: Example, max_length: int) -> Encoded:
    """Tokenize an example as llama.cpp would serve it; chat examples keep the last max_length tokens ending
    with the last assistant turn, so the loss always has tokens."""
    if example.text is not None:
        enc = tokenizer(example.text, add_special_tokens=True, split_special_tokens=True)
        ids = list(enc["input_ids"])
        return Encoded(ids, list(ids), example.where, chat=False)
    assert example.messages is not None
    text, spans = render_chat(tokenizer, [{"role": m.role, "content": m.content} for m in example.messages])
    bos = tokenizer.bos_token
    enc = tokenizer(text, add_special_tokens=not (bos and text.startswith(bos)), return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    labels = [IGNORE] * len(ids)
    last = 0
    for i, (a, b) in enumerate(enc["offset_mapping"]):
        if b > a and any(s <= a and b <= e for s, e in spans):
            labels[i] = ids[i]
            last = i + 1
    if last == 0:
        raise ValueError(f"{example.where}: the chat template left no assistant tokens to learn from")
    start = max(0, last - max_length)
    return Encoded(ids[start:last], labels[start:last], example.where, chat=True)


def render_chat(tokenizer: Any, messages: list[dict[str, str]]) -> tuple[str, list[tuple[int, int]]]:
    """The chat template's text and the character spans of each assistant turn (content + end-of-turn token)."""
    marked = [{"role": m["role"], "content": f"{_MARK_OPEN}{i}{_MARK_CLOSE}"} for i, m in enumerate(messages)]
    template = tokenizer.apply_chat_template(marked, tokenize=False)
    pieces, spans, pos = [], [], 0
    end_token = tokenizer.eos_token or ""
    for i, m in enumerate(messages):
        marker = f"{_MARK_OPEN}{i}{_MARK_CLOSE}"
        at = template.find(marker, pos)
        if at < 0:
            raise ValueError("the chat template does not reproduce message contents verbatim; cannot mask the loss")
        pieces.append(template[pos:at])
        start = sum(map(len, pieces))
        pieces.append(m["content"])
        pos = at + len(marker)
        if m["role"] == "assistant":
            end = start + len(m["content"])
            if end_token and template.startswith(end_token, pos):
                end += len(end_token)
            spans.append((start, end))
    pieces.append(template[pos:])
    text = "".join(pieces)
    if text != tokenizer.apply_chat_template(messages, tokenize=False):
        raise ValueError("the chat template does not reproduce message contents verbatim; cannot mask the loss")
    return text, spans


def split_examples(examples: Sequence[Example], config: TrainConfig) -> tuple[list[Example], list[Example]]:
    """Deterministic (seeded) split into (train, held-out); at least one example on each side."""
    if len(examples) < 2:
        raise ValueError(f"need at least 2 examples (1 held out), got {len(examples)}")
    order = list(range(len(examples)))
    random.Random(config.seed if config.split_seed is None else config.split_seed).shuffle(order)
    n_hold = min(len(examples) - 1, max(1, round(len(examples) * config.holdout_fraction)))
    held = sorted(order[:n_hold])
    train = sorted(order[n_hold:])
    return [examples[i] for i in train], [examples[i] for i in held]


def batch_tensors(rows: Sequence[tuple[list[int], list[int]]], pad_id: int) -> tuple[Any, Any, Any]:
    """(input_ids, attention_mask, labels), right-padded to the longest row."""
    import torch

    width = max(len(ids) for ids, _ in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    for r, (row_ids, row_labels) in enumerate(rows):
        ids[r, : len(row_ids)] = torch.tensor(row_ids)
        mask[r, : len(row_ids)] = 1
        labels[r, : len(row_labels)] = torch.tensor(row_labels)
    return ids, mask, labels


def per_example_loss(model: Any, ids: Any, mask: Any, labels: Any) -> Any:
    """Mean next-token cross-entropy of each row over its labelled tokens (shape: batch)."""
    import torch

    logits = model(input_ids=ids, attention_mask=mask).logits
    # shift the labels, not the logits: slicing the (batch x tokens x vocab) logits would copy them
    target = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=IGNORE)
    token_loss = torch.nn.functional.cross_entropy(
        logits.view(-1, logits.shape[-1]), target.reshape(-1), ignore_index=IGNORE, reduction="none"
    ).view(target.shape)
    counts = (target != IGNORE).sum(dim=1).clamp(min=1)
    return token_loss.sum(dim=1) / counts


def sample_anchor(model: Any, tokenizer: Any, count: int, max_length: int) -> list[list[int]]:
    """`count` texts sampled at temperature 1 from `model` with its adapter off (the base with the merged adapter),
    each started from the end-of-text token and cut before the next end token."""
    import torch

    vocab = tokenizer.get_vocab()
    start = int(vocab.get(ANCHOR_START, tokenizer.eos_token_id))
    stops = {start, tokenizer.eos_token_id}
    prompt = torch.full((count, 1), start, dtype=torch.long)
    was_training = model.training
    model.eval()
    with torch.no_grad(), model.disable_adapter():
        out = model.generate(
            input_ids=prompt,
            attention_mask=torch.ones_like(prompt),
            do_sample=True,
            top_k=0,
            top_p=1.0,
            temperature=1.0,
            max_new_tokens=max_length - 1,
            pad_token_id=tokenizer.eos_token_id,
            eos_token_id=sorted(stops),
        )
    model.train(was_training)
    rows = []
    for seq in out.tolist():
        cut = next((i for i in range(1, len(seq)) if seq[i] in stops), len(seq))
        if cut > 2:  # a prompt and at least two tokens to predict
            rows.append(seq[:cut])
    if not rows:
        raise RuntimeError("the anchor sampling produced no text")
    return rows


def anchor_kl(model: Any, ids: Any, mask: Any) -> Any:
    """Mean per-token KL(model without adapter || model) over `ids`: how far the adapter moves the model on text the
    model without it writes (Learning without Forgetting, Li & Hoiem 2016, https://arxiv.org/abs/1606.09282, with
    generated text instead of stored data)."""
    import torch

    # the reference is recomputed every step: cached for 64 texts of 64 tokens it would hold 800 MB of log-probs
    with torch.no_grad(), model.disable_adapter():
        reference = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits, dim=-1)
    current = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits, dim=-1)
    per_token = (reference.exp() * (reference - current)).sum(dim=-1)
    weights = mask.to(per_token.dtype)
    return (per_token * weights).sum() / weights.sum()


def evaluate_loss(model: Any, encoded: Sequence[Encoded], config: TrainConfig, pad_id: int) -> float:
    """Mean per-example loss over `encoded` (first window of long texts), without gradients."""
    import torch

    was_training = model.training
    model.eval()
    total = 0.0
    with torch.no_grad():
        for i in range(0, len(encoded), config.physical_batch):
            chunk = encoded[i : i + config.physical_batch]
            rows = [e.window(config.max_length, None) for e in chunk]
            total += float(per_example_loss(model, *batch_tensors(rows, pad_id)).sum())
    model.train(was_training)
    return total / len(encoded)


def lora_config(rank: int, alpha: float, targets: str) -> Any:
    """The peft LoraConfig of every Mirador adapter: rank, alpha, the modules named by `targets`, no dropout."""
    from peft import LoraConfig

    return LoraConfig(
        r=rank,
        lora_alpha=alpha,  # type: ignore[arg-type]  # peft scales by alpha / r; a float works
        lora_dropout=0.0,
        target_modules=list(TARGET_MODULES[targets]),
        bias="none",
        task_type="CAUSAL_LM",
    )


def train_adapter(
    base_folder: Path,
    examples: list[Example],
    config: TrainConfig,
    out_dir: Path,
    on_progress: Callable[[TrainProgress], None] | None = None,
    evaluate: Sequence[Example] = (),
) -> TrainResult:
    """Train a LoRA adapter on `examples` and write it (peft safetensors, GGUF, training.json) into out_dir; the
    loss on `evaluate` (never trained on) is measured before and after as well."""
    import torch
    from peft import get_peft_model

    from node.training.base_model import load_torch_base

    began = time.monotonic()
    train, held = split_examples(examples, config)
    torch.set_num_threads(config.threads or os.cpu_count() or 1)
    torch.manual_seed(config.seed)
    base, tokenizer = load_torch_base(base_folder)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    train_enc = [encode_example(tokenizer, e, config.max_length) for e in train]
    held_enc = [encode_example(tokenizer, e, config.max_length) for e in held]
    eval_enc = [encode_example(tokenizer, e, config.max_length) for e in evaluate]
    if config.merge_adapter is not None:
        base = merged_base(base, config, Path(config.merge_adapter))
    model = get_peft_model(base, lora_config(config.rank, config.alpha, config.targets))
    if config.init_adapter is not None:
        load_initial_adapter(model, Path(config.init_adapter))
    if config.freeze_a:
        freeze_lora_a(model)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    before = evaluate_loss(model, held_enc, config, pad_id)
    eval_before = evaluate_loss(model, eval_enc, config, pad_id) if eval_enc else None
    anchor_texts = min(config.anchor_samples, config.steps * config.anchor_batch)  # no more than the steps use
    anchor = sample_anchor(model, tokenizer, anchor_texts, config.max_length) if anchor_texts else []
    run = _Run(model, train_enc, config, pad_id, on_progress, anchor)
    privacy = run.train_private() if config.dp is not None else run.train_plain()
    after = evaluate_loss(model, held_enc, config, pad_id)
    eval_after = evaluate_loss(model, eval_enc, config, pad_id) if eval_enc else None
    tail = [x for x in run.losses[-5:] if x is not None]
    result = TrainResult(
        steps=config.steps,
        examples=len(train),
        heldout_examples=len(held),
        train_loss=sum(tail) / len(tail) if tail else float("nan"),
        heldout_loss_before=before,
        heldout_loss_after=after,
        epsilon=privacy.get("epsilon"),
        delta=config.dp.delta if config.dp else None,
        noise_multiplier=privacy.get("noise_multiplier"),
        sample_rate=privacy.get("sample_rate", min(1.0, config.batch_size / len(train))),
        max_grad_norm=config.dp.max_grad_norm if config.dp else None,
        seconds=0.0,
        seconds_per_step=run.step_seconds / config.steps,
        targets=config.targets,
        rank=config.rank,
        alpha=config.alpha,
        trainable_params=trainable,
        losses=[None if x is None else round(x, 5) for x in run.losses],
        eval_examples=len(eval_enc),
        eval_loss_before=eval_before,
        eval_loss_after=eval_after,
        anchor_kl=sum(run.anchor_kls[-5:]) / len(run.anchor_kls[-5:]) if run.anchor_kls else None,
    )
    save_adapter(model, base.config, config, out_dir)
    result.seconds = round(time.monotonic() - began, 3)
    atomic_write_text(out_dir / "training.json", result.to_json() + "\n")
    return result


def load_initial_adapter(model: Any, path: Path) -> None:
    """Start from the LoRA weights in `path` (peft safetensors); every tensor must match the model's name and shape."""
    import torch
    from peft import get_peft_model_state_dict, set_peft_model_state_dict
    from safetensors.numpy import load_file

    wanted = {k: tuple(v.shape) for k, v in get_peft_model_state_dict(model).items()}
    given = load_file(str(path))
    got = {k: tuple(v.shape) for k, v in given.items()}
    if got != wanted:
        missing, extra = sorted(set(wanted) - set(got)), sorted(set(got) - set(wanted))
        wrong = sorted(k for k in set(wanted) & set(got) if wanted[k] != got[k])
        raise ValueError(
            f"init_adapter {path.name} does not fit this LoRA config: missing {missing[:3]}, extra {extra[:3]}, "
            f"wrong shape {wrong[:3]}"
        )
    set_peft_model_state_dict(model, {k: torch.from_numpy(v.astype("float32")) for k, v in given.items()})


def secret_generator() -> Any:
    """A torch generator seeded from the OS's CSPRNG: DP-SGD's noise and Poisson sampling must be unknown to anyone
    who knows the run's settings, and `seed` (the round number in a federation) is public. (opacus' secure_mode,
    which also resists floating-point attacks on the noise, needs torchcsprng, which has no wheel for this torch.)"""
    import torch

    generator = torch.Generator()
    generator.manual_seed(secrets.randbits(63))
    return generator


def merged_base(base: Any, config: TrainConfig, path: Path) -> Any:
    """The base with the LoRA in `path` merged into its weights (a personal adapter trains on top of a federation's
    global one: serving both at scale 1 computes exactly what was trained, W + ΔW_global + ΔW_personal)."""
    from peft import get_peft_model

    with_global = get_peft_model(base, lora_config(config.rank, config.alpha, config.targets))
    load_initial_adapter(with_global, path)
    return with_global.merge_and_unload()


def freeze_lora_a(model: Any) -> None:
    """FFA-LoRA: stop training every lora_A (the optimizer, clipping and noise then see only lora_B)."""
    frozen = 0
    for name, param in model.named_parameters():
        if ".lora_A." in name:
            param.requires_grad_(False)
            frozen += 1
    if not frozen:
        raise ValueError("freeze_a: the model has no lora_A parameters")


class _Run:
    """The optimizer loop, shared by plain and DP training."""

    def __init__(
        self,
        model: Any,
        encoded: list[Encoded],
        config: TrainConfig,
        pad_id: int,
        on_progress: Callable[[TrainProgress], None] | None,
        anchor: Sequence[list[int]] = (),
    ) -> None:
        self.model = model
        self.anchor = list(anchor)
        self.anchor_kls: list[float] = []
        self.encoded = encoded
        self.config = config
        self.pad_id = pad_id
        self.on_progress = on_progress
        self.rng = random.Random(config.seed)
        self.losses: list[float | None] = []
        self.step_seconds = 0.0

    def _params(self) -> list[Any]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def _rows(self, indices: Sequence[int]) -> list[tuple[list[int], list[int]]]:
        return [self.encoded[i].window(self.config.max_length, self.rng) for i in indices]

    def _chunks(self, indices: Sequence[int]) -> list[Sequence[int]]:
        size = self.config.physical_batch
        return [indices[i : i + size] for i in range(0, len(indices), size)]

    def _report(self, step: int, loss: float | None, started: float) -> None:
        self.losses.append(loss)
        self.step_seconds = time.monotonic() - started
        if self.on_progress is not None:
            mean = self.step_seconds / step
            self.on_progress(
                TrainProgress(
                    step,
                    self.config.steps,
                    loss,
                    round(self.step_seconds, 3),
                    round(mean * (self.config.steps - step), 3),
                )
            )

    def train_plain(self) -> dict[str, Any]:
        """Shuffled epochs of batch_size examples per step (gradient accumulation over physical chunks)."""
        import torch

        cfg = self.config
        opt = torch.optim.AdamW(self._params(), lr=cfg.learning_rate, weight_decay=0.0)
        self.model.train()
        order: list[int] = []
        started = time.monotonic()
        for step in range(1, cfg.steps + 1):
            batch: list[int] = []
            while len(batch) < min(cfg.batch_size, len(self.encoded)):
                if not order:
                    order = list(range(len(self.encoded)))
                    self.rng.shuffle(order)
                batch.append(order.pop())
            total = 0.0
            for chunk in self._chunks(batch):
                losses = per_example_loss(self.model, *batch_tensors(self._rows(chunk), self.pad_id))
                (losses.sum() / len(batch)).backward()
                total += float(losses.detach().sum())
            if self.anchor:
                self._anchor_backward(step)
            opt.step()
            opt.zero_grad(set_to_none=True)
            self._report(step, total / len(batch), started)
        return {}

    def _anchor_backward(self, step: int) -> None:
        """Add the gradient of anchor_weight × the KL on the step's anchor texts (taken in turn) to every grad."""
        size = self.config.anchor_batch
        at = (step - 1) * size
        rows = [self.anchor[(at + i) % len(self.anchor)] for i in range(size)]
        kl = 0.0
        for chunk in self._chunks(list(range(len(rows)))):
            ids, mask, _ = batch_tensors([(rows[i], rows[i]) for i in chunk], self.pad_id)
            value = anchor_kl(self.model, ids, mask)
            (value * (self.config.anchor_weight * len(chunk) / len(rows))).backward()
            kl += float(value.detach()) * len(chunk) / len(rows)
        self.anchor_kls.append(kl)

    def train_private(self) -> dict[str, Any]:
        """DP-SGD: Poisson-sampled logical batches, per-example clipping and Gaussian noise (opacus, PRV)."""
        import torch
        from opacus import PrivacyEngine
        from opacus.accountants.utils import get_noise_multiplier
        from torch.utils.data import DataLoader, TensorDataset

        cfg = self.config
        dp = cfg.dp
        assert dp is not None
        n = len(self.encoded)
        loader = DataLoader(TensorDataset(torch.arange(n)), batch_size=min(cfg.batch_size, n))
        if dp.noise_multiplier is not None and dp.sample_rate is not None:
            sigma, sample_rate = dp.noise_multiplier, dp.sample_rate
        else:
            assert dp.epsilon is not None
            sample_rate = 1 / len(loader)  # what opacus derives from the loader for Poisson sampling
            sigma = get_noise_multiplier(
                target_epsilon=dp.epsilon,
                target_delta=dp.delta,
                sample_rate=sample_rate,
                steps=cfg.steps,
                accountant="prv",
                epsilon_tolerance=0.01,
            )
        from opacus.utils.uniform_sampler import UniformWithReplacementSampler

        self.model.train()
        opt = torch.optim.AdamW(self._params(), lr=cfg.learning_rate, weight_decay=0.0)
        engine = PrivacyEngine(accountant="prv")
        secret = secret_generator()
        gsm, dp_opt, _ = engine.make_private(
            module=self.model,
            optimizer=opt,
            data_loader=loader,
            noise_multiplier=sigma,
            max_grad_norm=dp.max_grad_norm,
            poisson_sampling=True,
            grad_sample_mode="hooks",
            noise_generator=secret,
        )
        # Poisson sampling at exactly the accounted q (opacus' loader would use 1 / its length), from the same secret
        # generator as the noise: the global torch RNG is seeded by `seed`, which is public (a federation's round)
        sampler = UniformWithReplacementSampler(num_samples=n, sample_rate=sample_rate, generator=secret)
        if dp.sample_rate is not None:
            dp_opt.expected_batch_size = max(1, round(sample_rate * n))  # gradients are averaged over it
        started = time.monotonic()
        step = 0
        try:
            while step < cfg.steps:
                for indices in sampler:
                    step += 1
                    total = self._private_step(gsm, dp_opt, list(indices), step)
                    self._report(step, total / len(indices) if indices else None, started)
                    if step == cfg.steps:
                        break
        finally:
            unwrapped = gsm.to_standard_module()  # hooks and grad_sample attributes removed
        # opacus issue #820: the trained weights must live in the peft model that is evaluated and saved
        if unwrapped is not self.model or not any(
            bool(p.detach().abs().sum() > 0) for n, p in self.model.named_parameters() if "lora_B" in n
        ):
            raise RuntimeError("after DP training the peft model does not hold trained LoRA weights (opacus #820)")
        if dp.sample_rate is not None:
            from crypto.dp import epsilon

            spent = epsilon([(float(sigma), float(sample_rate), cfg.steps)], dp.delta)
        else:
            spent = float(engine.get_epsilon(dp.delta))
        return {"epsilon": spent, "noise_multiplier": float(sigma), "sample_rate": float(sample_rate)}

    def _private_step(self, gsm: Any, dp_opt: Any, indices: list[int], step: int) -> float:
        """One logical DP step over physical chunks; an empty Poisson batch still takes a noise-only step."""
        import torch

        total = 0.0
        if not indices:
            for p in self._params():
                p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype)
            self._dp_step(gsm, dp_opt, step)
            dp_opt.zero_grad(set_to_none=True)
            return total
        chunks = self._chunks(indices)
        for k, chunk in enumerate(chunks):
            losses = per_example_loss(gsm, *batch_tensors(self._rows(chunk), self.pad_id))
            losses.mean().backward()  # opacus "mean" reduction: per-sample grads rescaled by the chunk size
            total += float(losses.detach().sum())
            dp_opt.signal_skip_step(do_skip=k < len(chunks) - 1)
            self._dp_step(gsm, dp_opt, step)
            dp_opt.zero_grad(set_to_none=True)
        return total

    def _dp_step(self, gsm: Any, dp_opt: Any, step: int) -> None:
        """opacus' DPOptimizer.step, with the anchor's gradient added to the noised one before the update: it reads
        no training data (text the merged model wrote, the current weights), so the step stays DP-SGD's."""
        if not dp_opt.pre_step():
            return  # a skipped (accumulating) chunk
        if self.anchor:
            gsm.disable_hooks()  # no per-example gradients: the anchor is not data
            try:
                self._anchor_backward(step)
            finally:
                gsm.enable_hooks()
        dp_opt.original_optimizer.step()


def save_adapter(model: Any, model_config: Any, config: TrainConfig, out_dir: Path) -> None:
    """Write peft's safetensors + config and the GGUF adapter into out_dir, checking the saved tensors."""
    from peft import get_peft_model_state_dict
    from safetensors.numpy import load_file

    from node.training.lora_export import LoraShape, write_gguf_lora

    out_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().numpy().copy() for k, v in get_peft_model_state_dict(model).items()}
    tmp = Path(tempfile.mkdtemp(dir=out_dir, prefix=".peft-"))
    try:
        model.save_pretrained(str(tmp), safe_serialization=True)
        saved = load_file(str(tmp / "adapter_model.safetensors"))
        if saved.keys() != state.keys() or any(not (saved[k] == state[k]).all() for k in state):
            raise RuntimeError("the saved adapter differs from the trained weights (opacus issue #820?)")
        for name in ADAPTER_FILES:
            with open(tmp / name, "rb+") as f:
                os.fchmod(f.fileno(), 0o644)
                os.fsync(f.fileno())
            os.replace(tmp / name, out_dir / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    shape = LoraShape(model_config.num_attention_heads, model_config.num_key_value_heads, alpha=config.alpha)
    write_gguf_lora(out_dir / "adapter.gguf", state, shape, permute_qk=True)
