"""Capacity planning: for each instance type and TP degree that fits the model, the highest request
rate one model replica sustains while meeting the SLOs (simulated), how many instances a peak
load needs, and what that costs per hour and per million output tokens; cheapest first."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

from neuronserve.bench.cost import cost_per_million, instance_prices
from neuronserve.bench.metrics import meets_slos
from neuronserve.hardware import INSTANCES, NEURON_TP_DEGREES, fit_report


@dataclass
class Candidate:
    instance: str
    tp: int

    @property
    def replicas_per_instance(self) -> int:
        return INSTANCES[self.instance].cores // self.tp


@dataclass
class PlanRow:
    instance: str
    tp: int
    replicas_per_instance: int
    rps_per_replica: float
    instances: int
    cost_per_hour: float
    cost_per_million_output_tokens: float

    def to_dict(self) -> dict:
        return asdict(self)


def candidates(
    config, quantization: str | None = None, instances: Sequence[str] | None = None, **fit
) -> list[Candidate]:
    """Every (instance, TP degree) with a price whose NeuronCores hold the model (fit check)."""
    prices = instance_prices()["instances"]
    out = []
    for name in instances or INSTANCES:
        inst = INSTANCES[name]
        if prices.get(name, {}).get("on_demand") is None:
            continue
        for tp in NEURON_TP_DEGREES[inst.family]:
            if tp <= inst.cores and fit_report(config, name, tp, quantization=quantization, **fit).fits:
                out.append(Candidate(name, tp))
    return out


def plan(
    candidates: Sequence[Candidate],
    peak_rps: float,
    capacity: Callable[[Candidate], float],
    price_per_hour: Callable[[str], float],
    mean_output_tokens: float,
) -> list[PlanRow]:
    """The fleet for ``peak_rps`` on each candidate, cheapest per hour first. ``capacity``: the
    request rate one replica sustains within the SLOs; candidates that sustain none are left out."""
    rows = []
    for c in candidates:
        rps = capacity(c)
        if rps <= 0:
            continue
        replicas = math.ceil(peak_rps / rps - 1e-9)
        instances = math.ceil(replicas / c.replicas_per_instance)
        per_hour = instances * price_per_hour(c.instance)
        rows.append(
            PlanRow(
                instance=c.instance,
                tp=c.tp,
                replicas_per_instance=c.replicas_per_instance,
                rps_per_replica=rps,
                instances=instances,
                cost_per_hour=per_hour,
                cost_per_million_output_tokens=cost_per_million(per_hour, peak_rps * mean_output_tokens),
            )
        )
    return sorted(rows, key=lambda r: (r.cost_per_hour, r.instances, r.instance, r.tp))


def max_rate(
    meets: Callable[[float], bool], start: float = 1.0, rel_tol: float = 0.05, max_doublings: int = 16
) -> float:
    """The highest request rate for which ``meets(rate)`` holds (0 if not even ``start / 2^k``),
    by doubling then bisection, assuming it holds below some rate and fails above it."""
    lo, hi = 0.0, start
    for _ in range(max_doublings):
        if not meets(hi):
            break
        lo, hi = hi, hi * 2
    else:
        return lo
    if lo == 0.0:  # failed at the start: search downwards
        for _ in range(max_doublings):
            hi /= 2
            if meets(hi):
                lo = hi
                hi *= 2
                break
        else:
            return 0.0
    while hi - lo > rel_tol * lo:
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if meets(mid) else (lo, mid)
    return lo


def attains(records, slos: dict[str, float], attainment: float) -> bool:
    """At least ``attainment`` of the requests completed within every SLO."""
    good = sum(1 for r in records if r.ok and meets_slos(r, slos))
    return good >= attainment * len(records)
