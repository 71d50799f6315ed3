"""What the HTTP server costs: output tok/s through `neuronserve serve` (streaming, concurrent
clients) against the offline engine (`LLM.chat`) on the same prompts, one after the other in one run.

The same shopping chat prompts, greedy, exactly ``--output-len`` tokens each (ignore_eos); the
server gets them from ``--concurrency`` streaming clients (neuronserve's OpenAI benchmark client),
the offline engine all at once with ``max_num_seqs`` = the concurrency. Writes
benchmarks/results/server_overhead.json.

    python benchmarks/server_overhead.py [--num-prompts 64] [--concurrency 32] [--quantization int8]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from neuronserve import LLM, SamplingParams
from neuronserve.bench import workloads
from neuronserve.bench.clients import OpenAIClient
from neuronserve.bench.metrics import summarize
from neuronserve.bench.runner import run

RESULTS = Path(__file__).parent / "results"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def offline(specs, args) -> dict:
    llm = LLM(
        max_num_seqs=args.concurrency, quantization=args.quantization, kv_cache_dtype=args.kv_cache_dtype
    )
    params = SamplingParams(max_tokens=args.output_len, temperature=0, ignore_eos=True)
    llm.chat([specs[0].messages], params, use_tqdm=False)  # warm-up
    start = time.perf_counter()
    outs = llm.chat([s.messages for s in specs], params, use_tqdm=False)
    duration = time.perf_counter() - start
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    return {"output_tokens": tokens, "duration_s": round(duration, 2), "output_throughput": tokens / duration}


def served(specs, args) -> dict:
    port = free_port()
    cmd = [sys.executable, "-m", "neuronserve.cli", "serve", "--port", str(port), "--max-num-seqs",
           str(args.concurrency), "--log-level", "warning"]  # fmt: skip
    if args.quantization:
        cmd += ["--quantization", args.quantization]
    cmd += ["--kv-cache-dtype", args.kv_cache_dtype]
    proc = subprocess.Popen(cmd, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("neuronserve serve did not become healthy")
            time.sleep(0.5)

        async def main():
            async with OpenAIClient(url) as client:
                await client.send(specs[0])  # warm-up
                return await run(client, specs, concurrency=args.concurrency, description="serve")

        result = asyncio.run(main())
        summary = summarize(result.records, result.duration)
        return {
            "output_tokens": summary["total_output_tokens"],
            "duration_s": round(result.duration, 2),
            "output_throughput": summary["output_throughput"],
            "failed": summary["failed"],
            "median_ttft_ms": round(summary["median_ttft_ms"], 1),
            "median_itl_ms": round(summary["median_itl_ms"], 1),
        }
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--quantization", choices=["int8", "fp8", "int4"], default=None)
    parser.add_argument("--kv-cache-dtype", choices=["auto", "int8", "fp8"], default="auto")
    parser.add_argument("--out", type=Path, default=RESULTS / "server_overhead.json")
    args = parser.parse_args()

    specs = workloads.shopping(args.num_prompts, args.output_len, seed=7)
    off = offline(specs, args)
    print(f"offline engine: {off['output_throughput']:.1f} output tok/s ({off['output_tokens']} tokens)")
    srv = served(specs, args)
    ratio = srv["output_throughput"] / off["output_throughput"]
    print(f"neuronserve serve, {args.concurrency} streaming clients: {srv['output_throughput']:.1f} "
          f"output tok/s ({srv['failed']} failed) = {ratio:.1%} of offline (target >= 90%)")  # fmt: skip
    report = {
        "workload": f"shopping chat, {args.num_prompts} prompts, {args.output_len} output tokens, greedy",
        "concurrency": args.concurrency,
        "quantization": args.quantization,
        "kv_cache_dtype": args.kv_cache_dtype,
        "offline": {**off, "output_throughput": round(off["output_throughput"], 1)},
        "server": {**srv, "output_throughput": round(srv["output_throughput"], 1)},
        "server_over_offline": round(ratio, 3),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
