"""What every route module shares: the OpenAI-style error, the body-size limit, auth, the node behind a request
and strict body parsing."""

import os
import secrets
from pathlib import Path
from typing import Any

import trio
from fastapi import Request
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from node.api.openai_schema import describe_validation_errors, error_body
from node.core.datafiles import data_folders, inside
from node.state import NodeState

db_limiter = trio.CapacityLimiter(1)  # one thread at a time on state.db from the routes


class ApiError(Exception):
    """An error answered with an OpenAI-style body."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        type_: str = "invalid_request_error",
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type_
        self.headers = headers or {}

    def response(self) -> JSONResponse:
        """The JSON response for this error."""
        return JSONResponse(
            error_body(self.message, self.type, self.param, self.code), self.status, headers=self.headers
        )


class BodyLimitMiddleware:
    """Refuses request bodies over `limit` bytes with 413, whether or not Content-Length is sent."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """ASGI entry point."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers", [])).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            await _too_large(self.limit)(scope, receive, send)
            return
        seen = 0

        async def limited_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise _BodyTooLarge()
            return message

        try:
            await self.app(scope, limited_receive, send)
        except _BodyTooLarge:
            await _too_large(self.limit)(scope, receive, send)


class _BodyTooLarge(Exception):
    pass


def _too_large(limit: int) -> JSONResponse:
    return ApiError(413, f"request body is larger than the limit of {limit} bytes", code="body_too_large").response()


def node_of(request: Request) -> NodeState:
    """The node state behind the app serving `request`."""
    node: NodeState = request.app.state.node
    return node


def check_auth(request: Request) -> None:
    """Refuse the request (401) unless it carries the configured bearer token (none configured: every request)."""
    token = node_of(request).config.api.token
    if not token:
        return
    header = request.headers.get("authorization", "")
    scheme, _, given = header.partition(" ")
    if scheme.lower() != "bearer" or not secrets.compare_digest(given.strip(), token):
        raise ApiError(
            401,
            "missing or wrong bearer token (send 'Authorization: Bearer <token>')",
            code="invalid_api_key",
            type_="authentication_error",
        )


def check_changes(request: Request) -> None:
    """Refuse (401) a state-changing request without the home's API token (or the configured `[api] token`), unless
    `[api] home_token = false` and no token is configured."""
    node = node_of(request)
    accepted = [t for t in (node.config.api.token, node.api_token if node.config.api.home_token else "") if t]
    if not accepted:
        return
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not any(secrets.compare_digest(given.strip(), t) for t in accepted):
        raise ApiError(
            401,
            "this request changes the node: send 'Authorization: Bearer <token>' with the token in "
            f"{node.home.api_token} (the mirador CLI sends it)",
            code="invalid_api_key",
            type_="authentication_error",
        )


def data_file(request: Request, raw: str, param: str = "data") -> Path:
    """The training-data file an API request names: it must lie under MIRADOR_HOME/data or `[api] data_folders`
    (checked before the file is looked at: no existence oracle for other paths), and exist there."""
    node = node_of(request)
    folders = data_folders(node.home, node.config.api.data_folders)
    path = Path(os.path.realpath(Path(raw).expanduser()))
    if not path.is_absolute() or not inside(path, folders):
        where = ", ".join(str(f) for f in folders)
        raise ApiError(
            403,
            f"data must be a file under {where} (the mirador CLI imports your files there; "
            "add folders with [api] data_folders)",
            param=param,
            code="data_outside_folders",
        )
    if not path.is_file():
        raise ApiError(400, f"data file {path} does not exist on the node", param=param, code="data_not_found")
    return path


async def parse_body(request: Request, schema: type[Any]) -> Any:
    """The request's JSON body validated by the pydantic `schema`; a 400 naming the bad field otherwise."""
    raw = await request.body()
    if not raw.strip():
        raise ApiError(400, "the request body is empty; send a JSON object")
    try:
        return schema.model_validate_json(raw)
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
        if errors and errors[0].get("type") == "model_type":
            raise ApiError(400, "the request body must be a JSON object") from None
        message, param = describe_validation_errors([dict(e) for e in errors])
        raise ApiError(400, message, param=param) from None
