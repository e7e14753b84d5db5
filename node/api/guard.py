"""What a web page can send and no Mirador client does, refused before any route runs.

Any page the user visits can make the browser send requests to 127.0.0.1: a `text/plain` POST skips the CORS
preflight, and DNS rebinding (a name that resolves to the attacker, then to 127.0.0.1) lets it read the answers
too (the class of Ollama's CVE-2024-28224). So, for every HTTP request:
- `Host` must name this node: localhost, 127.0.0.1, [::1], the bound address, or `[api] allowed_hosts` (a rebinding
  page's requests carry the attacker's name);
- a browser's cross-origin request (an `Origin` header, or `Sec-Fetch-Site: cross-site|same-site`) is refused unless
  its origin is in `[api] allowed_origins` (those get CORS headers and preflight answers);
- POST, PUT, PATCH and DELETE must be `Content-Type: application/json` (a browser sends JSON cross-origin only after
  a preflight, which is refused unless the origin is allowed).
Clients that are not browsers (the CLI, curl, the `openai` package) send neither Origin nor Sec-Fetch-Site.
"""

from collections.abc import Iterable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from node.api.common import ApiError

LOCAL_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
STATE_CHANGING = frozenset({"POST", "PUT", "PATCH", "DELETE"})
CORS_METHODS = "GET, POST, DELETE, OPTIONS"
CORS_HEADERS = "Authorization, Content-Type"


def host_name(host: str) -> str:
    """The name in a Host header, without the port and brackets, lower case ('[::1]:8484' -> '::1')."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1 : host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


class BrowserGuardMiddleware:
    """Refuses requests a web page could make the browser send (see the module docstring)."""

    def __init__(self, app: ASGIApp, bound_host: str, allowed_hosts: Iterable[str], allowed_origins: Iterable[str]):
        self.app = app
        self.hosts = LOCAL_NAMES | {host_name(bound_host)} | {host_name(h) for h in allowed_hosts}
        self.origins = frozenset(o.strip().rstrip("/").lower() for o in allowed_origins)

    def _origin_allowed(self, origin: str) -> bool:
        return "*" in self.origins or origin.rstrip("/").lower() in self.origins

    def _refusal(self, headers: dict[bytes, str], origin: str | None, method: str) -> ApiError | None:
        """Why this request is refused (a foreign Host, a cross-origin browser request, a non-JSON change), or None."""
        host = headers.get(b"host")
        if host is not None and host_name(host) not in self.hosts:
            return ApiError(
                403,
                f"Host {host!r} is not this node (add it to [api] allowed_hosts if you reach the node by that name)",
                code="host_not_allowed",
            )
        cross_site = headers.get(b"sec-fetch-site", "") in ("cross-site", "same-site")
        if (origin is not None or cross_site) and not (origin is not None and self._origin_allowed(origin)):
            return ApiError(
                403,
                f"cross-origin requests from {origin or 'another site'} are refused "
                "(add the origin to [api] allowed_origins to allow a web app)",
                code="origin_not_allowed",
            )
        content_type = headers.get(b"content-type", "").split(";")[0].strip().lower()
        if method in STATE_CHANGING and content_type != "application/json":
            return ApiError(
                415,
                f"{method} requests must be 'Content-Type: application/json' (got {content_type or 'none'!r})",
                code="unsupported_media_type",
            )
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """ASGI entry point."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        origin, method = headers.get(b"origin"), scope["method"]
        refusal = self._refusal(headers, origin, method)
        if refusal is not None:
            await refusal.response()(scope, receive, send)
            return
        if origin is not None and method == "OPTIONS":
            await _preflight(origin)(scope, receive, send)
            return
        if origin is None:
            await self.app(scope, receive, send)
            return

        async def send_with_cors(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = dict(message)
                message["headers"] = [*message.get("headers", []), *_cors_headers(origin)]
            await send(message)

        await self.app(scope, receive, send_with_cors)


def _cors_headers(origin: str) -> list[tuple[bytes, bytes]]:
    return [(b"access-control-allow-origin", origin.encode("latin-1")), (b"vary", b"Origin")]


def _preflight(origin: str) -> ASGIApp:
    """The answer to an allowed origin's CORS preflight."""

    async def answer(scope: Scope, receive: Receive, send: Send) -> None:
        headers = [
            *_cors_headers(origin),
            (b"access-control-allow-methods", CORS_METHODS.encode()),
            (b"access-control-allow-headers", CORS_HEADERS.encode()),
            (b"access-control-max-age", b"600"),
            (b"content-length", b"0"),
        ]
        await send({"type": "http.response.start", "status": 204, "headers": headers})
        await send({"type": "http.response.body", "body": b""})

    return answer
