"""Stop strings across token boundaries and UTF-8 characters split across tokens."""

import pytest

from node.inference.textstream import StopMatcher, Utf8Stream


def feed(matcher: StopMatcher, pieces: list[str]) -> tuple[str, bool]:
    out = []
    for p in pieces:
        text, hit = matcher.push(p)
        out.append(text)
        if hit:
            return "".join(out), True
    return "".join(out) + matcher.flush(), False


@pytest.mark.parametrize(
    ("pieces", "stops", "expected", "hit"),
    [
        (["Hello", " wor", "ld", "!"], ["world"], "Hello ", True),
        (["ab", "c", "END", "more"], ["END"], "abc", True),
        (["a", "E", "N", "x"], ["END"], "aENx", False),  # a false start is released, not lost
        (["xx", "#", "#", "#"], ["###", "#!"], "xx", True),
        (["no stop here"], ["zzz"], "no stop here", False),
        (["first STOP", " then END"], ["END", "STOP"], "first ", True),  # earliest stop wins
    ],
)
def test_stop_matcher(pieces: list[str], stops: list[str], expected: str, hit: bool) -> None:
    assert feed(StopMatcher(stops), pieces) == (expected, hit)


def test_stop_matcher_holds_back_only_a_possible_prefix() -> None:
    m = StopMatcher(["</s>"])
    assert m.push("text <") == ("text ", False)
    assert m.push("b") == ("<b", False)


def test_utf8_character_split_across_tokens() -> None:
    data = "é😀".encode()
    s = Utf8Stream()
    out = [s.push(data[i : i + 1]) for i in range(len(data))]
    assert "".join(out) + s.flush() == "é😀"
    assert out[0] == ""  # nothing emitted before the character is complete


def test_utf8_incomplete_tail_becomes_replacement_character() -> None:
    s = Utf8Stream()
    assert s.push(b"ok\xf0\x9f") == "ok"
    assert s.flush() == "\ufffd"
