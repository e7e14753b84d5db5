"""The `load_on` keywords of a created personality: words of the description that the examples use too, then the
words most of the examples share (counted in how many chunks they appear, then how often; six letters or more)."""

from collections import Counter

from node.create.synth import content_word_list
from node.memory.documents import Chunk

MAX_KEYWORDS = 8
EXAMPLE_WORD_LETTERS = 6  # a word taken from the examples alone: short ones ("work", "terms") route too widely


def keywords(description: str, chunks: list[Chunk], limit: int = MAX_KEYWORDS) -> list[str]:
    """Up to `limit` keywords: the description's words found in the examples, then its others, then the examples'
    most widespread words (at most half the list from the description)."""
    spread: Counter[str] = Counter()
    total: Counter[str] = Counter()
    for chunk in chunks:
        words = content_word_list(chunk.text)
        spread.update(set(words))
        total.update(words)
    described = list(dict.fromkeys(content_word_list(description)))
    chosen = [w for w in described if spread[w]] + [w for w in described if not spread[w]]
    chosen = chosen[: max(1, limit // 2)]
    for word, _ in sorted(spread.items(), key=lambda item: (-item[1], -total[item[0]], item[0])):
        if len(chosen) >= limit:
            break
        if word not in chosen and len(word) >= EXAMPLE_WORD_LETTERS:
            chosen.append(word)
    return chosen
