"""The HTTP token of CONTRACT section 7 (HTTP part): ``ledger up --http-token TOKEN``.

With a token set, every route but ``/health`` and ``/metrics`` needs
``Authorization: Bearer TOKEN``; without it the answer is 401
``{"error": ...}``. Browsers may carry the token in the ``ledger_token``
cookie instead (set by the web view's login form: HttpOnly, SameSite=Strict),
and a page asked for without it answers 401 with that form. Tokens are
compared in constant time.

Also here: whether a request that changes something (the web view's POST
actions) is allowed at all, and whether it comes from the ledger's own pages.
"""

from __future__ import annotations

import hmac
import ipaddress
from typing import Any, Final

from litestar import Request, Response
from litestar.enums import ScopeType
from litestar.middleware import ASGIMiddleware
from litestar.types import ASGIApp, Receive, Scope, Send

OPEN_PATHS: Final = frozenset({"/health", "/metrics"})
COOKIE: Final = "ledger_token"
LOGIN_PATH: Final = "/web/login"


def token_matches(given: str | None, token: str) -> bool:
    """Constant-time comparison of a presented token with the configured one."""
    if given is None:
        return False
    return hmac.compare_digest(given.encode(), token.encode())


def presented_token(headers: dict[str, str], cookies: dict[str, str]) -> str | None:
    """The token a request carries: ``Authorization: Bearer T``, else the login cookie."""
    scheme, _, value = headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and value:
        return value.strip()
    return cookies.get(COOKIE)


def is_loopback(host: str) -> bool:
    """Whether ``host`` (what the API listens on) is reachable from this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def same_origin(request: Request[Any, Any, Any]) -> bool:
    """Whether a state-changing request comes from the ledger's own pages (not a cross-site form or script).

    Browsers send ``Sec-Fetch-Site``; older ones an ``Origin`` to compare with ``Host``.
    A request with neither is not from a browser page (curl, scripts): allowed, the token guards it.
    """
    site = request.headers.get("sec-fetch-site")
    if site is not None:
        return site in ("same-origin", "none")
    origin = request.headers.get("origin")
    if origin is None:
        return True
    host = request.headers.get("host", "")
    return origin in (f"http://{host}", f"https://{host}")


class TokenMiddleware(ASGIMiddleware):
    """Answers 401 to a request without the token (JSON, or the login form for a page)."""

    scopes = (ScopeType.HTTP,)

    def __init__(self, token: str) -> None:
        self.token = token

    async def handle(self, scope: Scope, receive: Receive, send: Send, next_app: ASGIApp) -> None:
        path = scope["path"]
        if path in OPEN_PATHS or path == LOGIN_PATH:
            await next_app(scope, receive, send)
            return
        request: Request[Any, Any, Any] = Request(scope, receive, send)
        if token_matches(presented_token(dict(request.headers), request.cookies), self.token):
            await next_app(scope, receive, send)
            return
        from projections.web.pages import login_response  # the page is the web view's

        response: Response[Any]
        if "text/html" in request.headers.get("accept", "") and request.method == "GET":
            response = login_response(path, request.url.query)
        else:
            response = Response({"error": "missing or wrong token: send Authorization: Bearer TOKEN"},
                                status_code=401, headers={"www-authenticate": 'Bearer realm="ledger"'})
        await response.to_asgi_response(None, request)(scope, receive, send)
