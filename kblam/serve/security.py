"""Who may call the server, and how much one request may ask for.

- Bound to 127.0.0.1 by default. A non-loopback host is refused unless an API key is set.
- With a key, every endpoint needs `Authorization: Bearer <key>`, compared in constant time (hashes of
  equal length through hmac.compare_digest, so neither the content nor the length of the key leaks).
  The page's own files (`/`, `/app.js`, `/style.css`) and the OpenAPI description (`/docs`,
  `/openapi.json`) hold no KB data and are served without it: a browser cannot send the header when
  it opens a page; the page asks for the key and sends it with every call.
- Writes from another site are refused: a state-changing request whose Origin (or Sec-Fetch-Site)
  says it came from another origin gets 403, unless that origin was allowed with --cors-origin. A
  page on any site could otherwise POST a form (say, a file upload) to a server on 127.0.0.1.
- On a loopback bind, only Host headers naming the loopback are accepted (TrustedHostMiddleware), so
  a DNS-rebinding page cannot read the server either.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
import stat
import warnings
from dataclasses import dataclass
from pathlib import Path

from starlette.datastructures import Headers
from starlette.middleware.body_limit import RequestBodyLimitResponder
from starlette.responses import JSONResponse

MIN_KEY_CHARS = 16
PUBLIC_PATHS = frozenset({"/", "/app.js", "/style.css", "/docs", "/openapi.json", "/favicon.ico"})
LOOPBACK_HOSTS = ["127.0.0.1", "localhost", "::1", "[::1]"]


@dataclass(frozen=True)
class Limits:
    """Per-request limits, each refused with a 413 (bodies) or 422 (values) that says which."""

    max_body_bytes: int = 1 << 20  # a JSON request
    max_upload_bytes: int = 64 << 20  # a KB file for /v1/kb/import
    max_question_chars: int = 2_000
    max_questions: int = 32  # per /v1/ask request (and no more than the batch size)
    max_new_tokens: int = 256
    max_sources: int = 50
    max_page: int = 1_000  # triples per page of GET /v1/kb/triples
    max_triples: int = 10_000  # triples per POST /v1/kb/triples


def is_loopback(host: str) -> bool:
    if host.strip("[]") == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve anywhere


def check_bind(host: str, api_key: str | None) -> None:
    if api_key is None and not is_loopback(host):
        raise ValueError(f"refusing to serve on {host} without an API key: anyone who reaches it could read and "
                         "change the KB. Pass --api-key-file FILE, or bind to 127.0.0.1")


def read_api_key(path: str | os.PathLike) -> str:
    """The key in a file (surrounding whitespace ignored): at least 16 printable characters, one line."""
    path = Path(path)
    key = path.read_text(encoding="utf-8").strip()
    if len(key) < MIN_KEY_CHARS or any(not ch.isprintable() or ch.isspace() for ch in key):
        raise ValueError(f"{path}: the API key must be one word of at least {MIN_KEY_CHARS} printable characters "
                         "(for example: python -c 'import secrets; print(secrets.token_urlsafe(32))' > FILE)")
    if os.name == "posix" and path.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        warnings.warn(f"{path} can be read by other users; chmod 600 it", stacklevel=2)
    return key


def error_response(status: int, message: str, kind: str, param: str | None = None,
                   headers: dict | None = None) -> JSONResponse:
    """Every error the server sends, in OpenAI's shape (its clients read error.message)."""
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": None}},
                        status_code=status, headers=headers)


class BearerAuth:
    def __init__(self, app, api_key: str):
        self.app = app
        self._digest = hashlib.sha256(api_key.encode()).digest()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] in PUBLIC_PATHS or scope["method"] == "OPTIONS":
            return await self.app(scope, receive, send)
        given = Headers(scope=scope).get("authorization", "")
        scheme, _, token = given.partition(" ")
        digest = hashlib.sha256(token.strip().encode("utf-8", "surrogateescape")).digest()
        if scheme.lower() == "bearer" and hmac.compare_digest(digest, self._digest):
            return await self.app(scope, receive, send)
        message = ("this server needs an API key: send Authorization: Bearer <key>" if not given
                   else "the API key is not valid")
        await error_response(401, message, "authentication_error", headers={"WWW-Authenticate": "Bearer"})(
            scope, receive, send)


class SameOriginWrites:
    """403 for a state-changing request sent by a page of another origin (see the module docstring)."""

    SAFE = frozenset({"GET", "HEAD", "OPTIONS"})

    def __init__(self, app, allowed_origins: list[str]):
        self.app, self.allowed = app, set(allowed_origins)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] in self.SAFE:
            return await self.app(scope, receive, send)
        headers = Headers(scope=scope)
        origin, site = headers.get("origin"), headers.get("sec-fetch-site")
        own = f"{scope.get('scheme', 'http')}://{headers.get('host', '')}"
        if origin is not None and origin != own and origin not in self.allowed:
            reason = f"a page of {origin!r}"
        elif origin is None and site == "cross-site":
            reason = "a page of another site"
        else:
            return await self.app(scope, receive, send)
        await error_response(403, f"refused a {scope['method']} from {reason}: this server accepts changes from its own "
                          "page, from programs, and from origins allowed with --cors-origin",
                     "permission_error")(scope, receive, send)


class BodyLimits:
    """Starlette's request body limit (413 past it, however the body is sent), chosen by path: the
    upload route takes a KB file, every other route a JSON body."""

    def __init__(self, app, default: int, by_path: dict[str, int]):
        self.app, self.default, self.by_path = app, default, by_path

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self.by_path.get(scope["path"], self.default)
        declared = Headers(scope=scope).get("content-length", "")
        if declared.isdigit() and int(declared) > limit:  # said at once, in the server's JSON shape
            return await error_response(413, f"the request body is {int(declared):,} bytes, over this server's limit of "
                                     f"{limit:,}", "invalid_request_error")(scope, receive, send)
        await RequestBodyLimitResponder(self.app, limit)(scope, receive, send)
