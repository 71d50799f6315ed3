"""``neuronserve serve``'s own app, called in process without a socket.

A Ray Serve replica and a batch worker both run requests through ``server.app.create_app``, so
validation, OpenAI's response and error shapes, SSE framing and metrics are the single-machine
server's, not a copy. This module drives that ASGI app directly: the lifespan once (which starts
the engine), then one call per request, whose response start and body chunks are yielded as the
app sends them (so SSE streams as it is produced; httpx's ASGI transport would buffer it).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass


@dataclass
class ResponseStart:
    """The first item of a streamed response."""

    status: int
    headers: dict[str, str]


class InProcessApp:
    """One engine behind ``create_app``, callable in process. Call ``start()`` on the event loop
    that will serve requests (the engine's background loop lives there)."""

    def __init__(self, load_engine: Callable, model_name: str, api_key: str | None = None) -> None:
        from neuronserve.server.app import create_app

        self.app = create_app(load_engine, model_name, api_key=api_key)
        self._lifespan: asyncio.Task | None = None
        self._ready: asyncio.Future | None = None
        self._stop: asyncio.Event | None = None

    @property
    def async_engine(self):
        """The ``AsyncEngine`` once the model has loaded, else ``None``."""
        return self.app.state.neuronserve.engine

    @property
    def load_error(self) -> str | None:
        return self.app.state.neuronserve.load_error

    async def start(self, timeout_s: float = 600.0) -> None:
        """Run the app's start-up and wait until the engine is ready (or failed to load). Safe to
        call from concurrent requests: all of them wait for the one start-up."""
        if self._ready is None:
            self._ready = asyncio.ensure_future(self._start(timeout_s))
        await asyncio.shield(self._ready)

    async def _start(self, timeout_s: float) -> None:
        started: asyncio.Future = asyncio.get_running_loop().create_future()
        self._stop = asyncio.Event()
        sent_startup = False

        async def receive() -> dict:
            nonlocal sent_startup
            if not sent_startup:
                sent_startup = True
                return {"type": "lifespan.startup"}
            await self._stop.wait()
            return {"type": "lifespan.shutdown"}

        async def send(message: dict) -> None:
            if message["type"].startswith("lifespan.startup") and not started.done():
                started.set_result(message)

        scope = {"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}
        self._lifespan = asyncio.create_task(self.app(scope, receive, send))
        message = await started
        if message["type"] != "lifespan.startup.complete":
            raise RuntimeError(f"the app failed to start: {message.get('message')}")
        deadline = asyncio.get_running_loop().time() + timeout_s
        while self.async_engine is None and self.load_error is None:
            if asyncio.get_running_loop().time() > deadline:
                raise TimeoutError("the engine did not load in time")
            await asyncio.sleep(0.05)
        if self.load_error is not None:
            raise RuntimeError(self.load_error)

    async def stop(self) -> None:
        """Run the app's shutdown (stops the engine loop)."""
        if self._lifespan is None:
            return
        self._stop.set()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._lifespan, timeout=30)
        self._lifespan = self._ready = None

    async def stream(
        self, method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None
    ) -> AsyncIterator[ResponseStart | bytes]:
        """Yield the response: a ``ResponseStart``, then its body chunks. Leaving early (the caller
        closed the stream) tells the app the client disconnected, which aborts the request."""
        messages: asyncio.Queue = asyncio.Queue()
        disconnected = asyncio.Event()
        body_sent = False

        async def receive() -> dict:
            nonlocal body_sent
            if not body_sent:
                body_sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            await disconnected.wait()
            return {"type": "http.disconnect"}

        async def send(message: dict) -> None:
            await messages.put(message)

        path, _, query = path.partition("?")
        raw_headers = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in (headers or {}).items()]
        if body and not any(k == b"content-type" for k, _ in raw_headers):
            raw_headers.append((b"content-type", b"application/json"))
        raw_headers.append((b"content-length", str(len(body)).encode()))
        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": method.upper(),
            "scheme": "http",
            "path": path,
            "raw_path": path.encode(),
            "query_string": query.encode(),
            "root_path": "",
            "headers": raw_headers,
            "client": ("127.0.0.1", 0),
            "server": ("neuronserve", 0),
            "state": {},
        }
        call = asyncio.create_task(self.app(scope, receive, send))
        try:
            while True:
                getter = asyncio.create_task(messages.get())
                done, _ = await asyncio.wait({getter, call}, return_when=asyncio.FIRST_COMPLETED)
                if getter not in done:
                    getter.cancel()
                    if messages.empty():
                        call.result()  # re-raises what the app raised
                        return
                    continue
                message = getter.result()
                if message["type"] == "http.response.start":
                    headers_out = {k.decode("latin-1"): v.decode("latin-1") for k, v in message["headers"]}
                    yield ResponseStart(message["status"], headers_out)
                elif message["type"] == "http.response.body":
                    if message.get("body"):
                        yield message["body"]
                    if not message.get("more_body", False):
                        return
        finally:
            disconnected.set()
            if not call.done():
                with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError, Exception):
                    await asyncio.wait_for(call, timeout=5)

    async def request(
        self, method: str, path: str, body: dict | None = None, headers: dict[str, str] | None = None
    ) -> tuple[int, dict[str, str], dict]:
        """A whole request: (status, headers, JSON body)."""
        start, chunks = None, []
        data = b"" if body is None else json.dumps(body).encode()
        async for item in self.stream(method, path, data, headers):
            if isinstance(item, ResponseStart):
                start = item
            else:
                chunks.append(item)
        raw = b"".join(chunks)
        try:
            parsed = json.loads(raw) if raw else {}
        except json.JSONDecodeError:
            parsed = {"text": raw.decode("utf-8", "replace")}
        return start.status, start.headers, parsed
