"""Tensor parallelism on this CPU: SmolLM2-135M step time at TP 1 and TP 2, and what a collective
costs, one run side by side. Writes benchmarks/results/tp_step_time.json.

Per configuration: the median decode step at batch 1, 8 and 32 (64-token prompts, after every
sequence has its first token) and one 256-token prefill step. TP 2 runs two processes with one
thread each; TP 1 runs one process with every core, so both use the whole machine. Also timed:
one gloo all-reduce of a step's hidden states, of which a step makes 2 per layer + 1 (embedding).

    python benchmarks/tp_step_time.py
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import statistics
import time
from pathlib import Path

import torch

from neuronserve.config import CacheConfig, SchedulerConfig
from neuronserve.engine.engine import Engine
from neuronserve.engine.params import SamplingParams

HIDDEN, LAYERS = 576, 30  # SmolLM2-135M


def _allreduce_rank(rank: int, port: int, rows: list[int], out) -> None:
    from neuronserve.parallel.group import GlooGroup

    torch.set_num_threads(1)
    group = GlooGroup(rank, 2, port=port)
    result = {}
    for n in rows:
        x = torch.randn(n, HIDDEN)
        for _ in range(20):
            group.all_reduce(x)
        t0 = time.perf_counter()
        for _ in range(200):
            group.all_reduce(x)
        result[n] = (time.perf_counter() - t0) / 200 * 1000
    if rank == 0:
        out.put(result)


def allreduce_ms(rows: list[int]) -> dict[int, float]:
    """Milliseconds per gloo all-reduce of ``[rows, hidden]`` fp32 between two local processes."""
    from neuronserve.parallel.group import open_store

    ctx = mp.get_context("spawn")
    store = open_store(2)
    out = ctx.Queue()
    procs = [ctx.Process(target=_allreduce_rank, args=(r, store.port, rows, out)) for r in range(2)]
    for p in procs:
        p.start()
    result = out.get(timeout=120)
    for p in procs:
        p.join()
    return result


def step_times(engine: Engine, batch: int, prompt_len: int, steps: int) -> list[float]:
    params = SamplingParams(max_tokens=steps + 2, temperature=0, ignore_eos=True)
    for i in range(batch):
        engine.add_request([1000 + i] + [17] * (prompt_len - 1), params)  # distinct, no prefix hits
    times = []
    while engine.has_unfinished():
        t0 = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - t0)
    return times


def measure(tp: int, batches: list[int], decode_steps: int) -> dict:
    engine = Engine.from_pretrained(
        "smollm2-135m-instruct",
        scheduler_config=SchedulerConfig(max_num_seqs=64, max_model_len=512, max_waiting=None),
        cache_config=CacheConfig(enable_prefix_caching=False),
        kv_cache_gb=0.5,
        tensor_parallel_size=tp,
    )
    try:
        step_times(engine, 1, 16, 4)  # warm-up
        prefill = min(step_times(engine, 1, 256, 1)[0] for _ in range(3))
        decode = {}
        for b in batches:
            times = step_times(engine, b, 64, decode_steps)
            decode[b] = statistics.median(times[-decode_steps:])  # all sequences decoding
    finally:
        engine.close()
    return {
        "tensor_parallel_size": tp,
        "prefill_256_ms": round(prefill * 1000, 1),
        "decode_step_ms": {str(b): round(t * 1000, 1) for b, t in decode.items()},
        "decode_tok_per_s": {str(b): round(b / t, 1) for b, t in decode.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", default="1,8,32")
    parser.add_argument("--decode-steps", type=int, default=16)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "tp_step_time.json"))
    args = parser.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    runs = [measure(tp, batches, args.decode_steps) for tp in (1, 2)]
    collective = allreduce_ms(batches + [256])
    per_step = {str(b): round((2 * LAYERS + 1) * collective[b], 1) for b in batches}
    result = {
        "machine_cores": torch.get_num_threads(),
        "runs": runs,
        "allreduce_ms": {str(n): round(ms, 3) for n, ms in collective.items()},
        "collectives_per_step": 2 * LAYERS + 1,
        "allreduce_ms_per_decode_step": per_step,
        "tp2_over_tp1_decode": {
            str(b): round(runs[1]["decode_step_ms"][str(b)] / runs[0]["decode_step_ms"][str(b)], 2)
            for b in batches
        },
        "tp2_over_tp1_prefill_256": round(runs[1]["prefill_256_ms"] / runs[0]["prefill_256_ms"], 2),
    }
    print(json.dumps(result, indent=2))
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
