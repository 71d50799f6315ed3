"""``AsyncEngine``: one background loop steps the engine; each request streams its own outputs.

The model runs in a worker thread so the event loop keeps accepting and cancelling requests
meanwhile: always the same one, ``model_thread()``, which should also load the model. OpenMP (the
kernels' and torch's) keeps a thread team per calling thread; once two threads have run parallel
regions, there are more OpenMP threads than cores, libgomp stops spinning between regions, and each
of a step's ~150 regions pays a futex wake-up: measured on 2 cores, a single-stream SmolLM2 int8
step took 32 ms in a second thread against 9 ms in the first. Everything that changes scheduler
state (adding, aborting, ``Scheduler.update``) happens on the event loop; an abort that arrives
while the model runs is applied as soon as that step returns, so the blocks the model is writing
are never handed out mid-step.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import ThreadPoolExecutor

from neuronserve.backends.base import RunnerDeadError
from neuronserve.engine.engine import Engine
from neuronserve.engine.outputs import RequestOutput
from neuronserve.engine.params import SamplingParams

logger = logging.getLogger(__name__)


_MODEL_THREAD: ThreadPoolExecutor | None = None


def model_thread() -> ThreadPoolExecutor:
    """The process's one thread for model work (loading, steps): see the module doc."""
    global _MODEL_THREAD
    if _MODEL_THREAD is None:
        _MODEL_THREAD = ThreadPoolExecutor(max_workers=1, thread_name_prefix="neuronserve-model")
    return _MODEL_THREAD


class EngineDeadError(RuntimeError):
    """The background loop stopped; no request can make progress."""


class AsyncEngine:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._streams: dict[str, asyncio.Queue] = {}
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._in_step = False
        self._deferred_aborts: list[str] = []
        self._error: BaseException | None = None

    @classmethod
    def from_pretrained(cls, model: str, **kwargs) -> AsyncEngine:
        return cls(Engine.from_pretrained(model, **kwargs))

    # ---------------------------------------------------------------- lifecycle
    def start(self) -> None:
        """Start the background loop on the running event loop (``generate`` does it on first use)."""
        if self._task is None or self._task.done():
            self._wake = asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(self._run(), name="neuronserve-engine")

    async def shutdown(self) -> None:
        """Stop the loop and abort every request still running."""
        if self._task is not None:
            self._task.cancel()
            # A loop that already stopped on an error keeps it in ``error`` (it was logged).
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
            self._task = None
        for request_id in list(self._streams):
            self.abort(request_id)

    @property
    def error(self) -> BaseException | None:
        """Why the loop stopped, if it did (then every request fails with ``EngineDeadError``)."""
        return self._error

    @property
    def is_running(self) -> bool:
        return self._task is not None and not self._task.done()

    # ---------------------------------------------------------------- requests
    def add_request(
        self,
        prompt: str | Sequence[int],
        params: SamplingParams | None = None,
        request_id: str | None = None,
        priority: int = 0,
        cache_salt: str | None = None,
    ) -> str:
        """Queue a request now and return its id; read its outputs with ``stream(id)``. Raises
        ``ValueError`` or ``QueueFullError`` at once, before anything is queued."""
        if self._error is not None:
            raise EngineDeadError(f"the engine loop stopped: {self._error!r}")
        self.start()
        request_id = self.engine.add_request(
            prompt, params, request_id=request_id, priority=priority, cache_salt=cache_salt
        )
        self._streams[request_id] = asyncio.Queue()
        self._wake.set()
        return request_id

    async def stream(self, request_id: str) -> AsyncIterator[RequestOutput]:
        """Yield the request's outputs (each carries its delta) until it finishes. Closing or
        cancelling the consumer aborts the request and frees its blocks."""
        queue = self._streams.get(request_id)
        if queue is None:
            raise ValueError(f"request_id: no open stream for {request_id!r}")
        finished = False
        try:
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            self._streams.pop(request_id, None)
            if not finished:
                self.abort(request_id)

    async def generate(
        self,
        prompt: str | Sequence[int],
        params: SamplingParams | None = None,
        request_id: str | None = None,
        priority: int = 0,
    ) -> AsyncIterator[RequestOutput]:
        """``async for out in engine.generate(...)``: add a request and stream it."""
        request_id = self.add_request(prompt, params, request_id=request_id, priority=priority)
        async for out in self.stream(request_id):
            yield out

    def abort(self, request_id: str) -> None:
        """Abort a request (now, or right after the step in flight) and end its stream."""
        if self._in_step:
            self._deferred_aborts.append(request_id)
            return
        out = self.engine.abort(request_id)
        queue = self._streams.pop(request_id, None)
        if queue is not None and out is not None:
            queue.put_nowait(out)

    # ---------------------------------------------------------------- the loop
    async def _run(self) -> None:
        engine = self.engine
        try:
            while True:
                if not engine.has_unfinished():
                    self._wake.clear()
                    await self._wake.wait()
                    continue
                out = engine.schedule()
                if not out.requests:
                    await asyncio.sleep(0.001)
                    continue
                self._in_step = True
                try:
                    loop = asyncio.get_running_loop()
                    result = await loop.run_in_executor(model_thread(), engine.execute, out)
                except RunnerDeadError as exc:  # no step can run again: end every request
                    self._fail(out.request_ids, exc)
                    raise
                except Exception as exc:  # the step's requests fail; the loop and the others go on
                    logger.exception("a model step failed; aborting its %d requests", len(out.requests))
                    result = None
                    self._fail(out.request_ids, exc)
                finally:
                    self._in_step = False
                outputs = [] if result is None else engine.process(out, result)
                deferred, self._deferred_aborts = self._deferred_aborts, []
                for request_id in deferred:
                    self.abort(request_id)
                for output in outputs:
                    queue = self._streams.get(output.request_id)
                    if queue is not None:
                        queue.put_nowait(output)
                await asyncio.sleep(0)  # let consumers and new requests in between steps
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            self._error = exc
            logger.exception("the engine loop stopped")
            for request_id in list(self._streams):
                self._fail([request_id], EngineDeadError(f"the engine loop stopped: {exc!r}"))
            raise

    def _fail(self, request_ids: list[str], exc: BaseException) -> None:
        for request_id in request_ids:
            self.engine.abort(request_id)
            queue = self._streams.pop(request_id, None)
            if queue is not None:
                queue.put_nowait(exc)
