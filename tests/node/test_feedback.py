"""Feedback on chat answers: stored in SQLite through the API, turned into training records."""

import json

import httpx
import pytest

from node.training.feedback import FeedbackRow, training_records
from tests.daemon_harness import Daemon


def post(daemon: Daemon, path: str, body: object) -> httpx.Response:
    return httpx.post(f"{daemon.url}{path}", json=body, headers=daemon.auth, timeout=30)


def test_feedback_on_a_chat_answer_is_stored(daemon: Daemon) -> None:
    # Arrange
    answer = daemon.chat("What is the capital of France?", max_tokens=8).json()
    # Act
    rated = post(daemon, "/v1/feedback", {"completion_id": answer["id"], "rating": 5})
    corrected = post(daemon, "/v1/feedback", {"completion_id": answer["id"], "rating": 2, "correction": "Paris."})
    poor = post(daemon, "/v1/feedback", {"completion_id": answer["id"], "rating": 1})
    # Assert
    assert rated.status_code == 200 and rated.json()["used_for_training"] is True
    assert corrected.json()["used_for_training"] is True and corrected.json()["id"] == rated.json()["id"] + 1
    assert poor.json()["used_for_training"] is False


def test_streamed_answers_can_get_feedback(daemon: Daemon) -> None:
    body = {"model": "base", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "stream": True}
    with httpx.stream("POST", f"{daemon.url}/v1/chat/completions", json=body, timeout=30) as resp:
        lines = list(resp.iter_lines())
    first = next(line for line in lines if line.startswith("data: {"))
    completion_id = json.loads(first[len("data: ") :])["id"]
    assert post(daemon, "/v1/feedback", {"completion_id": completion_id, "rating": 4}).status_code == 200


@pytest.mark.parametrize(
    ("body", "status", "needle"),
    [
        ({"completion_id": "chatcmpl-nope", "rating": 5}, 404, "no recent completion"),
        ({"completion_id": "x"}, 400, "give a rating"),
        ({"completion_id": "x", "rating": 9}, 400, "'rating'"),
        ({"completion_id": "x", "rating": "5"}, 400, "'rating'"),
        ({"completion_id": "x", "rating": 5, "extra": 1}, 400, "'extra'"),
        ({"rating": 5}, 400, "'completion_id': is required"),
    ],
)
def test_bad_feedback_is_refused(daemon: Daemon, body: dict, status: int, needle: str) -> None:
    response = post(daemon, "/v1/feedback", body)
    assert response.status_code == status
    assert needle in response.json()["error"]["message"]


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ({"adapter": "x"}, "exactly one of 'data'"),
        ({"adapter": "x", "data": "/tmp/a.txt", "from_feedback": True}, "exactly one of 'data'"),
        ({"adapter": "../x", "from_feedback": True}, "'adapter'"),
        ({"adapter": "x", "data": "{home}/data/missing.jsonl"}, "does not exist"),
        ({"adapter": "x", "from_feedback": True, "dp": {"epsilon": -1}}, "'dp.epsilon'"),
        ({"adapter": "x", "from_feedback": True, "target": "everything"}, "'target'"),
    ],
)
def test_bad_training_requests_are_refused(daemon: Daemon, body: dict, needle: str) -> None:
    if isinstance(body.get("data"), str):
        body = body | {"data": body["data"].format(home=daemon.home)}
    response = post(daemon, "/v1/train", body)
    assert response.status_code == 400
    assert needle in response.json()["error"]["message"]


def row(i: int, adapters: tuple[str, ...], rating: int | None, correction: str | None) -> FeedbackRow:
    return FeedbackRow(i, f"c{i}", "p", adapters, [{"role": "user", "content": f"q{i}"}], f"a{i}", rating, correction)


def test_training_records_take_corrections_and_good_answers_of_the_adapter() -> None:
    # Arrange
    rows = [
        row(1, ("finance@v1",), 5, None),  # good answer of finance: kept
        row(2, ("finance@v2", "cooking@v1"), 1, "better"),  # corrected: the correction is kept
        row(3, (), 4, None),  # the base answered: any adapter may learn from it
        row(4, ("finance@v1",), 2, None),  # poor, no correction: nothing to learn
        row(5, ("cooking@v1",), 5, None),  # another adapter's answer: not for finance
    ]
    # Act
    records = training_records(rows, "finance")
    # Assert
    assert [r["messages"][-1]["content"] for r in records] == ["a1", "better", "a3"]
    assert all(r["messages"][-1]["role"] == "assistant" for r in records)
