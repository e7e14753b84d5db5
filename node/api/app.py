"""The ASGI app: the route modules, OpenAI-style errors for every failure, the body-size limit, the browser guard.

No `from __future__ import annotations` here: FastAPI must see real types on route parameters, or it silently
turns `Request` into a query parameter.
"""

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp

from node.api.agents import router as agent_routes
from node.api.common import ApiError, BodyLimitMiddleware
from node.api.federations import router as federation_routes
from node.api.guard import BrowserGuardMiddleware
from node.api.learning import router as learning_routes
from node.api.market import router as market_routes
from node.api.memory import router as memory_routes
from node.api.node import router as node_routes
from node.api.openai import router as openai_routes
from node.api.openai_schema import describe_validation_errors
from node.api.tools import router as tool_routes
from node.state import NodeState

log = logging.getLogger(__name__)


def create_app(node: NodeState) -> ASGIApp:
    """The ASGI app serving `node`."""
    app = FastAPI(title="Mirador node", version="0.1.0", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.node = node
    routers = (node_routes, openai_routes, learning_routes, market_routes, federation_routes, memory_routes)
    for routes in (*routers, tool_routes, agent_routes):
        app.include_router(routes)

    @app.exception_handler(ApiError)
    async def _api_error(_request: Request, exc: ApiError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation(_request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = describe_validation_errors(list(exc.errors()))
        return ApiError(400, message, param=param).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return ApiError(exc.status_code, str(exc.detail), code=code).response()

    @app.exception_handler(Exception)
    async def _unexpected(_request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error in the API")
        return ApiError(500, "internal error (see the node's log)", type_="server_error").response()

    limited: ASGIApp = BodyLimitMiddleware(app, node.config.api.max_body_bytes)
    api = node.config.api
    return BrowserGuardMiddleware(limited, api.host, api.allowed_hosts, api.allowed_origins)
