"""The FastAPI application: the /api/v1 routes, the console's static files, /docs offline.

A client of the gateway's gRPC API with no search logic of its own: each route checks
its input against the contract, makes one gateway call with the caller's token and
answers its reply as JSON, or its status as an HTTP error (delf_web.errors).
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException

from delf_common import logs
from delf_web import api_images, api_jobs, api_search, auth
from delf_web.errors import ApiError
from delf_web.gateway import Gateway
from delf_web.settings import WebSettings

log = logging.getLogger("delf.web")
STATIC = Path(__file__).resolve().parent / "static"
CONSOLE_CSP = ("default-src 'self'; img-src 'self' blob: data:; style-src 'self'; script-src 'self'; "
               "connect-src 'self'; frame-ancestors 'none'")
_STATUS_CODES = {400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED", 404: "NOT_FOUND",
                 405: "UNIMPLEMENTED", 413: "RESOURCE_EXHAUSTED", 415: "INVALID_ARGUMENT"}


def _validation_message(exc: RequestValidationError) -> str:
    parts = []
    for error in exc.errors()[:5]:
        where = ".".join(str(p) for p in error.get("loc", ()) if p not in ("body", "query", "path"))
        parts.append(f"{where or 'request'}: {error.get('msg', 'invalid')}")
    return "; ".join(parts) or "the request is not valid"


def _install_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        return ApiError("INVALID_ARGUMENT", _validation_message(exc), status=400).response()

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        code = _STATUS_CODES.get(exc.status_code, "INVALID_ARGUMENT" if exc.status_code < 500 else "UNAVAILABLE")
        return ApiError(code, str(exc.detail), status=exc.status_code).response()


def _install_request_log(app: FastAPI) -> None:
    """Every API request gets a request id (the caller's `x-request-id` when sensible), sent
    on to the gateway and back in the answer, and one log line: method, path, status, time."""

    @app.middleware("http")
    async def observe(request: Request, call_next):
        request_id = logs.clean_request_id(request.headers.get(logs.REQUEST_ID_HEADER) or "") or logs.new_request_id()
        request.state.request_id = request_id
        started = time.monotonic()
        response = await call_next(request)
        response.headers[logs.REQUEST_ID_HEADER] = request_id
        if request.url.path.startswith("/api/"):
            level = logging.WARNING if response.status_code >= 500 else logging.INFO
            with logs.bound(request_id=request_id):
                log.log(level, "%s %s %d in %.3f s", request.method, request.url.path, response.status_code,
                        time.monotonic() - started)
        return response


def _install_pages(app: FastAPI) -> None:
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/", include_in_schema=False)
    def console() -> FileResponse:
        return FileResponse(STATIC / "index.html", headers={"Content-Security-Policy": CONSOLE_CSP})

    try:
        import fastapi_offline  # ships Swagger UI 5 (OpenAPI 3.1, as FastAPI writes it)
    except ImportError:  # pragma: no cover - a requirement; /openapi.json still works
        log.warning("fastapi-offline is not installed: /docs is unavailable")
        return
    assets = Path(fastapi_offline.__file__).resolve().parent / "static"
    app.mount("/docs-assets", StaticFiles(directory=assets), name="docs-assets")

    @app.get("/docs", include_in_schema=False)
    def docs():
        return get_swagger_ui_html(openapi_url="/openapi.json", title="DELF search API",
                                   swagger_js_url="/docs-assets/swagger-ui-bundle.js",
                                   swagger_css_url="/docs-assets/swagger-ui.css",
                                   swagger_favicon_url="/docs-assets/favicon.png")


def create_app(gateway: Gateway | None = None, settings: WebSettings | None = None) -> FastAPI:
    """The app; ``settings`` default to the environment's, read now."""
    settings = settings or WebSettings.from_env()
    app = FastAPI(title="DELF search", version="1",
                  description="Search photos by photo, add and delete images, run ingest jobs: the HTTP/JSON "
                              "face of the gateway's gRPC API. With DELF_AUTH_TOKENS set, send "
                              "`Authorization: Bearer <token>`. Errors: `{\"error\": {\"code\", \"message\"}}`.",
                  docs_url=None, redoc_url=None)
    app.state.gateway = gateway or Gateway(settings.gateway)
    app.state.settings = settings
    app.state.tokens = auth.accepted_tokens(settings.auth_tokens)
    _install_handlers(app)
    _install_request_log(app)
    for module in (api_search, api_images, api_jobs):
        app.include_router(module.router)
    _install_pages(app)
    return app
