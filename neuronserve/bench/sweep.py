"""One benchmark run per load level (a concurrency or a request rate), summarized into one table."""

from __future__ import annotations

import math

from neuronserve.bench.cost import add_costs
from neuronserve.bench.metrics import summarize
from neuronserve.bench.report import load_label
from neuronserve.bench.runner import run
from neuronserve.bench.workloads import RequestSpec


async def sweep(
    client,
    specs: list[RequestSpec],
    *,
    concurrencies: list[int] | None = None,
    request_rates: list[float] | None = None,
    max_concurrency: int | None = None,
    burstiness: float = 1.0,
    slos: dict[str, float] | None = None,
    price_per_hour: float | None = None,
    seed: int = 0,
    progress: bool = True,
) -> list[dict]:
    """Run the workload once per concurrency (closed loop) or per request rate (open loop, at
    most ``max_concurrency`` in flight). Each result: the load, vLLM-named metrics, costs when a
    price is given, the failures' errors, and the per-request TTFTs for plots."""
    loads: list[tuple[int | None, float]]
    if concurrencies:
        loads = [(c, math.inf) for c in concurrencies]
    else:
        loads = [(max_concurrency, rate) for rate in (request_rates or [math.inf])]
    results = []
    for concurrency, rate in loads:
        label = load_label({"concurrency": concurrency, "request_rate": rate})
        result = await run(
            client,
            specs,
            concurrency=concurrency,
            request_rate=rate,
            burstiness=burstiness,
            seed=seed,
            progress=progress,
            description=f"{getattr(client, 'name', 'target')}: {label}",
        )
        summary = summarize(result.records, result.duration, slos)
        if price_per_hour is not None:
            summary = add_costs(summary, price_per_hour)
        errors = sorted({r.error for r in result.records if r.error})
        summary.update(
            concurrency=concurrency,
            request_rate=rate,
            burstiness=burstiness,
            stopped_early=result.stopped_early,
            errors=errors[:10],
            ttfts_ms=[r.ttft * 1000 for r in result.records if r.ok and r.ttft is not None],
        )
        results.append(summary)
        if result.stopped_early:
            break  # the target is gone: later loads would only fail the same way
    return results
