"""`mirador create` end to end on real text (Debian's Apache-2.0 and MPL-2.0 license texts): a dry run shows
grounded pairs and installs nothing; the real run installs a personality that the running node serves, routes to
by one of its keywords, and whose adapter lowers the loss on chunks of the examples it never saw."""

import json
import re
import shutil
from pathlib import Path

import httpx
import pytest

from tests.daemon_harness import Daemon, run_cli, running

LICENSES = Path("/usr/share/common-licenses")
DESCRIPTION = "Explains software licenses: copyright, patents and redistribution"

pytestmark = pytest.mark.slow  # the base model writes questions, then torch trains


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Daemon:
    root = tmp_path_factory.mktemp("create")
    yield from running(root / "home")


@pytest.fixture(scope="module")
def examples(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("examples")
    for name in ("Apache-2.0", "MPL-2.0"):
        shutil.copy(LICENSES / name, folder / f"{name.lower()}.txt")
    return folder


def create(node: Daemon, examples: Path, *extra: str) -> "object":
    return run_cli(
        node.home,
        node.port,
        "create",
        DESCRIPTION,
        "--examples",
        str(examples),
        "--name",
        "licenses",
        "--per-chunk",
        "1",
        "--steps",
        "20",
        *extra,
        timeout=900,
    )


def test_a_dry_run_shows_grounded_pairs_and_installs_nothing(node: Daemon, examples: Path) -> None:
    # Act
    done = create(node, examples, "--dry-run")
    # Assert
    assert done.returncode == 0, done.stderr
    kept = re.search(r"(\d+) pairs kept of (\d+) asked over (\d+) chunks", done.stdout)
    assert kept is not None and 2 <= int(kept[1]) <= int(kept[2]) == int(kept[3])
    answers = re.findall(r"^A: (.+)$", done.stdout, re.MULTILINE)
    corpus = " ".join(" ".join(p.read_text().split()) for p in examples.iterdir())
    assert len(answers) == int(kept[1]) and all(a[:80] in corpus for a in answers)  # drawn from the examples
    assert "dry run: nothing trained or installed" in done.stdout
    assert not (node.home / "personalities.toml").exists() and not (node.home / "adapters" / "licenses").exists()


def test_create_installs_a_personality_that_serves_routes_and_learnt(node: Daemon, examples: Path) -> None:
    # Act
    done = create(node, examples)
    # Assert: created, with the loss on unseen chunks lower than the base's
    assert done.returncode == 0, done.stderr + done.stdout
    loss = re.search(r"held-out loss on (\d+) unseen chunks ([\d.]+) → ([\d.]+)", done.stdout)
    assert loss is not None and int(loss[1]) >= 2
    assert float(loss[3]) < float(loss[2])
    words = re.search(r"routes on: (.+)", done.stdout)
    assert words is not None
    keyword = words[1].split(", ")[0]
    # Assert: the running node serves it, and a message with one of its keywords is routed to it
    message = {"role": "user", "content": f"Tell me about {keyword}."}
    reply = httpx.post(
        f"{node.url}/v1/chat/completions",
        json={"model": "auto", "messages": [message], "max_tokens": 8, "temperature": 0},
        timeout=60,
    )
    assert reply.status_code == 200, reply.text
    assert reply.json()["personality"] == "licenses"
    assert reply.headers["x-mirador-adapters"].startswith("licenses@")
    provenance = json.loads(next((node.home / "adapters" / "licenses").rglob("provenance.json")).read_text())
    assert provenance["created"]["description"] == DESCRIPTION and provenance["dp"] is False
