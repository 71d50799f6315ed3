"""Hardware profiles: a Neuron instance's per-core figures (from the hardware data file) with the
efficiency factors fitted to published measurements, and this machine's CPU measured by
``neuronserve simulate --calibrate-cpu`` and fitted to measured engine steps. The fitted factors
live in ``neuronserve/data/sim_profiles.json`` with what they were fitted on."""

from __future__ import annotations

import json
import time
from importlib import resources
from pathlib import Path

from neuronserve.hardware import get_instance
from neuronserve.sim.stepmodel import Profile


def fitted_factors() -> dict:
    return json.loads(resources.files("neuronserve").joinpath("data/sim_profiles.json").read_text())


def neuron_profile(instance: str, factors: dict | None = None) -> Profile:
    """One NeuronCore of ``instance`` (bf16 peak, its share of HBM and NeuronLink bandwidth) with
    the fitted Neuron efficiency factors (or ``factors``)."""
    inst = get_instance(instance)
    chip = inst.chip
    f = dict(fitted_factors()["neuron"]["factors"]) if factors is None else dict(factors)
    return Profile(
        name=f"{inst.name} NeuronCore ({chip.name})",
        peak_flops=chip.bf16_tflops * 1e12 / chip.cores,
        mem_bytes_per_s=chip.hbm_gb_per_s * 1e9 / chip.cores,
        link_bytes_per_s=chip.neuronlink_gb_per_s * 1e9 / chip.cores,
        overlap=True,
        source="neuronserve/data/neuron_hardware.json + data/sim_profiles.json",
        **f,
    )


def cpu_profile(path: str | Path | None = None) -> Profile:
    """This machine's profile: a file written by ``--calibrate-cpu`` / the fit, else the shipped one."""
    data = json.loads(Path(path).read_text()) if path else fitted_factors()["cpu"]["profile"]
    return Profile(**data)


def measure_cpu(seconds: float = 2.0) -> dict:
    """Memory bandwidth (bytes/s, a large copy: read + write) and fp32 GEMM rate (FLOP/s) of this
    machine, best of a few repetitions."""
    import torch

    src = torch.ones(64 * 2**20 // 4 * 4)  # 256 MB
    dst = torch.empty_like(src)
    best_bw, deadline = 0.0, time.perf_counter() + seconds / 2
    while time.perf_counter() < deadline:
        t0 = time.perf_counter()
        dst.copy_(src)
        best_bw = max(best_bw, 2 * src.numel() * 4 / (time.perf_counter() - t0))
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    best_flops, deadline = 0.0, time.perf_counter() + seconds / 2
    while time.perf_counter() < deadline:
        t0 = time.perf_counter()
        a @ b
        best_flops = max(best_flops, 2 * 1024**3 / (time.perf_counter() - t0))
    return {"mem_bytes_per_s": best_bw, "peak_flops": best_flops, "threads": torch.get_num_threads()}


def measure_step_overhead(vocab_size: int = 49152, steps: int = 40) -> tuple[float, float]:
    """Seconds per engine step that are not the model: scheduling, sampling over ``vocab_size``
    logits, detokenizing, bookkeeping. Measured on a tiny random model (its own compute is a few
    percent of the result) at 1 and 16 decoding sequences; returns (per step, per sequence)."""
    import torch

    from neuronserve.backends import get_backend
    from neuronserve.config import CacheConfig, ModelConfig, SchedulerConfig
    from neuronserve.engine.engine import Engine
    from neuronserve.engine.params import SamplingParams
    from neuronserve.model.llama import LlamaForCausalLM

    config = ModelConfig(
        vocab_size=vocab_size, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=1, num_key_value_heads=1,
    )  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    sched = SchedulerConfig(max_num_seqs=16, max_num_batched_tokens=512, max_model_len=256, max_waiting=None)
    cache = CacheConfig(block_size=16, num_blocks=300)
    times = {}
    for batch in (1, 16):
        engine = Engine(
            get_backend("cpu").build_runner(model, config, cache, sched), None, config, sched, cache
        )
        for i in range(batch):
            engine.add_request(
                [5 + i, 6, 7], SamplingParams(max_tokens=steps + 2, temperature=0, ignore_eos=True)
            )
        engine.step()  # the prefill
        durations = []
        for _ in range(steps):
            t0 = time.perf_counter()
            engine.step()
            durations.append(time.perf_counter() - t0)
        times[batch] = sorted(durations)[len(durations) // 2]
    per_seq = max(0.0, (times[16] - times[1]) / 15)
    return max(0.0, times[1] - per_seq), per_seq


def calibrate_cpu() -> Profile:
    """Measure this machine: bandwidth, GEMM rate and per-step overhead; efficiencies start at 1
    (``neuronserve.sim.fit.fit_efficiencies`` fits them to measured steps)."""
    measured = measure_cpu()
    step, per_seq = measure_step_overhead()
    return Profile(
        name=f"this machine ({measured['threads']} threads)",
        peak_flops=measured["peak_flops"],
        mem_bytes_per_s=measured["mem_bytes_per_s"],
        step_overhead_s=step,
        seq_overhead_s=per_seq,
        overlap=False,
        source="neuronserve simulate --calibrate-cpu",
    )
