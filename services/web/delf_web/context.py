"""What every API route gets: the gateway connection, the caller's credentials, checked
against DELF_AUTH_TOKENS (delf_web.auth) before anything else runs, and the service's
settings (read once, by `create_app`)."""
from __future__ import annotations

import dataclasses

from fastapi import Request

from delf_common import logs
from delf_web import auth
from delf_web.gateway import Gateway, call_metadata
from delf_web.settings import WebSettings


@dataclasses.dataclass
class Ctx:
    gateway: Gateway
    metadata: list[tuple[str, str]]
    settings: WebSettings

    def call(self, method: str, request, timeout: float | None = None):
        if timeout is None:
            return self.gateway.call(method, request, self.metadata)
        return self.gateway.call(method, request, self.metadata, timeout=timeout)


def context(request: Request) -> Ctx:
    """The route's Ctx; ApiError 401 when tokens are configured and none is accepted."""
    header = request.headers.get("authorization")
    auth.check(header, request.app.state.tokens)
    request_id = getattr(request.state, "request_id", None) or logs.clean_request_id(
        request.headers.get(logs.REQUEST_ID_HEADER) or "")
    return Ctx(request.app.state.gateway, call_metadata(header, request_id), request.app.state.settings)
