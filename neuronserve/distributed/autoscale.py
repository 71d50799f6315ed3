"""Ray Serve autoscaling on queue depth, with the target from ``neuronserve plan``'s simulator.

Ray Serve scales a deployment so that each replica has about ``target_ongoing_requests`` requests
in flight (queued or running). The planner finds the highest request rate one replica sustains
within the SLOs (``rps_per_replica``); by Little's law the requests in flight at that rate are the
rate times the mean time a request spends in the system, which the same simulation gives. Scaling
to that depth keeps each replica at (not beyond) the load the SLOs allow.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass


@dataclass
class PlanTarget:
    instance: str
    tp: int
    rps_per_replica: float  # requests/s one replica sustains within the SLOs (simulated)
    mean_e2e_s: float  # mean seconds in the system at that rate (simulated)

    @property
    def target_ongoing_requests(self) -> float:
        """Little's law: requests in flight per replica at the SLO-limited rate (at least 1)."""
        return max(1.0, self.rps_per_replica * self.mean_e2e_s)


def autoscaling_config(
    min_replicas: int, max_replicas: int, target_ongoing_requests: float | None = None, **overrides
) -> dict:
    """Ray Serve's ``autoscaling_config``; ``target_ongoing_requests`` defaults to Ray's (2)."""
    if not 0 <= min_replicas <= max_replicas or max_replicas < 1:
        raise ValueError(f"autoscale: need 0 <= MIN <= MAX and MAX >= 1, got {min_replicas}:{max_replicas}")
    if target_ongoing_requests is not None and target_ongoing_requests <= 0:
        raise ValueError(f"target_ongoing_requests: must be > 0, got {target_ongoing_requests}")
    config = {
        "min_replicas": min_replicas,
        "max_replicas": max_replicas,
        "initial_replicas": max(min_replicas, 1),
        # A new engine takes seconds to load: scale up promptly, down slowly.
        "upscale_delay_s": 10.0,
        "downscale_delay_s": 300.0,
    }
    if target_ongoing_requests is not None:
        config["target_ongoing_requests"] = round(target_ongoing_requests, 2)
    return {**config, **overrides}


def plan_target(
    model: str,
    instance: str,
    tp: int,
    slos_ms: dict[str, float],
    attainment: float = 0.95,
    num_prompts: int = 200,
    output_len: int = 128,
    max_num_seqs: int = 32,
    max_model_len: int = 4096,
    quantization: str | None = None,
    seed: int = 0,
) -> PlanTarget:
    """Simulate one replica of ``model`` on ``instance`` at TP ``tp`` as ``neuronserve plan`` does
    (shopping workload): its SLO-limited rate and the mean latency at that rate."""
    from neuronserve.sim.commands import model_config, neuron_setup, workload
    from neuronserve.sim.planner import attains, max_rate
    from neuronserve.sim.simulator import simulate

    args = argparse.Namespace(
        model=model,
        quantization=quantization,
        kv_cache_dtype="auto",
        workload="shopping",
        num_prompts=num_prompts,
        output_len=output_len,
        max_num_seqs=max_num_seqs,
        max_model_len=max_model_len,
        seed=seed,
    )
    config = model_config(model)
    profile, cost, sched, cache = neuron_setup(args, config, instance, tp)
    requests = workload(args)

    def run(rate: float):
        return simulate(requests, profile, cost, sched, cache, request_rate=rate, seed=seed)

    rps = max_rate(lambda rate: attains(run(rate).records, slos_ms, attainment))
    if rps <= 0:
        raise ValueError(f"slo: one replica on {instance} at TP {tp} meets {slos_ms} ms at no request rate")
    latencies = [r.e2e for r in run(rps).records if r.e2e is not None]
    mean = sum(latencies) / len(latencies) if latencies else math.nan
    return PlanTarget(instance, tp, rps, mean)
