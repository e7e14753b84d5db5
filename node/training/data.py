"""Training data: `.txt` paragraphs or `.jsonl` records ({"text"} or chat {"messages"}) -> validated examples.

Every error names its source and 1-based line (`data.jsonl:7: ...`); errors about the whole file (suffix, size,
encoding, no examples) name the file. No torch here: the daemon can validate data before starting a training job.
"""

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import msgspec

Role = Literal["system", "user", "assistant"]
MAX_DATA_BYTES = 512 * 1024 * 1024
SUFFIXES = (".txt", ".jsonl")
_MESSAGES_HINT = "'messages' must be a list of {role, content} objects, role one of system, user, assistant"
_PATH_RE = re.compile(r" - at `\$(?P<path>[^`]*)`$")


class DataError(ValueError):
    """The training data is unusable; the message names the source, the line and what is wrong."""


@dataclass(frozen=True)
class Message:
    """One chat turn."""

    role: Role
    content: str


@dataclass(frozen=True)
class Example:
    """One training example: plain `text` (loss on every token) or chat `messages` (loss on assistant turns)."""

    text: str | None = None
    messages: tuple[Message, ...] | None = None
    where: str = field(default="", compare=False)  # "data.jsonl:7", for error messages

    def __post_init__(self) -> None:
        if (self.text is None) == (self.messages is None):
            raise ValueError("an Example has either text or messages")


class _Message(msgspec.Struct, forbid_unknown_fields=True):
    role: Role
    content: str


class _Record(msgspec.Struct, forbid_unknown_fields=True):
    text: str | msgspec.UnsetType = msgspec.UNSET
    messages: list[_Message] | msgspec.UnsetType = msgspec.UNSET


_DECODER = msgspec.json.Decoder(_Record)


def load_examples(path: Path, max_bytes: int = MAX_DATA_BYTES) -> list[Example]:
    """Read and validate a `.txt` or `.jsonl` training file; raise DataError naming file:line on any problem."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise DataError(f"{path}: unknown data format {path.suffix or '(no suffix)'!r}; use .txt or .jsonl")
    try:
        size = path.stat().st_size
        if size > max_bytes:
            raise DataError(f"{path}: {size} bytes, more than the limit of {max_bytes} bytes")
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(f"{path}: cannot read: {exc.strerror or exc}") from None
    text = _decode_utf8(raw, str(path))
    examples = _from_txt(text, str(path)) if suffix == ".txt" else _from_jsonl(text, str(path))
    if not examples:
        raise DataError(f"{path}: no examples (the file is empty or holds only blank lines)")
    return examples


def examples_from_records(records: Iterable[Any], source: str) -> list[Example]:
    """Validate already-parsed records ({"text"} or {"messages"}); record i is reported as `source:i` (1-based)."""
    examples = []
    for i, obj in enumerate(records, start=1):
        where = f"{source}:{i}"
        try:
            record = msgspec.convert(obj, _Record)
        except msgspec.ValidationError as exc:
            raise DataError(f"{where}: {_explain(str(exc))}") from None
        examples.append(_to_example(record, where))
    if not examples:
        raise DataError(f"{source}: no examples")
    return examples


def _decode_utf8(raw: bytes, source: str) -> str:
    try:
        return raw.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise DataError(f"{source}:{line}: not UTF-8 text (byte {raw[exc.start]:#04x})") from None


def _from_txt(text: str, source: str) -> list[Example]:
    examples: list[Example] = []
    lines: list[str] = []
    start = 0
    for number, line in enumerate([*text.split("\n"), ""], start=1):
        if line.strip():
            if not lines:
                start = number
            lines.append(line.rstrip())
        elif lines:
            examples.append(Example(text="\n".join(lines), where=f"{source}:{start}"))
            lines = []
    return examples


def _from_jsonl(text: str, source: str) -> list[Example]:
    examples = []
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        where = f"{source}:{number}"
        try:
            record = _DECODER.decode(line)
        except msgspec.ValidationError as exc:
            raise DataError(f"{where}: {_explain(str(exc))}") from None
        except (msgspec.DecodeError, UnicodeDecodeError) as exc:
            raise DataError(f"{where}: invalid JSON ({str(exc).removeprefix('JSON is malformed: ')})") from None
        examples.append(_to_example(record, where))
    return examples


def _explain(msg: str) -> str:
    """msgspec's message, with a hint for the field it is about."""
    m = _PATH_RE.search(msg)
    path = m.group("path") if m else ""
    reason = msg[: m.start()] if m else msg
    if path == "" and reason.startswith("Expected `object`"):
        return f"each line must be a JSON object with 'text' or 'messages' ({reason})"
    if path == "" and reason.startswith("Object contains unknown field"):
        return f"{reason}; the keys are 'text' or 'messages'"
    if path.startswith(".messages"):
        return f"{_MESSAGES_HINT} ({reason} at {path[1:]})"
    if path:
        return f"{reason} at {path[1:]}"
    return reason


def _to_example(record: _Record, where: str) -> Example:
    has_text = not isinstance(record.text, msgspec.UnsetType)
    has_messages = not isinstance(record.messages, msgspec.UnsetType)
    if has_text == has_messages:
        raise DataError(f"{where}: a record needs exactly one of 'text' or 'messages'")
    if not isinstance(record.text, msgspec.UnsetType):
        if not record.text.strip():
            raise DataError(f"{where}: 'text' is empty")
        return Example(text=record.text, where=where)
    assert not isinstance(record.messages, msgspec.UnsetType)
    messages = record.messages
    if not messages:
        raise DataError(f"{where}: 'messages' is empty")
    for i, m in enumerate(messages):
        if not m.content.strip():
            raise DataError(f"{where}: messages[{i}] ({m.role}) has empty content")
        if m.role == "system" and i != 0:
            raise DataError(f"{where}: messages[{i}]: a system message may only come first")
    if not any(m.role == "assistant" for m in messages):
        raise DataError(f"{where}: no assistant message (the loss is on assistant turns; use 'text' for plain text)")
    return Example(messages=tuple(Message(m.role, m.content) for m in messages), where=where)
