"""The simulator against this machine: calibrate on one set of in-process benchmark runs of the
CPU backend, then predict a *different* run (other concurrency, other prompt and answer lengths)
and compare mean TTFT and output throughput with what the engine measures. One run each.
Writes benchmarks/results/sim_vs_cpu.json.

Calibration: ``calibrate_cpu()`` measures bandwidth, fp32 GEMM rate and per-step overhead; then
the shopping workload runs at concurrency 4 and 16 through ``neuronserve bench``'s in-process
client, every engine step's shape and wall time is recorded, and the memory, KV and compute
efficiencies are fitted to those steps. Validation: the random workload (prompts 100-600 tokens,
answers 32-128) at concurrency 8 — measured, and simulated with the same requests.

    python benchmarks/sim_vs_cpu.py [--write-profile]
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import time
from pathlib import Path

from neuronserve.bench import workloads
from neuronserve.bench.clients import EngineClient
from neuronserve.bench.sweep import sweep
from neuronserve.config import CacheConfig, SchedulerConfig
from neuronserve.engine.async_engine import AsyncEngine
from neuronserve.engine.engine import Engine
from neuronserve.presets import preset
from neuronserve.sim.fit import fit_efficiencies
from neuronserve.sim.profiles import calibrate_cpu, fitted_factors
from neuronserve.sim.simulator import SimRequest, simulate
from neuronserve.sim.stepmodel import ModelCost


def make_engine(max_num_seqs: int) -> Engine:
    return Engine.from_pretrained(
        "smollm2-135m-instruct",
        scheduler_config=SchedulerConfig(max_num_seqs=max_num_seqs, max_model_len=2048, max_waiting=None),
        cache_config=CacheConfig(),
        kv_cache_gb=1.0,
    )


def record_steps(engine: Engine) -> list:
    """Wrap ``execute`` to log each step's chunks and start time; a step lasts until the next one
    starts (the engine is never idle in a closed loop), the last until its ``process`` ends."""
    log = []
    execute, process = engine.execute, engine.process

    def timed_execute(out):
        log.append([list(zip(out.num_new_tokens, out.num_computed_tokens)), time.perf_counter(), None])
        return execute(out)

    def timed_process(out, result):
        outputs = process(out, result)
        log[-1][2] = time.perf_counter()
        return outputs

    engine.execute, engine.process = timed_execute, timed_process
    return log


def steps_of(log: list) -> list[tuple[list, float]]:
    steps = []
    for i, (chunks, start, end) in enumerate(log):
        nxt = log[i + 1][1] if i + 1 < len(log) else None
        busy = end - start
        steps.append((chunks, nxt - start if nxt is not None and nxt - start < busy + 0.005 else busy))
    return steps


def bench(engine: Engine, specs, concurrency: int) -> dict:
    async def go():
        async with EngineClient(AsyncEngine(engine)) as client:
            return await sweep(client, specs, concurrencies=[concurrency], progress=False)

    return asyncio.run(go())[0]


def token_ids(engine: Engine, spec) -> list[int]:
    tok = engine.tokenizer
    return tok.apply_chat_template(spec.messages) if spec.is_chat else tok.encode(spec.prompt)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "sim_vs_cpu.json"))
    parser.add_argument("--write-profile", action="store_true", help="ship the fitted CPU profile")
    args = parser.parse_args()

    measured = calibrate_cpu()
    print("measured:", {k: v for k, v in measured.to_dict().items() if isinstance(v, float)})
    cost = ModelCost(preset("smollm2-135m"), 1, weight_bytes=4.0, kv_bytes=4.0, act_bytes=4.0)

    calibration_steps, calibration_runs = [], []
    for concurrency in (4, 16):
        engine = make_engine(concurrency)
        log = record_steps(engine)
        specs = workloads.shopping(2 * concurrency + 8, output_len=48, seed=concurrency)
        run = bench(engine, specs, concurrency)
        calibration_steps += steps_of(log)
        calibration_runs.append(
            {"workload": "shopping", "concurrency": concurrency, "prompts": len(specs)}
            | {k: run[k] for k in ("mean_ttft_ms", "output_throughput")}
        )
    profile = fit_efficiencies(measured, cost, calibration_steps)
    print("fitted:", {k: profile.to_dict()[k] for k in ("memory_eff", "kv_eff", "compute_eff")})

    # Validation: other workload, lengths and concurrency than the calibration.
    concurrency = 8
    engine = make_engine(concurrency)
    specs = workloads.random_lengths(24, (100, 600), (32, 128), seed=7, tokenizer=engine.tokenizer)
    requests = [SimRequest(token_ids(engine, s), s.max_tokens) for s in specs]
    real = bench(engine, specs, concurrency)
    sim = simulate(
        requests, profile, cost, engine.scheduler_config, engine.cache_config, concurrency=concurrency
    )
    predicted = sim.summary()
    compare = {}
    for key in ("mean_ttft_ms", "output_throughput", "mean_tpot_ms"):
        compare[key] = {
            "measured": round(real[key], 2),
            "predicted": round(predicted[key], 2),
            "error": round(predicted[key] / real[key] - 1, 3),
        }
    print("validation (random 100-600 / 32-128 tokens, concurrency 8):", json.dumps(compare))
    result = {
        "measured_machine": measured.to_dict(),
        "fitted_profile": profile.to_dict(),
        "calibration": {"runs": calibration_runs, "steps": len(calibration_steps)},
        "validation": {
            "workload": "random 100-600 prompt, 32-128 output tokens",
            "prompts": len(specs),
            "concurrency": concurrency,
            "compare": compare,
            "breakdown": sim.breakdown(),
        },  # fmt: skip
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    if args.write_profile:
        path = Path(__file__).parent.parent / "neuronserve" / "data" / "sim_profiles.json"
        data = fitted_factors()
        data["cpu"] = {
            "profile": dataclasses.asdict(profile),
            "fitted_on": "benchmarks/sim_vs_cpu.py: SmolLM2-135M fp32, shopping workload at concurrency 4 "
            "and 16 "
            f"({len(calibration_steps)} engine steps) on this 2-core machine",
        }
        path.write_text(json.dumps(data, indent=2) + "\n")
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
