"""The examples `mirador create` learns from: files (or folders of them) read as memory reads documents (.txt, .md,
.pdf; node.memory.documents), cut into chunks without overlap (an unseen chunk must share no text with those learnt
from), and split into chunks to learn from and unseen chunks to evaluate on."""

import hashlib
import random
from collections.abc import Callable
from pathlib import Path

from crypto.refusal import SingleReason
from node.memory.documents import Chunk, chunks, files_under, read_text
from node.memory.record import MemoryRefused

CHUNK_WORDS = 150  # about 200 tokens of English
MAX_CHARS = 20_000_000  # of text over all files: far beyond what the trainer could use


class ExamplesRefused(SingleReason):
    """Examples that cannot be used; the detail names the file and says why."""

    REASON = "examples_refused"


def example_files(paths: list[Path]) -> list[Path]:
    """The files given, a folder standing for the readable files under it."""
    return [f for p in paths for f in files_under(p)]


def examples_digest(files: list[Path]) -> str:
    """The examples' identity for the privacy ledger: sha256 over their sorted sha256s (order and names aside)."""
    from crypto.statement import sha256_file

    return hashlib.sha256("".join(sorted(sha256_file(f) for f in files)).encode()).hexdigest()


def read_chunks(files: list[Path], on_file: Callable[[], None] | None = None) -> list[Chunk]:
    """Every chunk of every file, in the order given."""
    out: list[Chunk] = []
    total = 0
    try:
        for path in files:
            text = read_text(path)
            total += len(text)
            if total > MAX_CHARS:
                raise ExamplesRefused(f"the examples hold more than {MAX_CHARS} characters of text; give fewer files")
            out += chunks(text, path.name, CHUNK_WORDS, overlap=0)
            if on_file is not None:
                on_file()
    except MemoryRefused as exc:
        raise ExamplesRefused(exc.detail) from None
    return out


def split_chunks(all_chunks: list[Chunk], held_fraction: float, seed: int) -> tuple[list[Chunk], list[Chunk]]:
    """(to learn from, unseen for evaluation): a seeded share held out, at least one on each side."""
    if len(all_chunks) < 2:
        raise ExamplesRefused(f"the examples give {len(all_chunks)} chunk(s) of text; at least 2 are needed")
    order = list(range(len(all_chunks)))
    random.Random(seed).shuffle(order)
    n_held = min(len(all_chunks) - 1, max(1, round(len(all_chunks) * held_fraction)))
    held = set(order[:n_held])
    return [c for i, c in enumerate(all_chunks) if i not in held], [c for i, c in enumerate(all_chunks) if i in held]
