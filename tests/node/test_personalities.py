"""The personality manifest and keyword routing."""

import pytest

from node.adapters.personalities import (
    ManifestError,
    Route,
    UnknownModelError,
    parse_manifest,
    route,
)
from node.core.profiles import PROFILES_DIR

BASE_IDS = ("smollm2-135m-instruct", "base")
MANIFEST = """
[personalities.financial_expert]
base = "smollm2-135m-instruct"
adapter = "finance"
load_on = ["budget", "investment", "tax", "tax return"]

[personalities.chef]
base = "smollm2-135m-instruct"
adapters = { cooking = 1.0, finance = 0.3 }
load_on = ["recipe", "bake", "dinner", "budget"]
"""


@pytest.fixture
def personalities() -> list:
    return parse_manifest(MANIFEST, "personalities.toml", BASE_IDS)


@pytest.mark.parametrize(
    ("message", "expected"),
    [
        ("How should I plan my BUDGET this year?", "financial_expert"),
        ("Is this investment taxable? What about tax?", "financial_expert"),
        ("Give me a recipe to bake bread for dinner", "chef"),
        ("A budget recipe for dinner", "chef"),  # 3 keywords beat 1
        ("A budget recipe", "chef"),  # 2 keywords beat 1
        ("Plan a budget", "financial_expert"),  # 1 each: manifest order breaks the tie
        ("What's the weather like?", None),
        ("taxes and budgeting", None),  # whole words only
        ("When is my tax return due?", "financial_expert"),
    ],
)
def test_keyword_routing(personalities: list, message: str, expected: str | None) -> None:
    assert route("auto", message, personalities, BASE_IDS).personality == expected
    assert route("smollm2-135m-instruct", message, personalities, BASE_IDS).personality == expected


def test_explicit_choices_skip_keywords(personalities: list) -> None:
    msg = "my budget"
    assert route("base", msg, personalities, BASE_IDS) == Route(None)
    assert route("base:finance", msg, personalities, BASE_IDS) == Route("base:finance", (("finance", 1.0),))
    both = route("base:fed-club+fed-club-me", msg, personalities, BASE_IDS)
    assert both == Route("base:fed-club+fed-club-me", (("fed-club", 1.0), ("fed-club-me", 1.0)))
    for bad in ("base:a+a", "base:a+", "base:+b", "base:a b"):
        with pytest.raises(UnknownModelError):
            route(bad, msg, personalities, BASE_IDS)
    chef = route("chef", msg, personalities, BASE_IDS)
    assert chef.personality == "chef" and chef.adapters == (("cooking", 1.0), ("finance", 0.3))
    assert chef.label == "chef" and Route(None).label == "base"


def test_unknown_model_is_an_error(personalities: list) -> None:
    with pytest.raises(UnknownModelError):
        route("gpt-9", "budget", personalities, BASE_IDS)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('[personalities.x]\nbase = "other-model"\nadapter = "a"\n', "base = 'other-model' is not the served model"),
        ('[personalities.x]\nbase = "base"\n', "exactly one of 'adapter'"),
        ('[personalities.x]\nbase = "base"\nadapter = "a"\nadapters = {b = 1.0}\n', "exactly one of 'adapter'"),
        (
            '[personalities.x]\nbase = "base"\nadapters = {b = 9.0}\n',
            "personality 'x': Expected `float` <= 4.0 - at `adapters[...]`",
        ),
        ('[personalities.x]\nbase = "base"\nadapter = "../etc"\n', "at `adapter`"),
        ('[personalities.base]\nbase = "base"\nadapter = "a"\n', "reserved"),
        ('[personalities.x]\nbase = "base"\nadapter = "a"\nload_on = ["!!"]\n', "without any word characters"),
        ('[personalities.x]\nbase = "base"\nadapter = "a"\ncolour = "red"\n', "colour"),
        ("[personalities.x\n", "not valid TOML"),
    ],
)
def test_bad_manifest_is_refused_with_the_reason(text: str, expected: str) -> None:
    with pytest.raises(ManifestError) as info:
        parse_manifest(text, "personalities.toml", BASE_IDS)
    assert expected in str(info.value)
    assert "personalities.toml" in str(info.value)


def test_shipped_example_is_valid() -> None:
    example = (PROFILES_DIR.parent / "personalities.toml").read_text()
    names = [p.name for p in parse_manifest(example, "configs/personalities.toml", BASE_IDS)]
    assert names == ["financial_expert", "chef"]
