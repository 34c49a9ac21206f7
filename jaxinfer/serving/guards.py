"""What stands between a connection and the app: the API key, the body's size, and how many
generation requests the server holds at once, each checked before any of a request's body is read.

  app.add_middleware(Guards, state=GuardState(), api_key="sk-...", max_body_bytes=4 << 20,
                     max_concurrent=256, retry_after_s=1, counted=("/v1/completions", ...))

Refusals carry OpenAI's error body: 401 on every route but OPEN without the key (compared in
constant time: the /v1 routes and any path not served; /health, /openapi.json and /docs stay open), 413 for a body over the limit (its declared
Content-Length at once, else counted as it arrives: the app never holds more than the limit), 429
with Retry-After past `max_concurrent` generation requests. A refusal sent before the body was read
closes the connection, so the server does not go on reading what it refused.
"""

from __future__ import annotations

import dataclasses
import hmac
import ipaddress
import json

from jaxinfer.serving.schema import RequestError

LOOPBACK_NAMES = ("localhost", "ip6-localhost")
OPEN = ("/health", "/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc")  # no key needed


@dataclasses.dataclass
class GuardState:
    """Counters shared by the middleware and /health (touched only on the event loop's thread)."""

    in_flight: int = 0  # generation requests being served, running or waiting
    refused: dict[int, int] = dataclasses.field(default_factory=dict)  # HTTP status -> requests refused with it


class BodyTooLarge(RequestError):
    """Raised out of `receive` when a body grows past the limit; the app's RequestError handler
    answers it (413), as it answers any bad request."""

    def __init__(self, limit: int):
        super().__init__(f"the request body is over this server's limit of {limit} bytes", None, status=413)


class Guards:
    """ASGI middleware: the API key, the body limit and the admission limit (see the module doc)."""

    def __init__(self, app, state: GuardState, api_key: str | None, max_body_bytes: int, max_concurrent: int,
                 retry_after_s: int, counted: tuple[str, ...]):
        self.app, self.state = app, state
        self.api_key = None if api_key is None else api_key.encode()
        self.max_body_bytes, self.max_concurrent, self.retry_after_s = max_body_bytes, max_concurrent, retry_after_s
        self.counted = counted  # the paths of generation requests, which count against max_concurrent

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers, path = dict(scope["headers"]), _route_path(scope)
        if self.api_key is not None and path not in OPEN and not self._authorized(headers):
            error = RequestError("a valid API key is required: send the header 'Authorization: Bearer <key>'",
                                 None, status=401, code="invalid_api_key")
            return await self._refuse(send, error, [(b"www-authenticate", b"Bearer")])
        length = headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body_bytes):
            return await self._refuse(send, BodyTooLarge(self.max_body_bytes) if length.isdigit() else
                                      RequestError(f"Content-Length {length[:20]!r} is not a number of bytes"))
        counted = path in self.counted
        if counted and self.state.in_flight >= self.max_concurrent:
            error = RequestError(f"the server is busy: {self.state.in_flight} requests are being served (its limit); "
                                 f"retry after {self.retry_after_s} s", None, status=429, code="rate_limit_exceeded")
            return await self._refuse(send, error, [(b"retry-after", str(self.retry_after_s).encode())])
        received = 0

        async def limited_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    self._count(413)
                    raise BodyTooLarge(self.max_body_bytes)
            return message

        if counted:
            self.state.in_flight += 1
        try:
            await self.app(scope, limited_receive, send)
        finally:
            if counted:
                self.state.in_flight -= 1

    def _authorized(self, headers: dict[bytes, bytes]) -> bool:
        scheme, _, key = headers.get(b"authorization", b"").partition(b" ")
        return scheme.lower() == b"bearer" and hmac.compare_digest(key.strip(), self.api_key)

    def _count(self, status: int) -> None:
        self.state.refused[status] = self.state.refused.get(status, 0) + 1

    async def _refuse(self, send, error: RequestError, headers: list[tuple[bytes, bytes]] = ()) -> None:
        """Answer with `error` and close the connection (the body, if any, is left unread)."""
        self._count(error.status)
        body = json.dumps(error.body()).encode()
        await send({"type": "http.response.start", "status": error.status, "headers": [
            (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
            (b"connection", b"close"), *headers]})
        await send({"type": "http.response.body", "body": body})


def _route_path(scope) -> str:
    """The path the app routes on: the request's, less the root path a proxy serves the app under."""
    path, root = scope["path"], scope.get("root_path", "")
    return path[len(root):] if root and path.startswith(root) else path


def check_bind(host: str, api_key: str | None, allow_unauthenticated: bool) -> None:
    """Refuse (ValueError) to serve on an address other machines can reach without an API key,
    unless `allow_unauthenticated` says that is meant."""
    if api_key or allow_unauthenticated or is_loopback(host):
        return
    raise ValueError(f"--host={host} can be reached from other machines and no API key is set: pass --api_key "
                     "(or set JAXINFER_API_KEY), or --allow_unauthenticated to serve anyone who can reach the port")


def is_loopback(host: str) -> bool:
    """Whether `host` (a name or an address) is this machine only."""
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
