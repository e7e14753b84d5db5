"""What a namespace's memories teach: `mirador train --from-memory` turns them into training records.

Order (the first records are kept when there are more than MAX_RECORDS): corrections, well-rated chat exchanges,
documents and notes, then chat exchanges nobody rated; exchanges rated below GOOD_RATING are left out. An adapter
trained so carries `provenance.json` naming the namespace, and is never published: memory never leaves the node.
"""

from collections.abc import Iterable
from typing import Any

from node.memory.record import Memory
from node.training.feedback import GOOD_RATING

MAX_RECORDS = 10_000
PROVENANCE = "memory"  # the key of provenance.json that marks an adapter trained on memory


def _exchange(text: str, answer_label: str) -> dict[str, Any] | None:
    head, sep, answer = text.partition(f"\n{answer_label}: ")
    if not sep or not head.startswith("User: ") or not answer.strip():
        return None
    return {
        "messages": [{"role": "user", "content": head[6:].strip()}, {"role": "assistant", "content": answer.strip()}]
    }


def memory_records(memories: Iterable[Memory], ratings: dict[str, int]) -> list[dict[str, Any]]:
    """Training records ({"messages"} or {"text"}) from memories; `ratings` maps completion ids to their rating."""
    corrections: list[dict[str, Any]] = []
    rated: list[dict[str, Any]] = []
    texts: list[dict[str, Any]] = []
    unrated: list[dict[str, Any]] = []
    for m in memories:
        if m.kind == "correction":
            record = _exchange(m.text, "Correct answer")
            if record is not None:
                corrections.append(record)
        elif m.kind == "chat":
            record = _exchange(m.text, "Assistant")
            rating = ratings.get(m.source)
            if record is None or (rating is not None and rating < GOOD_RATING):
                continue
            (rated if rating is not None else unrated).append(record)
        else:
            texts.append({"text": m.text})
    return [*corrections, *rated, *texts, *unrated][:MAX_RECORDS]
