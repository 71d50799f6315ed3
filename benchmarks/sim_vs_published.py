"""The Inferentia2 model against AWS's published Llama-3-8B figures (int8 weights, inf2.48xlarge,
TP 24): fit one factor on one figure, predict the other two, for each choice of figure.

Published (AWS Neuron docs' inference performance page for Llama-3-8B on Inf2, as quoted in the
project's issue; not re-fetched here): 6.4-7.4 ms per output token at batch 1; time to first
token 25-29 ms for a 128-token prompt; ~859 output tokens/s at batch 8. The midpoints are the
targets. The factor fitted is the per-collective latency (decode at TP 24 is 65 collectives a
step); compute and memory efficiencies keep their defaults. Writes
benchmarks/results/sim_vs_published.json.

    python benchmarks/sim_vs_published.py [--write-profile]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from neuronserve.bench.metrics import summarize
from neuronserve.config import CacheConfig, SchedulerConfig
from neuronserve.presets import preset
from neuronserve.sim.profiles import fitted_factors, neuron_profile
from neuronserve.sim.simulator import SimRequest, approx_token_ids, simulate
from neuronserve.sim.stepmodel import ModelCost

PUBLISHED = {  # name: (low, high, unit)
    "tpot_b1_ms": (6.4, 7.4, "ms per output token, batch 1"),
    "ttft_128_ms": (25.0, 29.0, "ms to first token, 128-token prompt"),
    "throughput_b8": (859.0, 859.0, "output tokens/s, batch 8"),
}
DEFAULTS = {"compute_eff": 0.5, "memory_eff": 0.6, "step_overhead_s": 0.0005}


def predict(latency_s: float, compute_eff: float = DEFAULTS["compute_eff"]) -> dict[str, float]:
    factors = {**DEFAULTS, "collective_latency_s": latency_s, "compute_eff": compute_eff}
    profile = neuron_profile("inf2.48xlarge", factors)
    cost = ModelCost(preset("llama-3-8b"), 24, weight_bytes=2.0, quantization="int8", kv_bytes=2.0)
    sched = SchedulerConfig(max_num_seqs=8, max_model_len=1024, max_waiting=None)
    cache = CacheConfig(block_size=16, num_blocks=8 * 64 + 1)
    prompt = approx_token_ids(" ".join(f"w{i}" for i in range(128)))
    assert len(prompt) == 128
    one = simulate([SimRequest(prompt, 256)], profile, cost, sched, cache, concurrency=1)
    s1 = summarize(one.records, one.duration)
    prompts = [approx_token_ids(" ".join(f"r{j}w{i}" for i in range(128))) for j in range(8)]
    eight = simulate([SimRequest(p, 256) for p in prompts], profile, cost, sched, cache, concurrency=8)
    s8 = summarize(eight.records, eight.duration)
    return {
        "tpot_b1_ms": s1["mean_tpot_ms"],
        "ttft_128_ms": s1["mean_ttft_ms"],
        "throughput_b8": s8["output_throughput"],
    }


def _bisect(value_of, goal: float, lo: float, hi: float, increasing: bool) -> float:
    for _ in range(60):
        mid = (lo + hi) / 2
        too_high = value_of(mid) > goal if increasing else value_of(mid) < goal
        lo, hi = (lo, mid) if too_high else (mid, hi)
    return (lo + hi) / 2


def fit(target: str, compute_eff: float = DEFAULTS["compute_eff"]) -> float:
    """The collective latency that makes ``target`` hit its published midpoint."""
    low, high, _ = PUBLISHED[target]
    increasing = target != "throughput_b8"  # throughput falls as latency grows
    return _bisect(lambda x: predict(x, compute_eff)[target], (low + high) / 2, 0.0, 1e-3, increasing)


def fit_two() -> tuple[float, float]:
    """Two factors on two figures: the latency on time per token, the compute efficiency on time
    to first token (alternating: each barely moves the other's figure)."""
    latency, eff = fit("tpot_b1_ms"), DEFAULTS["compute_eff"]
    ttft_goal = sum(PUBLISHED["ttft_128_ms"][:2]) / 2
    for _ in range(4):
        fixed = latency
        eff = 1 / _bisect(
            lambda inv, x=fixed: predict(x, 1 / inv)["ttft_128_ms"], ttft_goal, 1.0, 1000.0, True
        )
        latency = fit("tpot_b1_ms", eff)
    return latency, eff


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "sim_vs_published.json"))
    parser.add_argument("--write-profile", action="store_true", help="ship the two-factor fit")
    args = parser.parse_args()
    rows = []
    for target in PUBLISHED:
        latency = fit(target)
        got = predict(latency)
        errors = {}
        for name, (low, high, _) in PUBLISHED.items():
            mid = (low + high) / 2
            errors[name] = {
                "predicted": round(got[name], 2),
                "published": [low, high],
                "error": round(got[name] / mid - 1, 3),
            }
        rows.append(
            {"fitted_on": target, "collective_latency_us": round(latency * 1e6, 2), "results": errors}
        )
        print(
            f"fit on {target}: latency {latency * 1e6:.1f} us ->",
            {k: (v["predicted"], f"{v['error']:+.1%}") for k, v in errors.items()},
        )
    latency, eff = fit_two()
    got = predict(latency, eff)
    two = {
        name: {"predicted": round(got[name], 2), "error": round(got[name] / ((lo + hi) / 2) - 1, 3)}
        for name, (lo, hi, _) in PUBLISHED.items()
    }
    print(
        f"two factors on tpot_b1_ms + ttft_128_ms: latency {latency * 1e6:.1f} us, compute_eff {eff:.3f} ->",
        two,
    )
    result = {
        "defaults": DEFAULTS,
        "published": PUBLISHED,
        "fits": rows,
        "two_factor_fit": {
            "collective_latency_us": round(latency * 1e6, 2),
            "compute_eff": round(eff, 4),
            "results": two,
        },
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    if args.write_profile:
        path = Path(__file__).parent.parent / "neuronserve" / "data" / "sim_profiles.json"
        data = fitted_factors()
        data["neuron"] = {
            "factors": {**DEFAULTS, "collective_latency_s": latency, "compute_eff": eff},
            "fitted_on": "Llama-3-8B int8 on inf2.48xlarge TP 24 (AWS Neuron docs): collective latency on "
            "6.9 ms/token at batch 1, compute efficiency on 27 ms TTFT for 128 tokens (midpoints); memory "
            "efficiency and step overhead are defaults. Held out: 859 tok/s at batch 8. "
            "See docs/simulator.md.",
        }
        path.write_text(json.dumps(data, indent=2) + "\n")
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
