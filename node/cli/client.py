"""Talking to the running daemon of a home: where it listens, with which token."""

import contextlib
import json
from collections.abc import Callable, Iterator
from typing import Any

import httpx

from node.core.api_token import read_token
from node.core.config import load_config
from node.core.home import NodeHome
from node.core.runlock import DaemonInfo, running_daemon


class DaemonError(RuntimeError):
    """Talking to the daemon failed; the message is one line for the user."""


class NotRunningError(DaemonError):
    """No daemon runs on this home."""


class DaemonGoneError(DaemonError):
    """The daemon closed the connection, stopped answering or went away during a request."""


class DaemonRequestError(DaemonError):
    """The daemon answered with an HTTP error; the message carries its explanation."""


class DaemonClient:
    """A small HTTP client for the node's own API."""

    def __init__(self, home: NodeHome, timeout_s: float = 600.0) -> None:
        info = running_daemon(home)
        if info is None:
            raise NotRunningError(f"no Mirador daemon is running on {home.root} (start one: mirador node start)")
        self.info: DaemonInfo = info
        self.home = home
        token = load_config(home.config_file).api.token if home.config_file.exists() else ""
        token = token or read_token(home.api_token) or ""  # the home's token: state-changing routes require it
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.http = httpx.Client(base_url=info.url, headers=headers, timeout=httpx.Timeout(timeout_s, connect=5.0))

    @contextlib.contextmanager
    def _transport(self) -> Iterator[None]:
        """Turn a broken connection into one DaemonGoneError that says what happened and where to look."""
        try:
            yield
        except httpx.TimeoutException:
            raise DaemonGoneError(
                f"the daemon at {self.info.url} did not answer in time; `mirador node status` shows its load"
            ) from None
        except httpx.TransportError as exc:
            what = "refused the connection" if isinstance(exc, httpx.ConnectError) else "closed the connection"
            raise DaemonGoneError(
                f"the daemon at {self.info.url} {what} ({exc}); it may have stopped or crashed: "
                f"see {self.home.log_file}, `mirador node status`, `mirador doctor`"
            ) from None

    def get(self, path: str) -> Any:
        """GET a JSON document; raise on HTTP errors with the server's message."""
        with self._transport():
            return _json_or_raise(self.http.get(path))

    def post(self, path: str, body: dict[str, Any]) -> Any:
        """POST JSON; raise on HTTP errors with the server's message."""
        with self._transport():
            return _json_or_raise(self.http.post(path, json=body))

    def stream_lines(self, path: str, body: dict[str, Any]) -> Iterator[dict[str, Any]]:
        """POST JSON and yield each JSON line of the streamed answer."""
        yield from self._lines("POST", path, body)

    def get_lines(self, path: str) -> Iterator[dict[str, Any]]:
        """GET a JSON-lines document and yield each line."""
        yield from self._lines("GET", path, None)

    def _lines(self, method: str, path: str, body: dict[str, Any] | None) -> Iterator[dict[str, Any]]:
        with self._transport(), self.http.stream(method, path, json=body) as resp:
            if resp.status_code != 200:
                resp.read()
                _json_or_raise(resp)
            for line in resp.iter_lines():
                if line.strip():
                    yield json.loads(line)

    def stream_chat(
        self, body: dict[str, Any], on_event: dict[str, Callable[[dict[str, Any]], None]] | None = None
    ) -> Iterator[str]:
        """POST a streamed chat completion and yield its text deltas; side events (`tool_event`, `chain_step`) go to
        the callback `on_event` names for their key."""
        with self._transport(), self.http.stream("POST", "/v1/chat/completions", json=body | {"stream": True}) as resp:
            if resp.status_code != 200:
                resp.read()
                _json_or_raise(resp)
            for line in resp.iter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    return
                event = json.loads(data)
                if "error" in event:
                    raise DaemonRequestError(event["error"]["message"])
                for key, callback in (on_event or {}).items():
                    if key in event:
                        callback(event[key])
                for choice in event.get("choices", []):
                    delta = choice.get("delta", {}).get("content")
                    if delta:
                        yield delta


def _json_or_raise(resp: httpx.Response) -> Any:
    try:
        data = resp.json()
    except ValueError:
        data = None
    if resp.status_code >= 400:
        message = data["error"]["message"] if isinstance(data, dict) and "error" in data else resp.text
        raise DaemonRequestError(f"HTTP {resp.status_code}: {message}")
    return data
