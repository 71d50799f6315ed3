"""Benchmark metrics with vLLM ``bench serve``'s definitions and key names.

Per request (times in seconds on one clock): TTFT = first content chunk - sent; e2e latency =
end of the response - sent; TPOT = (e2e - TTFT) / (output tokens - 1), for requests of 2+ tokens; ITL = the
gaps between consecutive content chunks. Summaries are in milliseconds: mean, median, std
(population), p90, p99 (linear interpolation, as numpy's default). Goodput counts the completed
requests that meet every SLO given.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field


@dataclass
class RequestRecord:
    """What the client saw of one request."""

    sent: float  # seconds, when the request was sent
    ok: bool = False
    error: str | None = None
    prompt_tokens: int = 0
    output_tokens: int = 0
    chunk_times: list[float] = field(default_factory=list)  # arrival of each content chunk
    done: float | None = None  # when the response ended

    @property
    def ttft(self) -> float | None:
        return self.chunk_times[0] - self.sent if self.chunk_times else None

    @property
    def e2e(self) -> float | None:
        return None if self.done is None else self.done - self.sent

    @property
    def tpot(self) -> float | None:
        if self.output_tokens < 2 or self.ttft is None:
            return None
        return (self.e2e - self.ttft) / (self.output_tokens - 1)

    @property
    def itls(self) -> list[float]:
        t = self.chunk_times
        return [b - a for a, b in zip(t, t[1:])]


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100) by linear interpolation between closest ranks."""
    if not values:
        return float("nan")
    s = sorted(values)
    pos = (len(s) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def _describe(name: str, seconds: Sequence[float]) -> dict[str, float]:
    ms = [v * 1000 for v in seconds]
    nan = float("nan")
    return {
        f"mean_{name}_ms": statistics.fmean(ms) if ms else nan,
        f"median_{name}_ms": percentile(ms, 50),
        f"std_{name}_ms": statistics.pstdev(ms) if ms else nan,
        f"p90_{name}_ms": percentile(ms, 90),
        f"p99_{name}_ms": percentile(ms, 99),
    }


SLO_KEYS = {"ttft": "ttft", "tpot": "tpot", "e2el": "e2e"}


def parse_goodput(specs: Sequence[str]) -> dict[str, float]:
    """``["ttft:500", "tpot:50"]`` → SLOs in milliseconds keyed ``ttft``/``tpot``/``e2el``."""
    slos = {}
    for spec in specs:
        name, _, value = spec.partition(":")
        if name not in SLO_KEYS:
            raise ValueError(f"goodput: unknown SLO {name!r}; use ttft, tpot or e2el (milliseconds)")
        try:
            slos[name] = float(value)
        except ValueError:
            raise ValueError(f"goodput: {spec!r} is not name:milliseconds") from None
        if slos[name] <= 0:
            raise ValueError(f"goodput: {spec!r} must be > 0 ms")
    return slos


def meets_slos(record: RequestRecord, slos: dict[str, float]) -> bool:
    for name, limit_ms in slos.items():
        value = getattr(record, SLO_KEYS[name])
        if value is not None and value * 1000 > limit_ms:
            return False
    return True


def summarize(
    records: Sequence[RequestRecord], duration: float, slos: dict[str, float] | None = None
) -> dict[str, float | int]:
    """vLLM-named totals, throughputs and latency statistics over the completed requests."""
    done = [r for r in records if r.ok]
    total_in = sum(r.prompt_tokens for r in done)
    total_out = sum(r.output_tokens for r in done)
    result: dict[str, float | int] = {
        "duration": duration,
        "completed": len(done),
        "failed": len(records) - len(done),
        "total_input_tokens": total_in,
        "total_output_tokens": total_out,
        "request_throughput": len(done) / duration if duration > 0 else 0.0,
        "output_throughput": total_out / duration if duration > 0 else 0.0,
        "total_token_throughput": (total_in + total_out) / duration if duration > 0 else 0.0,
    }
    if slos:
        good = [r for r in done if meets_slos(r, slos)]
        result["request_goodput"] = len(good) / duration if duration > 0 else 0.0
        result["output_goodput"] = sum(r.output_tokens for r in good) / duration if duration > 0 else 0.0
    result.update(_describe("ttft", [r.ttft for r in done if r.ttft is not None]))
    result.update(_describe("tpot", [r.tpot for r in done if r.tpot is not None]))
    result.update(_describe("itl", [gap for r in done for gap in r.itls]))
    result.update(_describe("e2el", [r.e2e for r in done if r.e2e is not None]))
    return result
