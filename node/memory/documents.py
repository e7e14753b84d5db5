"""Documents the user adds to memory: text out of .txt, .md and .pdf files, cut into overlapping chunks."""

from collections.abc import Iterator
from pathlib import Path

import msgspec

from node.memory.record import MemoryRefused

SUFFIXES = (".txt", ".md", ".markdown", ".pdf")
MAX_FILE_BYTES = 64 * 1024 * 1024
CHUNK_WORDS = 120  # all-MiniLM-L6-v2 reads 256 word pieces: ~120 English words leave room for long words
OVERLAP_WORDS = 30


class Chunk(msgspec.Struct, frozen=True):
    """A piece of a document: its text, the source it came from and its index there."""

    text: str
    source: str
    position: int


def read_text(path: Path) -> str:
    """The text of a .txt/.md file or of every page of a .pdf (pypdf), refused with a reason when unreadable."""
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise MemoryRefused("unreadable", f"{path}: only {', '.join(SUFFIXES)} files can be added to memory")
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise MemoryRefused("unreadable", f"{path}: {exc.strerror}") from None
    if size > MAX_FILE_BYTES:
        raise MemoryRefused("too_large", f"{path} is {size} bytes; at most {MAX_FILE_BYTES} can be added at once")
    if suffix == ".pdf":
        return _pdf_text(path)
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        raise MemoryRefused("unreadable", f"{path}: {exc.strerror}") from None


def _pdf_text(path: Path) -> str:
    from pypdf import PdfReader
    from pypdf.errors import PyPdfError

    try:
        reader = PdfReader(path)
        pages = [page.extract_text() or "" for page in reader.pages]
    except (PyPdfError, OSError, ValueError, KeyError) as exc:
        raise MemoryRefused("unreadable", f"{path} is not a readable PDF: {exc}") from None
    return "\n\n".join(pages)


def chunks(text: str, source: str, words: int = CHUNK_WORDS, overlap: int = OVERLAP_WORDS) -> list[Chunk]:
    """`text` cut into windows of `words` words, each starting `words - overlap` after the last; paragraphs that
    fit stay whole."""
    if not 0 <= overlap < words:
        raise ValueError("overlap must be smaller than the chunk")
    out: list[str] = []
    pending: list[str] = []
    for paragraph in _paragraphs(text):
        tokens = paragraph.split()
        if pending and len(pending) + len(tokens) > words:
            out.append(" ".join(pending))
            pending = pending[-overlap:] if overlap else []
        pending.extend(tokens)
        while len(pending) > words:
            out.append(" ".join(pending[:words]))
            pending = pending[words - overlap :]
    if pending and (not out or len(pending) > overlap):
        out.append(" ".join(pending))
    return [Chunk(t, source, i) for i, t in enumerate(out)]


def _paragraphs(text: str) -> Iterator[str]:
    for block in text.replace("\r\n", "\n").split("\n\n"):
        block = block.strip()
        if block:
            yield block


def files_under(path: Path) -> list[Path]:
    """`path` itself, or every readable kind of file under the folder `path`, in name order."""
    if path.is_dir():
        return sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in SUFFIXES)
    return [path]
