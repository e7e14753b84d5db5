"""Training data files: every format parses; every bad input is refused naming the file and line."""

import json
import re
from pathlib import Path

import pytest

from node.training.data import DataError, Example, Message, examples_from_records, load_examples


def write(path: Path, text: str | bytes) -> Path:
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def test_txt_paragraphs_are_examples(tmp_path: Path) -> None:
    # Arrange
    path = write(tmp_path / "notes.txt", "First paragraph,\nstill the first.\n\n\n  \nSecond one.\n\nThird.")
    # Act
    examples = load_examples(path)
    # Assert
    assert [e.text for e in examples] == ["First paragraph,\nstill the first.", "Second one.", "Third."]
    assert [e.where for e in examples] == [f"{path}:1", f"{path}:6", f"{path}:8"]


def test_jsonl_text_and_chat_records(tmp_path: Path) -> None:
    # Arrange
    chat = {
        "messages": [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Capital of France?"},
            {"role": "assistant", "content": "Paris."},
        ]
    }
    lines = [json.dumps({"text": "A plain example."}), "", "   ", json.dumps(chat)]
    path = write(tmp_path / "data.jsonl", "\n".join(lines) + "\n")
    # Act
    examples = load_examples(path)
    # Assert
    assert examples == [
        Example(text="A plain example."),
        Example(
            messages=(
                Message("system", "You are terse."),
                Message("user", "Capital of France?"),
                Message("assistant", "Paris."),
            )
        ),
    ]
    assert examples[1].where == f"{path}:4"


def test_a_utf8_bom_and_crlf_are_accepted(tmp_path: Path) -> None:
    # Arrange
    path = write(tmp_path / "d.jsonl", b'\xef\xbb\xbf{"text": "caf\xc3\xa9"}\r\n{"text": "b"}\r\n')
    # Act
    examples = load_examples(path)
    # Assert
    assert [e.text for e in examples] == ["café", "b"]


def test_records_from_a_database_become_examples() -> None:
    # Arrange
    records = [
        {"text": "kept"},
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
    ]
    # Act
    examples = examples_from_records(records, "feedback")
    # Assert
    assert examples[0].text == "kept" and examples[1].messages is not None
    assert examples[1].where == "feedback:2"


def test_a_bad_record_names_its_source_and_index() -> None:
    # Arrange
    records = [{"text": "ok"}, {"messages": [{"role": "user", "content": "no answer"}]}]
    # Act / Assert
    with pytest.raises(DataError, match=r"^feedback:2: no assistant message"):
        examples_from_records(records, "feedback")


USER_OK = {"role": "user", "content": "q"}
ASSISTANT_OK = {"role": "assistant", "content": "a"}
GOOD = json.dumps({"text": "fine"})

BAD_JSONL = [
    ("invalid-json", '{"text": "unterminated', r":2: invalid JSON"),
    ("not-an-object", "[1, 2]", r":2: each line must be a JSON object"),
    ("unknown-key", json.dumps({"text": "x", "label": 1}), r":2: Object contains unknown field `label`"),
    ("both-keys", json.dumps({"text": "x", "messages": [ASSISTANT_OK]}), r":2: a record needs exactly one of"),
    ("neither-key", "{}", r":2: a record needs exactly one of"),
    ("empty-text", json.dumps({"text": "  \n"}), r":2: 'text' is empty"),
    ("text-not-string", json.dumps({"text": 5}), r":2: Expected `str`, got `int` at text"),
    ("messages-not-list", json.dumps({"messages": "hi"}), r":2: 'messages' must be a list of \{role, content\}"),
    ("wrong-role", json.dumps({"messages": [{"role": "bot", "content": "x"}]}), r":2: .*Invalid enum value 'bot'"),
    ("missing-content", json.dumps({"messages": [{"role": "user"}]}), r":2: .*missing required field `content`"),
    ("message-extra-key", json.dumps({"messages": [{**ASSISTANT_OK, "name": "x"}]}), r":2: .*unknown field `name`"),
    ("no-assistant", json.dumps({"messages": [USER_OK]}), r":2: no assistant message"),
    ("empty-messages", json.dumps({"messages": []}), r":2: 'messages' is empty"),
    ("empty-content", json.dumps({"messages": [USER_OK, {"role": "assistant", "content": ""}]}), r":2: messages\[1\]"),
    (
        "late-system",
        json.dumps({"messages": [USER_OK, {"role": "system", "content": "s"}, ASSISTANT_OK]}),
        r":2: .*system",
    ),
]


@pytest.mark.parametrize(("line", "pattern"), [(b[1], b[2]) for b in BAD_JSONL], ids=[b[0] for b in BAD_JSONL])
def test_bad_jsonl_lines_name_file_and_line(tmp_path: Path, line: str, pattern: str) -> None:
    # Arrange: a good line, the bad one on line 2, another good line
    path = write(tmp_path / "data.jsonl", f"{GOOD}\n{line}\n{GOOD}\n")
    # Act / Assert
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}{pattern}"):
        load_examples(path)


BAD_FILES = [
    ("unknown-suffix", "data.csv", b"text\nhello\n", r": unknown data format '.csv'"),
    ("no-suffix", "data", b"hello\n", r": unknown data format '\(no suffix\)'"),
    ("empty-txt", "data.txt", b"\n \n\n", r": no examples"),
    ("empty-jsonl", "data.jsonl", b"", r": no examples"),
    ("not-utf8-txt", "data.txt", b"line one\nline two\nbad \xff byte\n", r":3: not UTF-8 text \(byte 0xff\)"),
    ("not-utf8-jsonl", "data.jsonl", b'{"text": "a"}\n{"text": "\xc3("}\n', r":2: not UTF-8 text"),
]


@pytest.mark.parametrize(("name", "content", "pattern"), [b[1:] for b in BAD_FILES], ids=[b[0] for b in BAD_FILES])
def test_bad_files_are_refused(tmp_path: Path, name: str, content: bytes, pattern: str) -> None:
    # Arrange
    path = write(tmp_path / name, content)
    # Act / Assert
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}{pattern}"):
        load_examples(path)


def test_a_file_over_the_size_limit_is_refused_before_reading(tmp_path: Path) -> None:
    # Arrange
    path = write(tmp_path / "big.txt", "x" * 2000)
    # Act / Assert
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}: 2000 bytes, more than the limit of 1024 bytes"):
        load_examples(path, max_bytes=1024)


def test_a_missing_file_is_a_data_error(tmp_path: Path) -> None:
    # Arrange
    path = tmp_path / "absent.jsonl"
    # Act / Assert
    with pytest.raises(DataError, match=r"absent.jsonl: cannot read"):
        load_examples(path)
