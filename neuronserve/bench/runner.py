"""Drive a client through a workload: closed loop (a fixed number in flight) or open loop (arrivals
at a request rate, optionally capped in flight), with a progress bar.

Every request ends up in the result: completed, failed (with its error), or never sent because the
target became unreachable, which stops the run early with the reason stated.
"""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass

from neuronserve.bench.arrivals import arrival_times
from neuronserve.bench.clients import TargetUnreachable
from neuronserve.bench.metrics import RequestRecord
from neuronserve.bench.workloads import RequestSpec


@dataclass
class RunResult:
    records: list[RequestRecord]
    duration: float  # seconds from the first send to the last response
    stopped_early: str | None = None  # why the run ended before every request was sent


async def run(
    client,
    specs: list[RequestSpec],
    *,
    concurrency: int | None = None,
    request_rate: float = math.inf,
    burstiness: float = 1.0,
    seed: int = 0,
    progress: bool = True,
    description: str = "benchmark",
) -> RunResult:
    """Send ``specs`` through ``client`` (entered already); ``concurrency`` caps requests in flight
    (closed loop when ``request_rate`` is infinite)."""
    if concurrency is not None and concurrency < 1:
        raise ValueError(f"concurrency: must be >= 1, got {concurrency}")
    if math.isinf(request_rate) and concurrency is None:
        concurrency = len(specs)
    from tqdm.auto import tqdm

    times = arrival_times(len(specs), request_rate, burstiness, seed)
    limit = asyncio.Semaphore(concurrency or len(specs) or 1)
    records: list[RequestRecord | None] = [None] * len(specs)
    stop: list[str] = []
    start = time.perf_counter()
    bar = tqdm(total=len(specs), desc=description, unit="req", disable=not progress)

    async def one(i: int) -> None:
        delay = start + times[i] - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        async with limit:
            if stop:
                records[i] = RequestRecord(sent=time.perf_counter(), error=f"not sent: {stop[0]}")
            else:
                try:
                    records[i] = await client.send(specs[i])
                except TargetUnreachable as exc:
                    records[i] = RequestRecord(sent=time.perf_counter(), error=str(exc))
                    if not stop:
                        stop.append(f"the target became unreachable ({exc})")
        bar.update(1)

    try:
        await asyncio.gather(*(one(i) for i in range(len(specs))))
    finally:
        bar.close()
    ends = [r.done for r in records if r.done is not None]
    duration = (max(ends) if ends else time.perf_counter()) - start
    return RunResult(records, duration, stop[0] if stop else None)
