"""Single-sequence decode and prefill speed on SmolLM2-135M, neuronserve vs transformers, one run.

Also measures this machine's memory read bandwidth, and reports achieved weight GB/s (weight bytes
read per decoded token x tokens/s) and its fraction of that roofline; and whether long context
slows decode: ms/token after 100 and after 2,000 tokens of context, on the native kernels and on
torch's ops (target: <= 1.2x). Writes JSON to benchmarks/results/decode_roofline.json.

    python benchmarks/decode_roofline.py [--decode-tokens 64] [--prompt-tokens 256]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from neuronserve.backends import get_backend
from neuronserve.bench.machine import memory_bandwidth_gbs
from neuronserve.config import CacheConfig, SchedulerConfig
from neuronserve.core import Request, Scheduler
from neuronserve.model.loader import load_model


def weight_bytes_per_token(model: torch.nn.Module) -> int:
    """Bytes of weights a decode step reads: every parameter once (the tied embedding is the LM head)."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


def neuronserve_speed(
    model, config, prompt: list[int], decode_tokens: int, kernels: str = "native"
) -> tuple[float, float]:
    """(prefill tok/s, decode tok/s) of one sequence: the prompt's chunks, then the median decode step."""
    max_len = len(prompt) + decode_tokens + 1
    sched_cfg = SchedulerConfig(max_num_seqs=1, max_num_batched_tokens=512, max_model_len=max_len)
    cache_cfg = CacheConfig(block_size=16, num_blocks=max_len // 16 + 8)
    scheduler = Scheduler(sched_cfg, cache_cfg)
    runner = get_backend("cpu").build_runner(model, config, cache_cfg, sched_cfg, kernels=kernels)
    scheduler.add_request(Request("r", prompt, max_tokens=decode_tokens + 1, eos_token_id=None))
    prefill_s, decode_times = 0.0, []
    while scheduler.has_unfinished():
        t0 = time.perf_counter()
        out = scheduler.schedule()
        scheduler.update(out, runner.execute(out).argmax(-1).tolist())
        if out.num_decodes:
            decode_times.append(time.perf_counter() - t0)
        else:
            prefill_s += time.perf_counter() - t0
    return len(prompt) / prefill_s, 1 / statistics.median(decode_times)


def long_context_rows(model, config, decode_tokens: int) -> list[dict]:
    """ms/token of decode after 100 and after 2,000 tokens of context, per kernel choice."""
    rows = []
    for kernels in ("native", "torch"):
        ms = {}
        for context in (100, 2000):
            prompt = [(i * 7919) % 40000 + 100 for i in range(context)]
            ms[context] = 1000 / neuronserve_speed(model, config, prompt, decode_tokens, kernels)[1]
        rows.append(
            {
                "kernels": kernels,
                "ms_per_token_ctx100": round(ms[100], 2),
                "ms_per_token_ctx2000": round(ms[2000], 2),
                "ratio": round(ms[2000] / ms[100], 3),
                "target_ratio": 1.2,
            }
        )
    return rows


def transformers_speed(hf_dir: Path, prompt: list[int], decode_tokens: int) -> tuple[float, float]:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    ids = torch.tensor([prompt])
    kwargs = dict(attention_mask=torch.ones_like(ids), do_sample=False, pad_token_id=0)
    with torch.inference_mode():
        hf.generate(ids, max_new_tokens=2, **kwargs)  # warm-up
        t0 = time.perf_counter()
        hf(ids)
        prefill_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        hf.generate(ids, max_new_tokens=decode_tokens + 1, min_new_tokens=decode_tokens + 1, **kwargs)
        total_s = time.perf_counter() - t0
    return len(prompt) / prefill_s, decode_tokens / (total_s - prefill_s)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument("--prompt-tokens", type=int, default=256)
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).parent / "results" / "decode_roofline.json"
    )
    args = parser.parse_args()

    bandwidth = memory_bandwidth_gbs()
    model, config, hf_dir = load_model("smollm2-135m-instruct")
    prompt = [(i * 7919) % 40000 + 100 for i in range(args.prompt_tokens)]
    weight_bytes = weight_bytes_per_token(model)
    rows = []
    for name, (prefill, decode) in (
        ("neuronserve cpu (fp32)", neuronserve_speed(model, config, prompt, args.decode_tokens)),
        ("transformers (fp32)", transformers_speed(hf_dir, prompt, args.decode_tokens)),
    ):
        achieved = weight_bytes * decode / 1e9
        rows.append(
            {
                "engine": name,
                "prefill_tok_s": round(prefill, 1),
                "decode_tok_s": round(decode, 1),
                "ms_per_token": round(1000 / decode, 2),
                "weight_gb_s": round(achieved, 2),
                "roofline_fraction": round(achieved / bandwidth, 3),
            }
        )
    floor_ms = weight_bytes / (bandwidth * 1e9) * 1000
    print(
        f"memory read bandwidth {bandwidth:.1f} GB/s; weights {weight_bytes / 1e6:.0f} MB per token "
        f"-> roofline {floor_ms:.1f} ms/token ({1000 / floor_ms:.0f} tok/s); "
        f"threads={torch.get_num_threads()}"
    )
    print(
        f"{'engine':<26}{'prefill tok/s':>14}{'decode tok/s':>13}{'ms/token':>10}"
        f"{'weight GB/s':>12}{'roofline':>10}"
    )
    for r in rows:
        print(
            f"{r['engine']:<26}{r['prefill_tok_s']:>14.1f}{r['decode_tok_s']:>13.1f}{r['ms_per_token']:>10.2f}"
            f"{r['weight_gb_s']:>12.2f}{r['roofline_fraction']:>10.1%}"
        )
    speedup = rows[0]["decode_tok_s"] / rows[1]["decode_tok_s"]
    print(f"decode speed-up over transformers: {speedup:.2f}x")
    long_rows = long_context_rows(model, config, args.decode_tokens)
    print(f"{'long context, fp32':<26}{'ms/tok @100':>12}{'ms/tok @2000':>13}{'ratio':>8}  target <= 1.2x")
    for r in long_rows:
        verdict = "met" if r["ratio"] <= r["target_ratio"] else "MISSED"
        print(
            f"{'kernels=' + r['kernels']:<26}{r['ms_per_token_ctx100']:>12.2f}"
            f"{r['ms_per_token_ctx2000']:>13.2f}{r['ratio']:>7.2f}x  {verdict}"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "model": "smollm2-135m-instruct",
                "prompt_tokens": args.prompt_tokens,
                "decode_tokens": args.decode_tokens,
                "memory_bandwidth_gb_s": round(bandwidth, 2),
                "weight_bytes_per_token": weight_bytes,
                "threads": torch.get_num_threads(),
                "python": platform.python_version(),
                "torch": torch.__version__,
                "results": rows,
                "decode_speedup_vs_transformers": round(speedup, 2),
                "long_context": long_rows,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
