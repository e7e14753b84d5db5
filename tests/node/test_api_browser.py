"""A web page against a real daemon: what a browser sends for a page on another site (a `text/plain` POST that
skips the CORS preflight, a cross-origin JSON POST and its preflight, a DNS-rebinding read whose Host names the
attacker's domain) is refused before any route runs; allowed origins get CORS answers (issue 14, finding 3)."""

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.daemon_harness import Daemon, start_daemon

WEB_APP = "http://localhost:3000"


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Daemon, Path]]:
    """A daemon that allows one web origin; a file a page would like it to train on."""
    tmp = tmp_path_factory.mktemp("browser")
    d = start_daemon(tmp / "home", {"MIRADOR_API_ALLOWED_ORIGINS": WEB_APP})
    try:
        notes = d.home / "data" / "notes.txt"  # the API reads data under MIRADOR_HOME/data only
        notes.parent.mkdir()
        notes.write_text("private notes\n")
        yield d, notes
    finally:
        d.stop()


def federations(d: Daemon) -> list[str]:
    return [f["name"] for f in httpx.get(f"{d.url}/v1/federations", timeout=10).json()["federations"]]


def test_a_text_plain_post_is_refused_and_changes_nothing(daemon: tuple[Daemon, Path]) -> None:
    # Arrange: what <form enctype="text/plain"> or fetch(..., {mode: "no-cors"}) sends: no preflight, no Origin check
    d, notes = daemon
    body = json.dumps({"name": "leak", "mode": "dp", "data": str(notes)})

    # Act
    resp = httpx.post(f"{d.url}/v1/federations", content=body, headers={"content-type": "text/plain"}, timeout=30)

    # Assert
    assert resp.status_code == 415, resp.text
    assert resp.json()["error"]["code"] == "unsupported_media_type"
    assert "leak" not in federations(d)


@pytest.mark.parametrize("host", ["attacker.example:8484", "attacker.example", "127.0.0.1.nip.io"])
def test_a_dns_rebinding_read_is_refused(daemon: tuple[Daemon, Path], host: str) -> None:
    # Arrange: the page's own name now resolves to 127.0.0.1; the browser sends that name as Host
    d, _ = daemon

    # Act
    resp = httpx.get(f"{d.url}/v1/node/status", headers={"host": host}, timeout=10)

    # Assert
    assert resp.status_code == 403 and resp.json()["error"]["code"] == "host_not_allowed"
    assert "peer_id" not in resp.text


@pytest.mark.parametrize("host", ["localhost", "127.0.0.1", "[::1]"])
def test_local_names_are_this_node(daemon: tuple[Daemon, Path], host: str) -> None:
    d, _ = daemon

    resp = httpx.get(f"{d.url}/health", headers={"host": f"{host}:{d.port}"}, timeout=10)

    assert resp.status_code == 200


def test_a_cross_origin_request_is_refused_with_its_preflight(daemon: tuple[Daemon, Path]) -> None:
    # Arrange
    d, notes = daemon
    evil = {"origin": "https://evil.example"}
    preflight_headers = evil | {"access-control-request-method": "POST"}

    # Act
    preflight = httpx.options(f"{d.url}/v1/federations", headers=preflight_headers, timeout=10)
    post = httpx.post(f"{d.url}/v1/federations", json={"name": "x", "data": str(notes)}, headers=evil, timeout=30)
    read = httpx.get(f"{d.url}/v1/models", headers={"sec-fetch-site": "cross-site"}, timeout=10)

    # Assert
    for resp in (preflight, post, read):
        assert resp.status_code == 403 and resp.json()["error"]["code"] == "origin_not_allowed", resp.text
        assert "access-control-allow-origin" not in resp.headers
    assert "x" not in federations(d)


def test_an_allowed_origin_gets_cors_answers(daemon: tuple[Daemon, Path]) -> None:
    # Arrange
    d, _ = daemon
    headers = {"origin": WEB_APP, "sec-fetch-site": "same-site"}

    # Act
    preflight = httpx.options(
        f"{d.url}/v1/chat/completions", headers=headers | {"access-control-request-method": "POST"}, timeout=10
    )
    chat = httpx.post(
        f"{d.url}/v1/chat/completions",
        json={"model": "base", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2},
        headers=headers,
        timeout=60,
    )

    # Assert
    assert preflight.status_code == 204
    assert preflight.headers["access-control-allow-origin"] == WEB_APP
    assert "POST" in preflight.headers["access-control-allow-methods"]
    assert chat.status_code == 200 and chat.headers["access-control-allow-origin"] == WEB_APP


def test_a_change_needs_the_home_token_and_inference_does_not(daemon: tuple[Daemon, Path]) -> None:
    # Arrange: another local user (or a page that got past the browser guard) knows the port, not the token
    d, notes = daemon
    spec = {"name": "needs-token", "mode": "he", "data": str(notes)}

    # Act
    without = httpx.post(f"{d.url}/v1/federations", json=spec, timeout=30)
    wrong = httpx.post(f"{d.url}/v1/federations", json=spec, headers={"Authorization": "Bearer guess"}, timeout=30)
    chat = d.chat()

    # Assert
    for resp in (without, wrong):
        assert resp.status_code == 401 and resp.json()["error"]["code"] == "invalid_api_key", resp.text
    assert "needs-token" not in federations(d)
    assert chat.status_code == 200
    assert (d.home / "api.token").stat().st_mode & 0o777 == 0o600
    created = httpx.post(f"{d.url}/v1/federations", json=spec, headers=d.auth, timeout=60)
    assert created.status_code == 200, created.text


@pytest.mark.parametrize("path", ["/etc/hostname", "/etc/no-such-file", "../../etc/hostname"])
def test_the_api_reads_no_file_outside_the_data_folders(daemon: tuple[Daemon, Path], path: str) -> None:
    # Arrange: a caller names any readable file on the machine (or probes whether one exists)
    d, _ = daemon
    raw = str(d.home / "data" / path) if path.startswith("..") else path

    # Act
    train = httpx.post(f"{d.url}/v1/train", json={"adapter": "x", "data": raw}, headers=d.auth, timeout=30)
    join = httpx.post(
        f"{d.url}/v1/federations",
        json={"name": "probe", "mode": "dp", "data": raw},
        headers=d.auth,
        timeout=30,
    )

    # Assert: the same refusal whether the file exists or not, before anything reads it
    for resp in (train, join):
        assert resp.status_code == 403, resp.text
        assert resp.json()["error"]["code"] == "data_outside_folders" and resp.json()["error"]["param"] == "data"
    assert not httpx.get(f"{d.url}/v1/node/status", timeout=10).json()["training"]["running"]
