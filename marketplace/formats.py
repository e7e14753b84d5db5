"""Fail-fast header checks of the file formats an artifact may carry (GGUF, safetensors), before anything uses them.

Pickle-based formats are refused by name elsewhere (marketplace.manifest); here a file that claims to be GGUF or
safetensors must parse, and every tensor it declares must lie inside the file.
"""

import json
import struct
from pathlib import Path

from crypto.refusal import SingleReason

MAX_SAFETENSORS_HEADER = 100 * 1024 * 1024


class FormatError(SingleReason):
    """The file's header does not parse; the message says where."""

    REASON = "bad_format"


def check_safetensors(path: Path) -> None:
    """Parse a safetensors header (u64 length + JSON) and check every tensor's byte range."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise FormatError(f"{path.name}: not safetensors (shorter than its 8-byte header length)")
        (n,) = struct.unpack("<Q", head)
        if n > min(MAX_SAFETENSORS_HEADER, size - 8):
            raise FormatError(f"{path.name}: safetensors header length {n} exceeds the file")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise FormatError(f"{path.name}: safetensors header is not JSON ({exc})") from None
    if not isinstance(header, dict):
        raise FormatError(f"{path.name}: safetensors header is not a JSON object")
    data = size - 8 - n
    for name, info in header.items():
        if name == "__metadata__":
            continue
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
            raise FormatError(f"{path.name}: tensor {name!r} has no valid data_offsets")
        start, end = offsets
        if not 0 <= start <= end <= data:
            raise FormatError(f"{path.name}: tensor {name!r} lies outside the file (truncated?)")


def check_gguf(path: Path) -> None:
    """Parse a GGUF header with gguf-py and check every tensor lies inside the file."""
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise FormatError(f"{path.name}: not a GGUF file (starts with {magic!r})")
    import gguf

    try:
        reader = gguf.GGUFReader(path)
    except Exception as exc:  # gguf-py raises ValueError, IndexError, struct errors... on damaged files
        raise FormatError(f"{path.name}: GGUF header does not parse ({type(exc).__name__}: {exc})") from None
    size = path.stat().st_size
    for t in reader.tensors:
        if t.data_offset + t.n_bytes > size:
            raise FormatError(f"{path.name}: tensor {t.name} ends past the end of the file (truncated)")


def check_file_format(path: Path) -> None:
    """Check the header of GGUF and safetensors files; other (text) files pass."""
    suffix = path.suffix.lower()
    if suffix == ".gguf":
        check_gguf(path)
    elif suffix == ".safetensors":
        check_safetensors(path)
