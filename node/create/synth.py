"""Training pairs grounded in the examples: the base model asks a question a user of the described assistant might
ask about a chunk (under a grammar: one line ending in "?"), and the answer is drawn from the chunk itself (its
sentences from the one that best matches the question), so every answer is the examples' own text.

A question is dropped, with the reason counted, when it is empty, repeats one already kept (case and punctuation
aside), echoes the instructions, or is ungrounded: it shares no content word with its chunk."""

import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import trio

from node.inference.engine import GenerationRequest, InferenceEngine
from node.inference.llama_backend import SamplingParams
from node.inference.models import BaseModel
from node.memory.documents import Chunk

QUESTION_GRAMMAR = 'root ::= [A-Z] [^\\n?]{8,160} "?"'
ANSWER_CHARS = 600  # an answer is at least this much of its chunk (whole sentences) unless the chunk ends first
_WORD = re.compile(r"[^\W\d_]{4,}", re.UNICODE)
_SENTENCE = re.compile(r"(?<=[.!?;:])\s+|\n\n")
STOPWORDS = frozenset(
    [
        "about",
        "above",
        "after",
        "again",
        "against",
        "also",
        "among",
        "another",
        "because",
        "been",
        "before",
        "being",
        "below",
        "between",
        "both",
        "could",
        "does",
        "doing",
        "down",
        "during",
        "each",
        "either",
        "every",
        "from",
        "further",
        "have",
        "having",
        "here",
        "hers",
        "herself",
        "himself",
        "into",
        "itself",
        "just",
        "like",
        "more",
        "most",
        "much",
        "must",
        "myself",
        "neither",
        "never",
        "nothing",
        "once",
        "only",
        "other",
        "ought",
        "ours",
        "ourselves",
        "over",
        "same",
        "shall",
        "should",
        "some",
        "such",
        "than",
        "that",
        "their",
        "theirs",
        "them",
        "themselves",
        "then",
        "there",
        "these",
        "they",
        "this",
        "those",
        "through",
        "under",
        "until",
        "upon",
        "very",
        "were",
        "what",
        "when",
        "where",
        "which",
        "while",
        "whom",
        "whose",
        "will",
        "with",
        "within",
        "without",
        "would",
        "your",
        "yours",
        "yourself",
        "yourselves",
        "question",
        "questions",
        "text",
        "passage",
        "answer",
        "write",
        "assistant",
        "user",
    ]
)
DROP_REASONS = ("empty", "duplicate", "echo", "ungrounded")


@dataclass(frozen=True)
class Pair:
    """A synthesised training pair and the chunk it comes from."""

    question: str
    answer: str
    source: str
    chunk: int

    def record(self) -> dict[str, Any]:
        """The pair as a training record (chat messages: the loss is on the answer)."""
        return {"messages": [{"role": "user", "content": self.question}, {"role": "assistant", "content": self.answer}]}


@dataclass
class SynthReport:
    """How many questions were asked and kept, and why the others were dropped."""

    chunks: int = 0
    asked: int = 0
    kept: int = 0
    dropped: Counter[str] = field(default_factory=Counter)

    def summary(self) -> str:
        """One line for the user."""
        why = ", ".join(f"{self.dropped[r]} {r}" for r in DROP_REASONS if self.dropped[r]) or "none"
        return f"{self.kept} pairs kept of {self.asked} asked over {self.chunks} chunks (dropped: {why})"


def content_word_list(text: str) -> list[str]:
    """The words that carry meaning, in order: letters only, four or more, not a stop word, case-folded."""
    return [w for w in (m.casefold() for m in _WORD.findall(text)) if w not in STOPWORDS]


def content_words(text: str) -> set[str]:
    """The distinct content words of `text`."""
    return set(content_word_list(text))


def question_prompt(description: str, chunk: str) -> list[dict[str, str]]:
    """The chat that asks the base model for one question about `chunk`."""
    return [
        {
            "role": "user",
            "content": f"An assistant for this purpose: {description}\n\nA passage it knows:\n{chunk}\n\n"
            "Write one question a user of this assistant could ask that the passage answers.",
        }
    ]


def answer_from(chunk: str, question: str) -> str:
    """The chunk's sentences from the one sharing most content words with the question, until ANSWER_CHARS."""
    sentences = [s.strip() for s in _SENTENCE.split(chunk) if s.strip()]
    wanted = content_words(question)
    start = max(range(len(sentences)), key=lambda i: (len(content_words(sentences[i]) & wanted), -i))
    taken: list[str] = []
    for sentence in sentences[start:]:
        taken.append(sentence)
        if sum(len(s) + 1 for s in taken) >= ANSWER_CHARS:
            break
    return " ".join(taken)


def judge(question: str, chunk: str, description: str, seen: set[str]) -> str | None:
    """Why `question` is dropped (one of DROP_REASONS), or None to keep it (then it is added to `seen`)."""
    key = " ".join(re.findall(r"\w+", question.casefold()))
    if len(key) < 8:
        return "empty"
    if key in seen:
        return "duplicate"
    lowered = question.casefold()
    if "passage" in lowered or "assistant" in lowered or description.casefold()[:40] in lowered:
        return "echo"
    if not content_words(question) & content_words(chunk):
        return "ungrounded"
    seen.add(key)
    return None


async def synthesise(
    engine: InferenceEngine,
    model: BaseModel,
    description: str,
    chunks: list[Chunk],
    per_chunk: int,
    seed: int,
    on_asked: Callable[[int], None] | None = None,
) -> tuple[list[Pair], SynthReport]:
    """Ask `per_chunk` questions about each chunk (sampled, seeded; as many at once as the engine has slots), then
    keep the grounded ones, in chunk order, with their answers."""
    report = SynthReport(chunks=len(chunks))
    asked: dict[tuple[int, int], str | None] = {}  # None: the generation failed
    slots = trio.Semaphore(engine.slots)

    async def ask(n: int, k: int, tokens: list[int]) -> None:
        async with slots:
            sampling = SamplingParams(temperature=0.9, seed=seed + 1000 * n + k, grammar=QUESTION_GRAMMAR)
            job = await engine.submit(GenerationRequest(tokens, sampling, 64, stream=False), 600)
            text = "".join([d async for d in job.text()]).strip()
            await job.done.wait()
        asked[n, k] = None if job.error else text
        if on_asked is not None:
            on_asked(len(asked))

    async with trio.open_nursery() as nursery:
        for n, chunk in enumerate(chunks):
            tokens = model.chat_tokens(question_prompt(description, chunk.text))
            for k in range(per_chunk):
                nursery.start_soon(ask, n, k, tokens)
    pairs: list[Pair] = []
    seen: set[str] = set()
    for (n, _), question in sorted(asked.items()):
        chunk = chunks[n]
        report.asked += 1
        reason = "empty" if question is None else judge(question, chunk.text, description, seen)
        if reason is not None or question is None:
            report.dropped[reason or "empty"] += 1
            continue
        pairs.append(Pair(question, answer_from(chunk.text, question), chunk.source, chunk.position))
        report.kept += 1
    return pairs, report
