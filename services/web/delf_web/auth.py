"""Bearer tokens, as the gateway checks them (DELF_AUTH_TOKENS).

When tokens are configured, every /api/v1 route except health needs the header
``Authorization: Bearer <token>`` with one of them; the header is then passed on to the
gateway with each call. The console's pages, /docs and /openapi.json hold no data and
stay open (the console asks for the token and sends it with its API calls).
"""
from __future__ import annotations

import hmac

from delf_web.errors import ApiError

_HELP = "send the header `Authorization: Bearer <token>` (the console: the token field at the top)"


def accepted_tokens(tokens: tuple[str, ...]) -> list[bytes]:
    """The configured tokens (`WebSettings.auth_tokens`) as the checks compare them."""
    return [t.encode() for t in tokens if t]


def refusal(header: str | None, tokens: list[bytes]) -> str | None:
    """Why `header` is refused, or None when it carries an accepted token."""
    if not header:
        return f"missing credentials: {_HELP}"
    scheme, _, token = header.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        return "malformed credentials: the authorization header must be `Bearer <token>`"
    try:
        given = token.encode("latin-1")
    except UnicodeEncodeError:
        return "invalid credentials: the bearer token is not accepted"
    ok = False
    for candidate in tokens:  # no early exit: constant time over the list
        ok |= hmac.compare_digest(given, candidate)
    return None if ok else "invalid credentials: the bearer token is not accepted"


def check(header: str | None, tokens: list[bytes]) -> None:
    """ApiError UNAUTHENTICATED (401) unless the header is accepted; nothing to check without tokens."""
    if not tokens:
        return
    why = refusal(header, tokens)
    if why:
        raise ApiError("UNAUTHENTICATED", why)
