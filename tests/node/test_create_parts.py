"""The parts of `mirador create` (node.create) on real text: Debian's license texts (base-files'
/usr/share/common-licenses), chunked without overlap, split, questions judged, answers drawn from their chunk,
keywords, and the personality appended to a manifest that keeps what it had."""

import re
import shutil
from pathlib import Path

import pytest

from node.adapters.personalities import ManifestError, PersonalitySpec, add_personality, load_manifest, route
from node.create.keywords import keywords
from node.create.sources import CHUNK_WORDS, ExamplesRefused, example_files, read_chunks, split_chunks
from node.create.synth import answer_from, judge

LICENSES = Path("/usr/share/common-licenses")
DESCRIPTION = "Explains software licenses: copyright, patents and redistribution"


@pytest.fixture
def examples(tmp_path: Path) -> Path:
    folder = tmp_path / "licenses"
    folder.mkdir()
    for name in ("Apache-2.0", "MPL-2.0"):
        shutil.copy(LICENSES / name, folder / f"{name.lower()}.txt")
    return folder


def flat(text: str) -> str:
    return " ".join(text.split())


def test_chunks_cover_each_file_once_without_overlap(examples: Path) -> None:
    # Act
    chunks = read_chunks(example_files([examples]))
    # Assert: every word of every file in exactly one chunk, in order; none longer than CHUNK_WORDS
    for path in sorted(examples.iterdir()):
        mine = [c.text for c in chunks if c.source == path.name]
        assert flat(" ".join(mine)) == flat(path.read_text())
        assert all(len(t.split()) <= CHUNK_WORDS for t in mine)
    assert len(chunks) > 10


def test_the_split_is_seeded_disjoint_and_holds_some_out(examples: Path) -> None:
    # Arrange
    chunks = read_chunks(example_files([examples]))
    # Act
    learn, held = split_chunks(chunks, 0.2, seed=3)
    again = split_chunks(chunks, 0.2, seed=3)
    # Assert
    assert (learn, held) == again and len(learn) + len(held) == len(chunks)
    assert not {c.text for c in learn} & {c.text for c in held}
    assert len(held) == round(0.2 * len(chunks))


def test_a_file_that_is_not_text_is_refused_by_name(tmp_path: Path) -> None:
    # Arrange
    odd = tmp_path / "scan.png"
    odd.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00")
    # Act / Assert
    with pytest.raises(ExamplesRefused, match=r"scan\.png"):
        read_chunks([odd])
    with pytest.raises(ExamplesRefused, match="at least 2"):
        split_chunks([], 0.2, 0)


def test_questions_are_judged_and_the_reasons_counted(examples: Path) -> None:
    # Arrange: a chunk of the Apache license
    chunk = next(c for c in read_chunks(example_files([examples])) if "patent" in c.text.casefold())
    seen: set[str] = set()
    # Act / Assert
    assert judge("Who may grant a patent license for the Work?", chunk.text, DESCRIPTION, seen) is None
    assert judge("who may GRANT a patent license, for the work", chunk.text, DESCRIPTION, seen) == "duplicate"
    assert judge("Why?", chunk.text, DESCRIPTION, seen) == "empty"
    assert judge("What does the passage say about it?", chunk.text, DESCRIPTION, seen) == "echo"
    assert judge("How do volcanoes erupt on Mars?", chunk.text, DESCRIPTION, seen) == "ungrounded"


def test_an_answer_is_the_chunks_own_text_from_the_best_matching_sentence(examples: Path) -> None:
    # Arrange
    chunk = next(c for c in read_chunks(example_files([examples])) if "Grant of Patent License" in c.text)
    # Act
    answer = answer_from(chunk.text, "What is the grant of patent license?")
    # Assert: whole sentences of the chunk, starting where the patent grant is
    assert answer in flat(chunk.text) and "patent" in answer.split(".")[0].casefold()


def test_keywords_come_from_the_description_then_the_examples(examples: Path) -> None:
    # Arrange
    chunks = read_chunks(example_files([examples]))
    # Act
    words = keywords(DESCRIPTION, chunks)
    # Assert: the description's words the examples use come first; the rest are the examples' widespread words
    assert words[0] in {"software", "licenses", "copyright", "patents", "redistribution"}
    assert "license" in words and len(words) == 8 and len(set(words)) == 8
    assert all(re.fullmatch(r"[a-z]{4,}", w) for w in words)


def test_a_personality_is_appended_and_the_manifest_keeps_what_it_had(tmp_path: Path) -> None:
    # Arrange
    manifest = tmp_path / "personalities.toml"
    manifest.write_text('# mine\n[personalities.chef]\nbase = "base"\nadapter = "cooking"\nload_on = ["recipe"]\n')
    spec = PersonalitySpec(base="base", adapter="licenses", load_on=["license", "patent"], description='A "quote"')
    # Act
    add_personality(manifest, "licenses", spec, ("m", "base"))
    # Assert
    text = manifest.read_text()
    assert text.startswith("# mine\n[personalities.chef]")
    found = load_manifest(manifest, ("m", "base"))
    assert [p.name for p in found] == ["chef", "licenses"] and found[1].description == 'A "quote"'
    assert route("auto", "Which patent terms apply?", found, ("m", "base")).personality == "licenses"
    with pytest.raises(ManifestError, match="exists already"):
        add_personality(manifest, "licenses", spec, ("m", "base"))
    assert manifest.read_text() == text
