"""``neuronserve run-batch``: OpenAI Batch API JSONL in, JSONL out, in process or on Ray Data.

Input, one request a line (OpenAI's batch format)::

    {"custom_id": "r1", "method": "POST", "url": "/v1/chat/completions", "body": {...}}

Output, one line per input line, in the order they finish::

    {"id": "batch_req_…", "custom_id": "r1", "response": {"status_code": 200, "request_id": "…",
     "body": {...}}, "error": null}

A request the server refuses (a bad field: 400) is a ``response`` with that status and OpenAI's
error body, as OpenAI's batches report it. A line that is not a request at all (not JSON, no
``custom_id``, an unsupported ``url``, a repeated ``custom_id``) gets ``"response": null`` and an
``error`` naming what is wrong, plus ``"line"`` (1-based), since it may have no usable id. Neither
stops the job.

Resumable: the output file is append-only and flushed after every line, so a killed job loses
nothing it wrote; a rerun reads the output first and skips every line already answered (by
``custom_id``, or by ``line`` for lines that had none), so nothing is done twice.

Requests run through ``server.app.create_app`` in process (``asgi``), exactly as ``neuronserve
serve`` would answer them. ``backend="local"``: one engine in this process. ``backend="ray"``: Ray
Data's ``map_batches`` over ``replicas`` engine-holding workers; results stream back to this
process, which alone writes the output file.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from neuronserve.distributed.spec import EngineSpec

URLS = ("/v1/chat/completions", "/v1/completions")


@dataclass
class BatchItem:
    """One input line: a request to run, or the reason it cannot run (``error``)."""

    line: int  # 1-based
    custom_id: str | None = None
    url: str | None = None
    body: dict | None = None
    error: str | None = None

    @property
    def key(self) -> str:
        """What a rerun recognizes this line's output by."""
        return f"id:{self.custom_id}" if self.error is None else f"line:{self.line}"


@dataclass
class BatchSummary:
    total: int  # lines with a request (blank lines do not count)
    skipped: int  # answered by an earlier run
    succeeded: int  # answered 200 in this run
    failed: int  # answered with an error status or a line error in this run


def parse_requests(lines: Iterable[str]) -> list[BatchItem]:
    """The input's items, each checked on its own: a bad line becomes an item with ``error``."""
    items: list[BatchItem] = []
    seen: set[str] = set()
    for n, text in enumerate(lines, start=1):
        if not text.strip():
            continue
        try:
            record = json.loads(text)
        except json.JSONDecodeError as exc:
            items.append(BatchItem(n, error=f"line {n}: not valid JSON ({exc.msg})"))
            continue
        items.append(_check(n, record, seen))
    return items


def _check(n: int, record, seen: set[str]) -> BatchItem:
    if not isinstance(record, dict):
        return BatchItem(n, error=f"line {n}: expected a JSON object")
    custom_id = record.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        return BatchItem(n, error="custom_id: missing or not a non-empty string")
    if custom_id in seen:
        return BatchItem(n, custom_id, error=f"custom_id: {custom_id!r} repeats an earlier line's")
    seen.add(custom_id)
    if record.get("method", "POST").upper() != "POST":
        return BatchItem(n, custom_id, error=f"method: {record.get('method')!r} is not POST")
    url = record.get("url")
    if url not in URLS:
        return BatchItem(n, custom_id, error=f"url: {url!r} is not one of {', '.join(URLS)}")
    body = record.get("body")
    if not isinstance(body, dict):
        return BatchItem(n, custom_id, error="body: missing or not a JSON object")
    if body.get("stream"):
        return BatchItem(n, custom_id, error="body.stream: batch requests cannot stream")
    return BatchItem(n, custom_id, url, body)


def finished_keys(output: Path) -> set[str]:
    """Keys of the lines an earlier run already answered. A torn last line (the process died
    mid-write) is ignored, so that request runs again and its line is rewritten whole."""
    keys: set[str] = set()
    if not output.exists():
        return keys
    with output.open() as f:
        for text in f:
            try:
                record = json.loads(text)
            except json.JSONDecodeError:
                continue
            keys.add(f"line:{record['line']}" if "line" in record else f"id:{record.get('custom_id')}")
    return keys


def _repair_tail(output: Path) -> None:
    """Cut a torn last line (no newline) so appended lines start on a line of their own."""
    if not output.exists() or output.stat().st_size == 0:
        return
    data = output.read_bytes()
    if not data.endswith(b"\n"):
        output.write_bytes(data[: data.rfind(b"\n") + 1])


def response_line(item: BatchItem, status: int, headers: dict, body: dict) -> dict:
    return {
        "id": f"batch_req_{uuid.uuid4().hex}",
        "custom_id": item.custom_id,
        "response": {"status_code": status, "request_id": headers.get("x-request-id"), "body": body},
        "error": None,
    }


def error_line(item: BatchItem) -> dict:
    code = "invalid_request" if item.custom_id is None else "invalid_line"
    return {
        "id": f"batch_req_{uuid.uuid4().hex}",
        "custom_id": item.custom_id,
        "line": item.line,
        "response": None,
        "error": {"code": code, "message": item.error},
    }


async def run_items(app, items: list[BatchItem], concurrency: int = 64) -> AsyncIterator[dict]:
    """Output lines of ``items`` (all valid) through ``app`` (an ``InProcessApp``), as they finish,
    at most ``concurrency`` in flight (the engine batches them)."""
    limit = asyncio.Semaphore(concurrency)

    async def one(item: BatchItem) -> dict:
        async with limit:
            status, headers, body = await app.request("POST", item.url, item.body)
        return response_line(item, status, headers, body)

    tasks = [asyncio.create_task(one(item)) for item in items]
    try:
        for done in asyncio.as_completed(tasks):
            yield await done
    finally:
        for task in tasks:
            task.cancel()


def run_batch(
    input_path: str | Path,
    output_path: str | Path,
    spec: EngineSpec,
    backend: str = "local",
    replicas: int = 2,
    num_cpus_per_replica: float = 1.0,
    concurrency: int = 64,
    address: str | None = None,
    progress: bool = True,
) -> BatchSummary:
    """Run every not-yet-answered line of ``input_path``, appending to ``output_path``."""
    if backend not in ("local", "ray"):
        raise ValueError(f"backend: {backend!r} is not one of local, ray")
    if concurrency < 1:
        raise ValueError(f"concurrency: must be >= 1, got {concurrency}")
    input_path, output_path = Path(input_path), Path(output_path)
    with input_path.open() as f:
        items = parse_requests(f)
    _repair_tail(output_path)
    done = finished_keys(output_path)
    todo = [i for i in items if i.key not in done]
    summary = BatchSummary(total=len(items), skipped=len(items) - len(todo), succeeded=0, failed=0)
    bar = _progress(len(items), summary.skipped, progress)
    output_path.parent.mkdir(parents=True, exist_ok=True)
    with output_path.open("a") as out:

        def write(record: dict) -> None:
            out.write(json.dumps(record, ensure_ascii=False) + "\n")
            out.flush()  # a kill after this loses nothing
            ok = record["error"] is None and record["response"]["status_code"] == 200
            summary.succeeded += ok
            summary.failed += not ok
            bar.update(1)

        for item in todo:
            if item.error is not None:
                write(error_line(item))
        runnable = [i for i in todo if i.error is None]
        if runnable:
            results = _run_local if backend == "local" else _run_ray
            kwargs = {} if backend == "local" else {"replicas": replicas, "num_cpus": num_cpus_per_replica}
            if backend == "ray":
                kwargs["address"] = address
            for record in results(runnable, spec, concurrency, **kwargs):
                write(record)
    bar.close()
    return summary


def _run_local(items: list[BatchItem], spec: EngineSpec, concurrency: int) -> Iterator[dict]:
    """One engine in this process; yields output lines as they finish."""
    from neuronserve.distributed.asgi import InProcessApp

    loop = asyncio.new_event_loop()
    app = InProcessApp(spec.build, spec.name)
    stream = run_items(app, items, concurrency)
    try:
        loop.run_until_complete(app.start())
        while True:
            try:
                yield loop.run_until_complete(stream.__anext__())
            except StopAsyncIteration:
                break
    finally:
        loop.run_until_complete(stream.aclose())
        loop.run_until_complete(app.stop())
        loop.close()


class BatchWorker:
    """A Ray Data ``map_batches`` callable: one engine per worker, one batch of requests a call."""

    def __init__(self, spec: dict, concurrency: int = 64) -> None:
        from neuronserve.distributed.asgi import InProcessApp

        spec_obj = EngineSpec(**spec)
        self.concurrency = concurrency
        self.loop = asyncio.new_event_loop()
        self.app = InProcessApp(spec_obj.build, spec_obj.name)
        self.loop.run_until_complete(self.app.start())

    def __call__(self, batch: dict) -> dict:
        items = [BatchItem(**json.loads(s)) for s in batch["item"]]

        async def run() -> list[str]:
            return [
                json.dumps(r, ensure_ascii=False) async for r in run_items(self.app, items, self.concurrency)
            ]

        return {"result": self.loop.run_until_complete(run())}


def _run_ray(
    items: list[BatchItem],
    spec: EngineSpec,
    concurrency: int,
    replicas: int,
    num_cpus: float,
    address: str | None,
) -> Iterator[dict]:
    """Ray Data across ``replicas`` engine workers; output lines stream back as batches finish."""
    from neuronserve.distributed import require_ray

    ray = require_ray()
    if not ray.is_initialized():
        if address:
            ray.init(address=address)
        else:
            ray.init(include_dashboard=False)
    # Small batches: a batch's lines are written once all of them finish, and a kill loses the
    # batches in flight, so smaller ones lose (and redo) less.
    batch_size = max(1, min(16, len(items) // max(replicas, 1) or 1))
    dataset = ray.data.from_items([{"item": json.dumps(asdict(i))} for i in items])
    results = dataset.map_batches(
        BatchWorker,
        fn_constructor_kwargs={"spec": spec.to_dict(), "concurrency": concurrency},
        batch_size=batch_size,
        concurrency=replicas,
        num_cpus=num_cpus,
    )
    for row in results.iter_rows():
        yield json.loads(row["result"])


def _progress(total: int, initial: int, enabled: bool):
    try:
        from tqdm import tqdm
    except ImportError:  # tqdm comes with the model extra; without it, no bar
        enabled = False
    if not enabled:
        return _NoBar()
    return tqdm(total=total, initial=initial, unit="req", desc="run-batch", dynamic_ncols=True)


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass
