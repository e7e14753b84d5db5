"""Chains: multi-model pipelines, written as YAML and schema-checked.

    name: brief-then-translate
    version: 1.0.0
    description: summarize, then translate the summary
    steps:
      - personality: financial_expert          # a personality of the node that runs the chain
        prompt: "Summarize for a busy reader: {input}"
      - model: translator@1.2.0                # or an artifact, name@version (pulled with the chain)
        prompt: "Translate into French: {previous}"

A prompt may use `{input}` (the chain's input) and `{previous}` (the previous step's answer; not in the first
step); no other placeholders. YAML is read with `safe_load` only.
"""

import re
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import msgspec
import yaml

from marketplace.manifest import NAME_RE
from marketplace.semver import SemVer, VersionError

MAX_CHAIN_BYTES = 64 * 1024
PLACEHOLDERS = frozenset({"input", "previous"})
_REF = re.compile(r"^([a-z0-9][a-z0-9._-]{0,63})@(.+)$")


class ChainError(ValueError):
    """The chain file is refused; the message names the step and field."""


class _Step(msgspec.Struct, forbid_unknown_fields=True):
    prompt: Annotated[str, msgspec.Meta(min_length=1, max_length=8192)]
    personality: Annotated[str, msgspec.Meta(max_length=64)] | None = None
    model: Annotated[str, msgspec.Meta(max_length=130)] | None = None


class _Chain(msgspec.Struct, forbid_unknown_fields=True):
    name: Annotated[str, msgspec.Meta(pattern=NAME_RE)]
    version: str
    steps: Annotated[list[_Step], msgspec.Meta(min_length=1, max_length=16)]
    description: Annotated[str, msgspec.Meta(max_length=4096)] = ""


@dataclass(frozen=True)
class Step:
    """One step: who answers (a personality, or an artifact name@version) and the prompt template."""

    prompt: str
    personality: str | None
    model: tuple[str, str] | None  # (name, version)


@dataclass(frozen=True)
class Chain:
    """A validated chain."""

    name: str
    version: str
    description: str
    steps: tuple[Step, ...]

    def references(self) -> list[tuple[str, str]]:
        """The artifacts (name, version) the chain uses, in step order, without repeats."""
        seen: list[tuple[str, str]] = []
        for step in self.steps:
            if step.model is not None and step.model not in seen:
                seen.append(step.model)
        return seen


def parse_chain(text: str, source: str) -> Chain:
    """Validate chain YAML; errors name `source`, the step and the field."""
    if len(text.encode("utf-8")) > MAX_CHAIN_BYTES:
        raise ChainError(f"{source}: larger than {MAX_CHAIN_BYTES} bytes")
    try:
        data: Any = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ChainError(f"{source}: not valid YAML: {exc}") from None
    try:
        raw = msgspec.convert(data, _Chain)
    except msgspec.ValidationError as exc:
        raise ChainError(f"{source}: {str(exc).replace('$.', '')}") from None
    try:
        SemVer.parse(raw.version)
    except VersionError as exc:
        raise ChainError(f"{source}: version: {exc}") from None
    steps = []
    for i, s in enumerate(raw.steps, start=1):
        where = f"{source}: step {i}"
        if (s.personality is None) == (s.model is None):
            raise ChainError(f"{where}: give exactly one of 'personality' or 'model' (name@version)")
        model = None
        if s.model is not None:
            m = _REF.match(s.model)
            if m is None:
                raise ChainError(f"{where}: model {s.model!r} must be name@version")
            try:
                SemVer.parse(m.group(2))
            except VersionError as exc:
                raise ChainError(f"{where}: model: {exc}") from None
            model = (m.group(1), m.group(2))
        _check_template(s.prompt, where, first=i == 1)
        steps.append(Step(s.prompt, s.personality, model))
    return Chain(raw.name, raw.version, raw.description, tuple(steps))


def load_chain(path: Path) -> Chain:
    """Read and validate a chain file."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ChainError(f"{path}: cannot read: {exc}") from None
    return parse_chain(text, str(path))


def _check_template(prompt: str, where: str, first: bool) -> None:
    try:
        fields = {f for _, f, _, _ in string.Formatter().parse(prompt) if f is not None}
    except ValueError as exc:
        raise ChainError(f"{where}: prompt: {exc} (write literal braces as {{{{ and }}}})") from None
    unknown = fields - PLACEHOLDERS
    if unknown:
        raise ChainError(f"{where}: prompt uses {sorted(unknown)}; only {{input}} and {{previous}} exist")
    if first and "previous" in fields:
        raise ChainError(f"{where}: the first step has no {{previous}} answer")


def render(step: Step, chain_input: str, previous: str | None) -> str:
    """The prompt of `step` with its placeholders filled."""
    return step.prompt.format(input=chain_input, previous=previous or "")
