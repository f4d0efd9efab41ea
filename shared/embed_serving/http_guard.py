"""Limits that act before Truss's server does any work for a request: the body cap, the budget
of bodies held at once, a stalled body, a connection that never sends a request.

Truss's routes read the whole body (`Depends(parse_body)`) before any model code runs, and
its uvicorn server has no timeout before a request's first byte nor between body chunks; the
pinned truss offers no hook for either. So `install()` (called from `load()`) reaches the
running server itself: it finds the `uvicorn.Server` of this process and

- wraps the app's middleware stack in `BodyGuard`, which every HTTP request passes through
  before Truss's routes: a `Content-Length` over MAX_REQUEST_BYTES is answered 413 before a
  byte of the body is read, a body without one is refused the moment it passes the cap, the
  request's share of MAX_INFLIGHT_BYTES is held while it is read, and a body that sends nothing
  for REQUEST_BODY_TIMEOUT_S gets a 408 and its connection closed. The body, read within those
  limits, is then handed to Truss's app as if it came from the socket.
- starts `sweep_idle_connections` on the server's event loop: a connection that has not sent a
  complete request head within CONNECTION_IDLE_TIMEOUT_S of opening (or of its previous
  response) is closed, so connections that never send a byte cannot pile up until the process
  runs out of file descriptors.

Both read uvicorn's objects as the pinned versions lay them out; if the server is not found or
not shaped as expected, `install` logs a warning and the server runs without them (the route
still caps the body it is handed, after Truss has read it).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import sys
import threading
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from embed_serving import memory, metrics
from embed_serving.body import too_big
from embed_serving.errors import RequestError, Route, error_response, printable

log = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

_NO_BODY_METHODS = ("GET", "HEAD", "OPTIONS", "DELETE")


class InflightBudget:
    """Bytes of request bodies held at once, over all requests (MAX_INFLIGHT_BYTES). A body is
    charged its declared length, or the whole per-request cap when it has none; one request is
    always admitted when nothing is held, so a body at the cap can always run."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held = 0

    def reserve(self, size: int) -> int:
        if self.held and self.held + size > self.limit:
            raise RequestError(
                f"the server is busy: {self.held} bytes of request bodies are in progress and "
                f"this one adds {size}, the limit is {self.limit} (MAX_INFLIGHT_BYTES); retry "
                "after 1 s",
                status=429,
                code="server_busy",
                headers={"Retry-After": "1"},
            )
        self.held += size
        return size

    def release(self, size: int) -> None:
        self.held -= size


def route_of(path: str) -> Route:
    return "embeddings" if path.rstrip("/").endswith("/v1/embeddings") else "predict"


def log_refusal(route: str, error: RequestError, request_id: str) -> None:
    """A client's mistake is one line, not a traceback: bad clients must not flood the
    deployment's logs. The message is the one the client got, escaped."""
    log.warning(
        "%s %d %s (request id %s)",
        route, error.status, printable(error.message)[:500], printable(request_id[:100]),
    )  # fmt: skip
    metrics.REQUESTS.labels(route, str(error.status)).inc()


class _ClientGone(Exception):
    pass


class BodyGuard:
    """ASGI middleware: reads each request's body within MAX_REQUEST_BYTES, MAX_INFLIGHT_BYTES
    and REQUEST_BODY_TIMEOUT_S before the wrapped app sees the request."""

    def __init__(
        self, app: ASGIApp, max_request_bytes: int, budget: InflightBudget, body_timeout_s: float
    ) -> None:
        self.app = app
        self.max_request_bytes = max_request_bytes
        self.budget = budget
        self.body_timeout_s = body_timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in _NO_BODY_METHODS:
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        route = route_of(scope["path"])
        held = 0
        chunks: list[bytes] = []
        try:
            try:
                declared = headers.get("content-length", "").strip()
                if declared.isdigit() and int(declared) > self.max_request_bytes:
                    raise too_big(declared, self.max_request_bytes)
                size = int(declared) if declared.isdigit() else self.max_request_bytes
                held = self.budget.reserve(size)
                await self._read(receive, chunks)
            except RequestError as e:
                log_refusal(route, e, headers.get("x-baseten-request-id", "-"))
                big = sum(len(c) for c in chunks) > memory.TRIM_AFTER_BYTES
                chunks.clear()
                response = error_response(e, route)
                # The headers Truss puts on a model's own error responses (Baseten's proxy
                # tells a client error from a platform one by them), where Truss is loaded.
                truss_errors = sys.modules.get("_truss_common.errors")
                if truss_errors is not None:
                    truss_errors.add_error_headers_to_user_response(response)
                await response(scope, receive, send)
                if big:  # what was read of a refused body goes back to the system too
                    await asyncio.to_thread(memory.release_memory)
                return
            except _ClientGone:
                return
            await self.app(scope, _replay(chunks, receive), send)
        finally:
            self.budget.release(held)

    async def _read(self, receive: Receive, chunks: list[bytes]) -> None:
        total = 0
        while True:
            try:
                message = await asyncio.wait_for(receive(), self.body_timeout_s)
            except TimeoutError:
                raise RequestError(
                    f"the request body stalled: no data for {self.body_timeout_s:g} s "
                    f"(REQUEST_BODY_TIMEOUT_S) after {total} bytes",
                    status=408,
                    code="body_timeout",
                    # The rest of the body may never come: do not wait for it.
                    headers={"Connection": "close"},
                ) from None
            if message["type"] == "http.disconnect":
                raise _ClientGone
            chunk = message.get("body", b"")
            total += len(chunk)
            if total > self.max_request_bytes:
                raise too_big(f"over {self.max_request_bytes}", self.max_request_bytes)
            if chunk:
                chunks.append(chunk)
            if not message.get("more_body", False):
                return


def _replay(chunks: list[bytes], receive: Receive) -> Receive:
    """The body already read, as the server would have delivered it; after it, the server's
    own `receive` (which reports the client's disconnect)."""
    pending = chunks[::-1]
    chunks.clear()  # the app owns the chunks now; a chunk is dropped once handed over
    if not pending:
        pending.append(b"")

    async def replayed() -> Message:
        if pending:
            return {"type": "http.request", "body": pending.pop(), "more_body": bool(pending)}
        return await receive()

    return replayed


async def sweep_idle_connections(connections: set[Any], timeout_s: float) -> None:
    """Close connections that have not sent a complete request head for `timeout_s`: from
    their opening, or from the end of their previous response (uvicorn's own keep-alive timer
    usually closes those first, but not one that has begun sending a head). A connection
    whose request is in progress is never touched. Runs forever on the server's loop."""
    tick = min(1.0, timeout_s / 4)
    waiting: dict[int, tuple[Any, Any, float]] = {}  # id -> (connection, its cycle, since)
    while True:
        await asyncio.sleep(tick)
        now = time.monotonic()
        still: dict[int, tuple[Any, Any, float]] = {}
        for conn in list(connections):
            cycle = getattr(conn, "cycle", _MISSING)
            if cycle is _MISSING:  # not an HTTP/1 protocol (a websocket): not ours to judge
                continue
            if cycle is not None and not getattr(cycle, "response_complete", False):
                continue  # a request in progress
            seen = waiting.get(id(conn))
            if seen is None or seen[0] is not conn or seen[1] is not cycle:
                seen = (conn, cycle, now)
            still[id(conn)] = seen
            if now - seen[2] > timeout_s:
                transport = getattr(conn, "transport", None)
                if transport is not None and not transport.is_closing():
                    transport.close()
        waiting = still


_MISSING = object()


def _find_server() -> Any | None:
    try:
        import uvicorn
    except ImportError:
        return None
    servers = [o for o in gc.get_objects() if isinstance(o, uvicorn.Server)]
    return servers[0] if len(servers) == 1 else None


def _starlette_app(app: Any) -> Any | None:
    """The Starlette app inside uvicorn's wrappers (proxy headers, message logger)."""
    for _ in range(10):
        if hasattr(app, "middleware_stack") and hasattr(app, "build_middleware_stack"):
            return app
        app = getattr(app, "app", None)
        if app is None:
            return None
    return None


def install(
    max_request_bytes: int,
    max_inflight_bytes: int,
    body_timeout_s: float,
    idle_timeout_s: float,
) -> BodyGuard | None:
    """Install the guard and the idle sweeper on this process's running uvicorn server (see
    the module docstring). Returns the guard, or None where there is no server to guard."""
    server = _find_server()
    app = _starlette_app(getattr(getattr(server, "config", None), "loaded_app", None))
    connections = getattr(getattr(server, "server_state", None), "connections", None)
    if server is None or app is None or not isinstance(connections, set):
        log.warning(
            "no uvicorn server found in this process: MAX_REQUEST_BYTES and MAX_INFLIGHT_BYTES "
            "apply only after Truss has read a body; REQUEST_BODY_TIMEOUT_S and "
            "CONNECTION_IDLE_TIMEOUT_S do not apply"
        )
        return None
    stack = app.middleware_stack
    if stack is None:
        stack = app.build_middleware_stack()
    if isinstance(stack, BodyGuard):  # a second load() in the same process
        stack = stack.app
    guard = BodyGuard(stack, max_request_bytes, InflightBudget(max_inflight_bytes), body_timeout_s)
    app.middleware_stack = guard  # Starlette reads it on every request
    threading.Thread(
        target=_start_sweeper, args=(server, connections, idle_timeout_s), daemon=True
    ).start()
    log.info(
        "request guard installed: bodies over %d bytes refused before reading, %d bytes in "
        "flight at most, body stall %g s, idle connection %g s",
        max_request_bytes, max_inflight_bytes, body_timeout_s, idle_timeout_s,
    )  # fmt: skip
    return guard


def _start_sweeper(server: Any, connections: set[Any], timeout_s: float) -> None:
    """load() may run before uvicorn has opened its socket: wait for it, then start the sweep
    on the server's own loop."""
    while not server.should_exit:
        listeners = getattr(server, "servers", None)
        if server.started and listeners:
            loop = listeners[0].get_loop()
            asyncio.run_coroutine_threadsafe(sweep_idle_connections(connections, timeout_s), loop)
            return
        time.sleep(0.05)
