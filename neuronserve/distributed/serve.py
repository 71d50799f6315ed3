"""The Ray Serve application: N engine replicas behind one OpenAI-compatible gateway.

    gateway (ingress, FastAPI) ──handle, NeuronserveRouter──► EngineReplica x N (one Engine each)

- ``EngineReplica`` loads its engine in its constructor (so Ray counts it as running only once it
  can serve) and answers requests through ``server.app.create_app`` in process (``asgi``): every
  route, validation error and SSE chunk is the single-machine server's. It streams the response
  back as a ``(status, headers)`` item followed by body chunks; ``check_health`` fails when the
  engine's loop has stopped, and Ray then replaces the replica.
- ``Gateway`` forwards every route to a replica chosen by ``NeuronserveRouter`` (prefix-aware by
  default) with the prompt's prefix hashes. A replica that dies before the response's first body
  chunk (nothing reached the client yet) is retried on another; one that dies mid-stream ends the
  stream with an OpenAI-shaped error event; if no replica answers, the client gets a 503 JSON error.
"""

# No ``from __future__ import annotations``: Ray Serve's class-based FastAPI views read the
# route's annotations at decoration time.
import json
import logging
import os
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.config import RequestRouterConfig
from ray.serve.handle import DeploymentHandle

from neuronserve.distributed.asgi import InProcessApp, ResponseStart
from neuronserve.distributed.routing import prefix_hashes, routing_text
from neuronserve.distributed.serve_router import NeuronserveRouter
from neuronserve.distributed.spec import EngineSpec, ReplicaConfig

logger = logging.getLogger(__name__)
APP_NAME = "neuronserve"
REPLICA_HEADER, PID_HEADER = "x-neuronserve-replica", "x-neuronserve-pid"
_FORWARDED_HEADERS = ("authorization", "content-type", "accept")
_DROPPED_HEADERS = ("content-length", "transfer-encoding")


def _error(status: int, message: str, type: str = "service_unavailable") -> dict:
    return {"error": {"message": message, "type": type, "param": None, "code": status}}


@serve.deployment(name="EngineReplica")
class EngineReplica:
    """One engine on its backend, serving ``create_app``'s routes."""

    def __init__(self, spec: dict) -> None:
        self.spec = EngineSpec(**spec)
        engine = self.spec.build()
        self.app = InProcessApp(lambda: engine, self.spec.name, api_key=self.spec.api_key)
        self.replica_id = serve.get_replica_context().replica_id.unique_id
        self.pid = os.getpid()

    async def handle_http(
        self, method: str, path: str, headers: dict, body: bytes, prefix_hashes: list | None = None
    ) -> AsyncIterator[tuple[int, dict] | bytes]:
        """The response to one HTTP request: ``(status, headers)``, then body chunks.
        ``prefix_hashes`` is read by the router, not here."""
        await self.app.start()
        async for item in self.app.stream(method, path, body, headers):
            if isinstance(item, ResponseStart):
                item.headers.update({REPLICA_HEADER: self.replica_id, PID_HEADER: str(self.pid)})
                yield item.status, item.headers
            else:
                yield item

    async def stats(self) -> dict:
        """This replica's scheduler counters (prefix-cache queries and hits are in tokens)."""
        await self.app.start()
        s = self.app.async_engine.engine.scheduler.stats()
        return {"replica_id": self.replica_id, "pid": self.pid, **vars(s)}

    async def check_health(self) -> None:
        """Called by Ray Serve every ``health_check_period_s``; raising gets the replica replaced."""
        engine = self.app.async_engine
        if engine is not None and engine.error is not None:
            raise RuntimeError(f"the engine loop stopped: {engine.error!r}")
        if self.app.load_error is not None:
            raise RuntimeError(self.app.load_error)


def _request_hashes(body: bytes) -> list[bytes]:
    if not body:
        return []
    try:
        parsed = json.loads(body)
    except ValueError:
        return []
    return prefix_hashes(routing_text(parsed)) if isinstance(parsed, dict) else []


async def _next_or_none(stream):
    try:
        return await stream.__anext__()
    except StopAsyncIteration:
        return None


async def _relay(first: bytes | None, stream, content_type: str) -> AsyncIterator[bytes]:
    """The body: the chunk already read, then the rest; a replica lost mid-stream ends an SSE
    stream with an error event and ``[DONE]`` (the status line has already gone out)."""
    finished = False
    try:
        if first is not None:
            yield first
        async for chunk in stream:
            yield chunk
        finished = True
    except Exception as exc:  # RayActorError: the replica died; anything else: it failed
        finished = True
        logger.warning("replica lost mid-stream: %r", exc)
        if content_type.startswith("text/event-stream"):
            died = isinstance(exc, RayActorError)
            reason = "died" if died else "failed"
            error = _error(
                503 if died else 500, f"the replica serving this request {reason}: {type(exc).__name__}"
            )
            yield f"data: {json.dumps(error)}\n\ndata: [DONE]\n\n".encode()
    finally:
        if not finished:  # the client left: cancelling the call aborts the request on the replica
            stream.cancel()


gateway_app = FastAPI(title="neuronserve (Ray Serve)")


@serve.deployment(name="Gateway")
@serve.ingress(gateway_app)
class Gateway:
    """The HTTP entry point: forwards each request to the replica the router picks."""

    def __init__(self, replicas: DeploymentHandle, max_attempts: int = 3) -> None:
        self.replicas = replicas
        self.max_attempts = max_attempts

    @gateway_app.api_route("/{path:path}", methods=["GET", "POST"])
    async def forward(self, path: str, request: Request):
        body = await request.body()
        headers = {k: v for k, v in request.headers.items() if k in _FORWARDED_HEADERS}
        target = "/" + path + (f"?{request.url.query}" if request.url.query else "")
        hashes = _request_hashes(body)
        last_error: Exception | None = None
        for attempt in range(self.max_attempts):
            stream = self.replicas.options(stream=True).handle_http.remote(
                request.method, target, headers, body, prefix_hashes=hashes
            )
            try:
                status, response_headers = await stream.__anext__()
                first = await _next_or_none(stream)
            except RayActorError as exc:  # died before anything reached the client: try another
                logger.warning("replica died before answering (attempt %d): %s", attempt + 1, exc)
                last_error = exc
                continue
            except Exception as exc:  # anything else Ray raised: a clean 5xx, never a traceback
                logger.exception("request failed in the gateway")
                status = 503 if type(exc).__name__ == "BackPressureError" else 500
                return JSONResponse(_error(status, f"the request failed: {type(exc).__name__}"), status)
            for name in _DROPPED_HEADERS:
                response_headers.pop(name, None)
            return StreamingResponse(
                _relay(first, stream, response_headers.get("content-type", "")),
                status_code=status,
                headers=response_headers,
            )
        message = f"no replica could serve the request after {self.max_attempts} attempts: {last_error}"
        return JSONResponse(_error(503, message), status_code=503, headers={"Retry-After": "1"})


def build_app(spec: EngineSpec, config: ReplicaConfig):
    """The bound application (replicas + gateway), ready for ``serve.run``."""
    replica_options = {
        "ray_actor_options": config.ray_actor_options(),
        "max_ongoing_requests": config.max_ongoing_requests,
        "health_check_period_s": config.health_check_period_s,
        "health_check_timeout_s": config.health_check_timeout_s,
        "request_router_config": RequestRouterConfig(
            request_router_class=NeuronserveRouter,
            request_router_kwargs={"routing": config.routing, "load_factor": config.load_factor},
        ),
    }
    if config.autoscaling:
        replica_options["autoscaling_config"] = config.autoscaling
    else:
        replica_options["num_replicas"] = config.num_replicas
    replicas = EngineReplica.options(**replica_options).bind(spec.to_dict())
    # The gateway only relays bytes: no CPU reserved, and enough in flight for every replica.
    gateway_options = {
        "ray_actor_options": {"num_cpus": 0},
        "max_ongoing_requests": 4 * config.max_ongoing_requests * max(config.num_replicas, 1),
    }
    return Gateway.options(**gateway_options).bind(replicas)


def start(
    spec: EngineSpec,
    config: ReplicaConfig,
    address: str | None = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    num_cpus: int | None = None,
    blocking: bool = False,
) -> DeploymentHandle:
    """Join the Ray cluster at ``address`` (or start a local one with ``num_cpus`` logical CPUs),
    start Serve's HTTP proxy on ``host:port`` and deploy the app; returns the gateway's handle."""
    import ray

    if not ray.is_initialized():
        if address:
            ray.init(address=address)
        else:
            ray.init(num_cpus=num_cpus, include_dashboard=False)
    serve.start(http_options={"host": host, "port": port})
    return serve.run(build_app(spec, config), name=APP_NAME, route_prefix="/", blocking=blocking)


def replica_handle() -> DeploymentHandle:
    """A handle to the running app's engine replicas (for stats and tests)."""
    return serve.get_deployment_handle("EngineReplica", app_name=APP_NAME)
