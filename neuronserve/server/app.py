"""The OpenAI-compatible HTTP server: one ``AsyncEngine`` behind FastAPI.

Routes: ``POST /v1/completions``, ``POST /v1/chat/completions`` (SSE streaming or not),
``GET /v1/models``, ``GET /health``, ``GET /metrics``. The model loads in the background after the
server starts listening; until then every route but ``/metrics`` answers 503.

Errors use OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``: 400 for invalid
input (the field is named in ``param`` and the message), 401 for a missing or wrong API key, 404 for
an unknown model or route, 429 with ``Retry-After`` when the waiting queue is full, 503 while the
model loads. No Python traceback ever reaches a client.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException

from neuronserve.core import QueueFullError
from neuronserve.engine.async_engine import AsyncEngine, model_thread
from neuronserve.engine.engine import Engine
from neuronserve.engine.outputs import RequestOutput
from neuronserve.server.metrics import ServerMetrics
from neuronserve.server.protocol import ChatCompletionRequest, CompletionRequest

logger = logging.getLogger(__name__)
_FIELD = re.compile(r"^([A-Za-z_][A-Za-z0-9_.]*): ")


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    @classmethod
    def bad_request(cls, exc: ValueError) -> APIError:
        """A ``ValueError`` from validation ("field: what is wrong") as a 400 naming the field."""
        message = str(exc)
        match = _FIELD.match(message)
        return cls(400, message, param=match.group(1) if match else None)

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _error_response(err: APIError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


def _sse(payload: dict | str) -> str:
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {data}\n\n"


class _State:
    def __init__(self) -> None:
        self.engine: AsyncEngine | None = None
        self.load_error: str | None = None
        self.started = time.time()


def create_app(
    load_engine: Callable[[], Engine],
    model_name: str,
    api_key: str | None = None,
    retry_after_s: int = 1,
) -> FastAPI:
    """The app. ``load_engine`` runs at start-up on the model's thread (503s until it returns)."""
    state = _State()
    metrics = ServerMetrics(lambda: state.engine.engine if state.engine is not None else None)

    async def load() -> None:
        try:
            # On the thread that will run the steps (one OpenMP team: see async_engine's doc).
            engine = await asyncio.get_running_loop().run_in_executor(model_thread(), load_engine)
        except Exception as exc:
            logger.exception("the model failed to load")
            state.load_error = f"the model failed to load: {exc}"
            return
        state.engine = AsyncEngine(engine)
        state.engine.start()
        logger.info("model %s ready", model_name)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        loader = asyncio.create_task(load())
        yield
        loader.cancel()
        if state.engine is not None:
            await state.engine.shutdown()
            await asyncio.to_thread(state.engine.engine.close)  # stops tensor-parallel workers

    app = FastAPI(title="neuronserve", lifespan=lifespan)
    app.state.neuronserve = state
    app.state.metrics = metrics

    _install_error_handlers(app)

    # ---------------------------------------------------------------- dependencies
    def check_api_key(authorization: str | None = Header(default=None)) -> None:
        if api_key is None:
            return
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.encode(), api_key.encode()):
            raise APIError(
                401, "missing or invalid API key", type="authentication_error", code="invalid_api_key"
            )

    def ready_engine(generation: bool = False) -> AsyncEngine:
        if state.engine is not None and state.engine.error is not None:
            raise APIError(503, f"the engine stopped: {state.engine.error}", type="service_unavailable")
        if state.engine is not None:
            return state.engine
        if generation:
            metrics.rejected.labels("503").inc()
        message = state.load_error or "the model is still loading; retry shortly"
        raise APIError(503, message, type="service_unavailable", headers={"Retry-After": str(retry_after_s)})

    def check_model(name: str | None) -> None:
        if name is not None and name != model_name:
            raise APIError(
                404,
                f"the model {name!r} does not exist; this server serves {model_name!r}",
                param="model",
                code="model_not_found",
            )

    def add_request(engine: AsyncEngine, prompt, params_fn, priority: int, prefix: str) -> str:
        try:
            params = params_fn()
            return engine.add_request(
                prompt, params, request_id=f"{prefix}-{uuid.uuid4().hex}", priority=priority
            )
        except QueueFullError as exc:
            metrics.rejected.labels("429").inc()
            raise APIError(
                429,
                f"the server is at capacity ({exc}); retry later",
                type="rate_limit_error",
                code="rate_limit_exceeded",
                headers={"Retry-After": str(retry_after_s)},
            ) from None
        except ValueError as exc:
            raise APIError.bad_request(exc) from None

    # ---------------------------------------------------------------- routes
    @app.get("/health")
    async def health():
        ready_engine()
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus_metrics():
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", dependencies=[Depends(check_api_key)])
    async def models():
        engine = ready_engine().engine
        return {
            "object": "list",
            "data": [
                {
                    "id": model_name,
                    "object": "model",
                    "created": int(state.started),
                    "owned_by": "neuronserve",
                    "max_model_len": engine.scheduler_config.max_model_len,
                }
            ],
        }

    @app.post("/v1/completions", dependencies=[Depends(check_api_key)])
    async def completions(body: CompletionRequest, request: Request):
        engine = ready_engine(generation=True)
        check_model(body.model)
        try:
            prompt = body.single_prompt()
        except ValueError as exc:
            raise APIError.bad_request(exc) from None
        request_id = add_request(engine, prompt, body.to_sampling_params, body.priority, "cmpl")
        fmt = _CompletionFormat(request_id, model_name, engine.engine.tokenizer, body)
        return await _respond(engine, request_id, request, fmt, body, metrics)

    @app.post("/v1/chat/completions", dependencies=[Depends(check_api_key)])
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        engine = ready_engine(generation=True)
        check_model(body.model)
        tokenizer = engine.engine.tokenizer
        try:
            prompt = tokenizer.apply_chat_template(body.conversation())
        except ValueError as exc:
            raise APIError.bad_request(exc) from None
        except Exception as exc:  # the template itself refused the conversation (jinja raise)
            raise APIError(
                400, f"messages: the chat template refused them: {exc}", param="messages"
            ) from None
        request_id = add_request(engine, prompt, body.to_sampling_params, body.priority, "chatcmpl")
        fmt = _ChatFormat(request_id, model_name, tokenizer, body)
        return await _respond(engine, request_id, request, fmt, body, metrics)

    return app


def _install_error_handlers(app: FastAPI) -> None:
    """Every error leaves in OpenAI's shape; none carries a traceback."""

    @app.exception_handler(APIError)
    async def api_error(_: Request, exc: APIError):
        return _error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError):
        errors = exc.errors()
        if any(e.get("type") == "json_invalid" for e in errors):
            return _error_response(APIError(400, "the request body is not valid JSON"))
        parts, param = [], None
        for e in errors[:4]:
            loc = ".".join(str(p) for p in e.get("loc", ()) if p != "body")
            param = param or loc or None
            loc = loc or "body"
            parts.append(f"{loc}: {e.get('msg', 'invalid')}")
        return _error_response(APIError(400, "; ".join(parts), param=param))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return _error_response(APIError(exc.status_code, str(exc.detail), type=kind))

    @app.exception_handler(Exception)
    async def internal_error(_: Request, exc: Exception):
        logger.exception("unhandled error")
        return _error_response(APIError(500, "internal server error", type="internal_error"))


# -------------------------------------------------------------------- responses
async def _respond(engine: AsyncEngine, request_id: str, request: Request, fmt, body, metrics: ServerMetrics):
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(
            _stream(engine, request_id, fmt, include_usage, metrics),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Request-Id": request_id},
        )
    last = None
    watcher = asyncio.create_task(_abort_on_disconnect(request, engine, request_id))
    try:
        async for out in engine.stream(request_id):
            last = out
    except Exception as exc:
        logger.exception("request %s failed", request_id)
        raise APIError(500, f"generation failed: {exc}", type="internal_error") from None
    finally:
        watcher.cancel()
        if last is not None:
            metrics.observe(last)
    return JSONResponse(fmt.full(last), headers={"X-Request-Id": request_id})


async def _abort_on_disconnect(request: Request, engine: AsyncEngine, request_id: str) -> None:
    while not await request.is_disconnected():
        await asyncio.sleep(0.25)
    engine.abort(request_id)


async def _stream(
    engine: AsyncEngine, request_id: str, fmt, include_usage: bool, metrics
) -> AsyncIterator[str]:
    last = None
    try:
        first = fmt.first_chunk()
        if first is not None:
            yield _sse(first)
        async for out in engine.stream(request_id):
            last = out
            chunk = fmt.chunk(out)
            if chunk is not None:
                yield _sse(chunk)
        if include_usage and last is not None:
            yield _sse(fmt.usage_chunk(last))
    except Exception as exc:  # the engine failed this request: say so in the stream, then end it
        logger.exception("request %s failed mid-stream", request_id)
        yield _sse(APIError(500, f"generation failed: {exc}", type="internal_error").body())
    finally:
        engine.abort(request_id)  # a no-op once finished; frees the blocks of a client that left
        if last is not None:
            metrics.observe(last)
    yield _sse("[DONE]")


def _usage(out: RequestOutput) -> dict:
    n_prompt, n_out = len(out.prompt_token_ids), len(out.outputs[0].token_ids)
    return {
        "prompt_tokens": n_prompt,
        "completion_tokens": n_out,
        "total_tokens": n_prompt + n_out,
        # OpenAI's field: prompt tokens served from the prefix cache (routing is measured by it).
        "prompt_tokens_details": {"cached_tokens": out.metrics.num_cached_tokens},
    }


class _Format:
    object_full = object_chunk = ""

    def __init__(self, request_id: str, model: str, tokenizer, body) -> None:
        self.id, self.model, self.tokenizer, self.body = request_id, model, tokenizer, body
        self.created = int(time.time())
        self.logprobs_sent = 0

    def _envelope(self, obj: str, choices: list) -> dict:
        return {
            "id": self.id,
            "object": obj,
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }

    def usage_chunk(self, out: RequestOutput) -> dict:
        return {**self._envelope(self.object_chunk, []), "usage": _usage(out)}

    def first_chunk(self) -> dict | None:
        return None

    def _token(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id], skip_special_tokens=False)

    def _new_logprobs(self, out: RequestOutput) -> list:
        entries = out.outputs[0].logprobs or []
        new, self.logprobs_sent = entries[self.logprobs_sent :], len(entries)
        return new


class _CompletionFormat(_Format):
    object_full = object_chunk = "text_completion"

    def _logprobs(self, entries, offset: int) -> dict | None:
        if self.body.logprobs is None:
            return None
        tokens = [self._token(e.token_id) for e in entries]
        offsets = []
        for t in tokens:
            offsets.append(offset)
            offset += len(t)
        return {
            "tokens": tokens,
            "token_logprobs": [e.logprob for e in entries],
            "top_logprobs": [{self._token(t): lp for t, lp in e.top.items()} for e in entries],
            "text_offset": offsets,
        }

    def full(self, out: RequestOutput) -> dict:
        c = out.outputs[0]
        text = (out.prompt or "") + c.text if self.body.echo else c.text
        choice = {
            "index": 0,
            "text": text,
            "logprobs": self._logprobs(c.logprobs or [], 0),
            "finish_reason": c.finish_reason,
            "stop_reason": c.stop_reason,
        }
        return {**self._envelope(self.object_full, [choice]), "usage": _usage(out)}

    def chunk(self, out: RequestOutput) -> dict | None:
        c = out.outputs[0]
        logprobs = self._logprobs(self._new_logprobs(out), len(c.text) - len(c.delta_text))
        if not c.delta_text and not out.finished and logprobs is None:
            return None
        choice = {
            "index": 0,
            "text": c.delta_text,
            "logprobs": logprobs,
            "finish_reason": c.finish_reason,
            "stop_reason": c.stop_reason,
        }
        return self._envelope(self.object_chunk, [choice])


class _ChatFormat(_Format):
    object_full, object_chunk = "chat.completion", "chat.completion.chunk"

    def _entry(self, token_id: int, logprob: float) -> dict:
        token = self._token(token_id)
        return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8"))}

    def _logprobs(self, entries) -> dict | None:
        if not self.body.logprobs:
            return None
        return {
            "content": [
                {
                    **self._entry(e.token_id, e.logprob),
                    "top_logprobs": [self._entry(t, lp) for t, lp in e.top.items()],
                }
                for e in entries
            ]
        }

    def full(self, out: RequestOutput) -> dict:
        c = out.outputs[0]
        choice = {
            "index": 0,
            "message": {"role": "assistant", "content": c.text},
            "logprobs": self._logprobs(c.logprobs or []),
            "finish_reason": c.finish_reason,
            "stop_reason": c.stop_reason,
        }
        return {**self._envelope(self.object_full, [choice]), "usage": _usage(out)}

    def first_chunk(self) -> dict:
        choice = {
            "index": 0,
            "delta": {"role": "assistant", "content": ""},
            "logprobs": None,
            "finish_reason": None,
        }
        return self._envelope(self.object_chunk, [choice])

    def chunk(self, out: RequestOutput) -> dict | None:
        c = out.outputs[0]
        logprobs = self._logprobs(self._new_logprobs(out))
        if not c.delta_text and not out.finished and logprobs is None:
            return None
        choice = {
            "index": 0,
            "delta": {"content": c.delta_text} if c.delta_text else {},
            "logprobs": logprobs,
            "finish_reason": c.finish_reason,
        }
        return self._envelope(self.object_chunk, [choice])
