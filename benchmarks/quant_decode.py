"""Single-sequence decode speed of SmolLM2-135M per weight format (fp32, int8, fp8, int4), one run.

For each: decode tok/s (the median decode step of its requests), the weight bytes a decode step
reads (every linear layer and the LM head once, as the kernels read them; one embedding row is
negligible), the achieved weight bandwidth and its fraction of this machine's measured memory
bandwidth. The formats' engines are built first and then take one request each in turn, `--rounds`
times, so that they are compared at the same moments of a noisy host. Writes
benchmarks/results/quant_decode.json.

    python benchmarks/quant_decode.py [--tokens 128] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from neuronserve import LLM, SamplingParams
from neuronserve.bench.machine import memory_bandwidth_gbs
from neuronserve.bench.weights import decode_weight_bytes


def build(method: str | None, lm_head: bool) -> LLM:
    skip = ["embed_tokens"] if lm_head else None
    llm = LLM(
        max_num_seqs=1, max_model_len=1024, kv_cache_gb=0.1, quantization=method, modules_to_not_convert=skip
    )
    llm.generate("Hello", SamplingParams(max_tokens=8, temperature=0), use_tqdm=False)  # warm-up
    return llm


def decode_steps(llm: LLM, prompt: str, tokens: int) -> list[float]:
    """One request's decode step times (after its prefill step)."""
    engine = llm.engine
    engine.add_request(prompt, SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True))
    step_times = []
    while engine.has_unfinished():
        t0 = time.perf_counter()
        engine.step()
        step_times.append(time.perf_counter() - t0)
    return step_times[1:]


def measure(methods: list[tuple[str | None, bool]], tokens: int, prompt: str, rounds: int) -> list[dict]:
    """Every format's engine built first, then one request each in turn, `rounds` times: this host's
    speed moves from one minute to the next, and taken in turn the formats see the same moments."""
    llms = [build(method, lm_head) for method, lm_head in methods]
    steps: list[list[float]] = [[] for _ in llms]
    for _ in range(rounds):
        for i, llm in enumerate(llms):
            steps[i] += decode_steps(llm, prompt, tokens)
    rows = []
    for (method, lm_head), llm, times in zip(methods, llms, steps):
        step = statistics.median(times)
        weight_bytes = decode_weight_bytes(llm.engine.runner.model)
        rows.append(
            {
                "method": (method or "fp32") + (" + LM head" if lm_head else ""),
                "decode_tok_per_s": round(1 / step, 1),
                "ms_per_token": round(step * 1000, 2),
                "weight_mb_per_token": round(weight_bytes / 1e6, 1),
                "weight_gb_per_s": round(weight_bytes / step / 1e9, 2),
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3, help="requests per format, the formats in turn")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "quant_decode.json"))
    args = parser.parse_args()
    prompt = "Write a short guide to choosing a blender for a small kitchen."
    bandwidth = memory_bandwidth_gbs()
    print(f"memory read bandwidth: {bandwidth:.1f} GB/s")
    methods = [(None, False), ("int8", False), ("int8", True), ("fp8", False), ("int4", False)]
    rows = measure(methods, args.tokens, prompt, args.rounds)
    for row in rows:
        row["fraction_of_bandwidth"] = round(row["weight_gb_per_s"] / bandwidth, 2)
        mb, gbs, frac = row["weight_mb_per_token"], row["weight_gb_per_s"], row["fraction_of_bandwidth"]
        print(
            f"{row['method']:>16}: {row['decode_tok_per_s']:6.1f} tok/s, {mb:6.1f} MB of weights per token, "
            f"{gbs:5.1f} GB/s = {frac:.0%} of the measured bandwidth"
        )
    speedup = rows[1]["decode_tok_per_s"] / rows[0]["decode_tok_per_s"]
    speedup_all = rows[2]["decode_tok_per_s"] / rows[0]["decode_tok_per_s"]
    print(f"int8 vs fp32: {speedup:.2f}x (LM head in fp32), {speedup_all:.2f}x (LM head int8 too)")
    result = {
        "memory_bandwidth_gbs": round(bandwidth, 1),
        "int8_speedup": round(speedup, 2),
        "int8_with_lm_head_speedup": round(speedup_all, 2),
        "rows": rows,
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
