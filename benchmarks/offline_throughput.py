"""Offline throughput: the same shopping prompts through ``LLM.generate`` and through
``transformers`` ``generate`` (static batches), greedy, same max tokens, in one run.

Output tokens are counted the same way for both: each sequence's tokens up to and including its
first end-of-sequence token (a static batch keeps computing padding after that; those don't count).
Writes JSON to benchmarks/results/offline_throughput.json.

    python benchmarks/offline_throughput.py [--num-prompts 32] [--max-tokens 64] [--hf-batch-sizes 1,16]

Also reports the compute roofline: this machine's measured fp32 GEMM rate divided by the FLOPs one
generated token needs (2 x the weights it multiplies), the most any fp32 engine could reach here.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from neuronserve import LLM, SamplingParams
from neuronserve.bench.prompts import shopping_conversations


def count_until_eos(token_ids: list[int], eos: set[int]) -> int:
    for i, t in enumerate(token_ids):
        if t in eos:
            return i + 1
    return len(token_ids)


def run_transformers(hf_dir: Path, prompts: list[list[int]], max_tokens: int, batch_size: int, eos: set[int]):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    pad_id = next(iter(eos))
    total_tokens, outputs = 0, []
    t0 = time.perf_counter()
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start : start + batch_size]
        width = max(len(p) for p in batch)
        ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in batch])  # left padding
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch])
        with torch.inference_mode():
            gen = model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=max_tokens,
                do_sample=False,
                pad_token_id=pad_id,
            )
        for row in gen[:, width:].tolist():
            n = count_until_eos(row, eos)
            outputs.append(row[:n])
            total_tokens += n
    return total_tokens, time.perf_counter() - t0, outputs


def gemm_gflops(m: int = 64, k: int = 576, n: int = 1536, seconds: float = 1.0) -> float:
    """Best fp32 GEMM rate at a decode-batch shape (SmolLM2's hidden size), in GFLOP/s."""
    a, b = torch.randn(m, k), torch.randn(k, n)
    best, t_end = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < t_end:
        t0 = time.perf_counter()
        for _ in range(20):
            a @ b
        best = max(best, 20 * 2 * m * k * n / (time.perf_counter() - t0) / 1e9)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-prompts", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--hf-batch-sizes", default="1,16", help="transformers' static batch sizes to run")
    parser.add_argument("--max-num-seqs", type=int, default=64, help="neuronserve's running batch")
    parser.add_argument("--skip-transformers", action="store_true")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "offline_throughput.json"))
    args = parser.parse_args()
    torch.manual_seed(0)

    llm = LLM(max_num_seqs=args.max_num_seqs, max_model_len=1024)
    tokenizer = llm.tokenizer
    prompts = [tokenizer.apply_chat_template(c) for c in shopping_conversations(args.num_prompts)]
    eos = set(llm.engine.eos_token_ids)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0)

    llm.generate(prompts[:2], SamplingParams(max_tokens=4), use_tqdm=False)  # warm-up
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    ours_s = time.perf_counter() - t0
    ours_tokens = sum(count_until_eos(o.outputs[0].token_ids, eos) for o in outs)
    ttft = sorted(o.metrics.time_to_first_token for o in outs)
    result = {
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads()},
        "model": "smollm2-135m-instruct",
        "dtype": "float32",
        "num_prompts": len(prompts),
        "mean_prompt_tokens": sum(map(len, prompts)) / len(prompts),
        "max_tokens": args.max_tokens,
        "neuronserve": {
            "max_num_seqs": args.max_num_seqs,
            "output_tokens": ours_tokens,
            "seconds": round(ours_s, 2),
            "output_tok_per_s": round(ours_tokens / ours_s, 1),
            "median_ttft_s": round(ttft[len(ttft) // 2], 2),
        },
    }
    print(f"neuronserve: {ours_tokens} tokens in {ours_s:.1f} s = {ours_tokens / ours_s:.1f} output tok/s")
    config = llm.engine.model_config
    layers = llm.engine.runner.model.layers
    matmul_params = sum(p.numel() for n, p in layers.named_parameters() if "norm" not in n)
    matmul_params += config.vocab_size * config.hidden_size  # the LM head
    gflops = gemm_gflops()
    roofline = gflops * 1e9 / (2 * matmul_params)
    result["compute_roofline"] = {
        "fp32_gemm_gflops": round(gflops, 1),
        "gflop_per_token": round(2 * matmul_params / 1e9, 3),
        "max_output_tok_per_s": round(roofline, 1),
        "neuronserve_fraction": round(ours_tokens / ours_s / roofline, 2),
    }
    print(
        f"roofline: {gflops:.0f} GFLOP/s fp32 GEMM / {2 * matmul_params / 1e9:.3f} GFLOP per token "
        f"= {roofline:.0f} tok/s at most; neuronserve reaches {ours_tokens / ours_s / roofline:.0%}"
    )
    if not args.skip_transformers:
        hf_dir = llm.engine.model_dir
        del llm
        result["transformers"] = []
        for batch_size in (int(b) for b in args.hf_batch_sizes.split(",")):
            hf_tokens, hf_s, hf_outputs = run_transformers(hf_dir, prompts, args.max_tokens, batch_size, eos)
            same = sum(o.outputs[0].token_ids[: len(h)] == h for o, h in zip(outs, hf_outputs))
            speedup = (ours_tokens / ours_s) / (hf_tokens / hf_s)
            result["transformers"].append(
                {
                    "batch_size": batch_size,
                    "output_tokens": hf_tokens,
                    "seconds": round(hf_s, 2),
                    "output_tok_per_s": round(hf_tokens / hf_s, 1),
                    "neuronserve_speedup": round(speedup, 2),
                    "identical_greedy_outputs": f"{same}/{len(prompts)}",
                }
            )
            print(
                f"transformers, static batches of {batch_size}: {hf_tokens} tokens in {hf_s:.1f} s = "
                f"{hf_tokens / hf_s:.1f} output tok/s; neuronserve is {speedup:.2f}x; "
                f"identical greedy outputs {same}/{len(prompts)}"
            )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
