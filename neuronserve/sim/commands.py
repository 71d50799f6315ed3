"""``neuronserve simulate`` and ``neuronserve plan``."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from neuronserve.config import CacheConfig, SchedulerConfig
from neuronserve.sim.simulator import SimRequest, Speculation, simulate, spec_token_ids
from neuronserve.sim.stepmodel import ModelCost, speculative_speedup

EMBEDDED = {"smollm2-135m-instruct": "smollm2-135m"}


def add_arguments(sim: argparse.ArgumentParser, plan: argparse.ArgumentParser) -> None:
    for p in (sim, plan):
        p.add_argument(
            "--model",
            default="llama-3-8b",
            help="a preset: smollm2-135m, llama-3.2-1b, llama-3-8b, llama-3-70b",
        )
        p.add_argument("--quantization", choices=["int8", "fp8", "int4"], default=None)
        p.add_argument("--kv-cache-dtype", choices=["auto", "int8", "fp8"], default="auto")
        p.add_argument("--workload", choices=["shopping", "fixed", "random"], default="shopping")
        p.add_argument("--num-prompts", type=int, default=200)
        p.add_argument("--input-len", type=int, default=256)
        p.add_argument("--output-len", type=int, default=128)
        p.add_argument("--input-range", default="64:512")
        p.add_argument("--output-range", default="32:256")
        p.add_argument("--max-num-seqs", type=int, default=32)
        p.add_argument("--max-model-len", type=int, default=4096)
        p.add_argument("--seed", type=int, default=0)
        p.add_argument(
            "--speculative",
            default=None,
            metavar="K:RATE",
            help="model speculative decoding: K drafts per decode, each accepted with probability RATE "
            "(e.g. 4:0.7 for n-gram lookup on RAG answers); prints where it pays by batch size",
        )
    sim.add_argument(
        "--instance", default="inf2.48xlarge", help="a Neuron instance type, or cpu (this machine)"
    )
    sim.add_argument(
        "--tensor-parallel-size", "-tp", type=int, default=None, help="default: all the instance's cores"
    )
    sim.add_argument("--cpu-profile", default=None, help="a profile written by --calibrate-cpu")
    sim.add_argument(
        "--calibrate-cpu", default=None, metavar="OUT", help="measure this machine, write a profile, exit"
    )
    sim.add_argument("--concurrency", default=None, help="closed loop: in flight, e.g. 1,8,32")
    sim.add_argument("--request-rate", default=None, help="open loop: requests/s, e.g. 1,2,4")
    sim.add_argument("--burstiness", type=float, default=1.0)
    sim.add_argument("--goodput", nargs="*", default=[], help="SLOs in ms, e.g. ttft:1000 tpot:50")
    sim.add_argument("--out", default="sim-results")
    plan.add_argument("--peak-rps", type=float, required=True, help="requests per second to serve at peak")
    plan.add_argument("--slo", required=True, help="SLOs in ms, e.g. ttft:1000,tpot:50")
    plan.add_argument("--attainment", type=float, default=0.95, help="share of requests within the SLOs")
    plan.add_argument("--instances", default=None, help="instance types to consider (default: all priced)")
    plan.add_argument("--top", type=int, default=12, help="rows to print, cheapest first")


def model_config(name: str):
    from neuronserve.presets import preset

    return preset(EMBEDDED.get(name.lower(), name))


def _range(text: str) -> tuple[int, int]:
    lo, _, hi = text.partition(":")
    return int(lo), int(hi)


def workload(args) -> list[SimRequest]:
    from neuronserve.bench import workloads

    if args.workload == "shopping":
        specs = workloads.shopping(args.num_prompts, args.output_len, seed=args.seed)
    elif args.workload == "fixed":
        specs = workloads.fixed(args.num_prompts, args.input_len, args.output_len, args.seed)
    else:
        specs = workloads.random_lengths(
            args.num_prompts, _range(args.input_range), _range(args.output_range), args.seed
        )
    return [SimRequest(spec_token_ids(s), s.max_tokens) for s in specs]


def neuron_setup(args, config, instance: str, tp: int):
    """Profile, cost model and configs of one replica on ``instance`` at ``tp``; the KV cache gets
    what HBM is left after the fit check's other terms."""
    from neuronserve.hardware import check_fit, kv_bytes_per_rank
    from neuronserve.sim.profiles import neuron_profile

    kv_bytes = 2.0 if args.kv_cache_dtype == "auto" else 1.0
    sched = SchedulerConfig(
        max_num_seqs=args.max_num_seqs, max_model_len=args.max_model_len, max_waiting=None
    )
    report = check_fit(
        config, instance, tp, quantization=args.quantization, kv_tokens=0, kv_dtype_bytes=kv_bytes
    )
    block_bytes = kv_bytes_per_rank(config, tp, 16, kv_bytes)
    per_seq = -(-args.max_model_len // 16)
    blocks = int((report.capacity - report.needed) // block_bytes)
    blocks = max(2, min(blocks, args.max_num_seqs * per_seq + 1))
    cost = ModelCost(config, tp, weight_bytes=2.0, quantization=args.quantization, kv_bytes=kv_bytes)
    return neuron_profile(instance), cost, sched, CacheConfig(block_size=16, num_blocks=blocks)


def cpu_setup(args, config):
    from neuronserve.sim.profiles import cpu_profile

    sched = SchedulerConfig(
        max_num_seqs=args.max_num_seqs, max_model_len=args.max_model_len, max_waiting=None
    )
    kv_bytes = 4.0 if args.kv_cache_dtype == "auto" else 1.0
    cost = ModelCost(
        config, 1, weight_bytes=4.0, quantization=args.quantization, kv_bytes=kv_bytes, act_bytes=4.0
    )
    per_seq = -(-args.max_model_len // 16)
    return (
        cpu_profile(args.cpu_profile),
        cost,
        sched,
        CacheConfig(block_size=16, num_blocks=args.max_num_seqs * per_seq + 1),
    )


def speculation(args) -> Speculation | None:
    if not args.speculative:
        return None
    try:
        k, rate = args.speculative.split(":")
        spec = Speculation(int(k), float(rate))
    except ValueError:
        raise ValueError(f"speculative: expected K:RATE such as 4:0.7, got {args.speculative!r}") from None
    if spec.k < 1 or not 0.0 <= spec.acceptance_rate <= 1.0:
        raise ValueError(f"speculative: K >= 1 and RATE in [0, 1], got {args.speculative!r}")
    return spec


def print_speculation_pays(profile, cost, spec: Speculation, context: int) -> None:
    """Modelled decode speedup by batch size, and the batch from which speculation loses."""
    batches = [1, 2, 4, 8, 16, 32, 64, 128]
    speedups = [speculative_speedup(profile, cost, b, context, spec.k, spec.acceptance_rate) for b in batches]
    print(
        f"speculation, k={spec.k}, acceptance {spec.acceptance_rate:.2f}, context {context} tokens: "
        "modelled decode speedup by batch size"
    )
    print("| batch | " + " | ".join(map(str, batches)) + " |")
    print("| --- |" + " --- |" * len(batches))
    print("| speedup | " + " | ".join(f"{s:.2f}x" for s in speedups) + " |")
    losing = next((b for b, s in zip(batches, speedups) if s < 1.0), None)
    print(
        f"it pays up to batch {batches[batches.index(losing) - 1]}; from batch {losing} turn it off "
        f"(speculative_config.disable_by_batch_size={losing})\n"
        if losing and losing != batches[0]
        else ("it never pays here\n" if losing else "it pays at every batch size modelled\n")
    )


def cmd_simulate(args) -> int:
    from neuronserve.bench import report
    from neuronserve.bench.cost import price_per_hour
    from neuronserve.bench.metrics import parse_goodput

    if args.calibrate_cpu:
        from neuronserve.sim.profiles import calibrate_cpu

        profile = calibrate_cpu()
        Path(args.calibrate_cpu).write_text(json.dumps(profile.to_dict(), indent=2) + "\n")
        print(json.dumps(profile.to_dict(), indent=2))
        return 0
    config = model_config(args.model)
    if args.instance == "cpu":
        profile, cost, sched, cache = cpu_setup(args, config)
        price = None
    else:
        from neuronserve.hardware import get_instance

        tp = args.tensor_parallel_size or get_instance(args.instance).cores
        profile, cost, sched, cache = neuron_setup(args, config, args.instance, tp)
        price = price_per_hour(args.instance) * tp / get_instance(args.instance).cores  # this replica's share
    slos = parse_goodput(args.goodput)
    requests = workload(args)
    concurrencies = [int(c) for c in args.concurrency.split(",")] if args.concurrency else []
    rates = [float(r) for r in args.request_rate.split(",")] if args.request_rate else []
    if not concurrencies and not rates:
        concurrencies = [8]
    loads = [(c, math.inf) for c in concurrencies] + [(None, r) for r in rates]
    spec = speculation(args)
    if spec is not None:
        context = sum(len(r.prompt_token_ids) + r.max_tokens // 2 for r in requests) // len(requests)
        print_speculation_pays(profile, cost, spec, context)
    runs = []
    for concurrency, rate in loads:
        result = simulate(
            requests, profile, cost, sched, cache,
            concurrency=concurrency, request_rate=rate, burstiness=args.burstiness, seed=args.seed,
            speculation=spec,
        )  # fmt: skip
        summary = result.summary(slos, price)
        summary.update(concurrency=concurrency, request_rate=rate, breakdown=result.breakdown())
        runs.append(summary)
    out = Path(args.out)
    label = f"{args.model} on {args.instance}" + (f" TP {cost.tp}" if args.instance != "cpu" else "")
    report.write_json(out / "simulate.json", {"target": label, "profile": profile.to_dict(), "runs": runs})
    table = report.markdown_table(runs)
    (out / "simulate.md").write_text(
        f"# simulated: {label}, {args.workload}, {len(requests)} prompts\n\n{table}\n"
    )
    print(f"simulated (a prediction, not a measurement): {label}\n{table}")
    print(f"wrote {out}/simulate.json, simulate.md")
    return 0


def cmd_plan(args) -> int:
    from neuronserve.bench.cost import price_per_hour
    from neuronserve.bench.metrics import parse_goodput
    from neuronserve.sim.planner import attains, candidates, max_rate, plan

    slos = parse_goodput(args.slo.replace(",", " ").split())
    config = model_config(args.model)
    requests = workload(args)
    kv_bytes = 2.0 if args.kv_cache_dtype == "auto" else 1.0
    chosen = candidates(
        config,
        args.quantization,
        args.instances.split(",") if args.instances else None,
        kv_tokens=0,
        kv_dtype_bytes=kv_bytes,
    )
    if not chosen:
        raise ValueError("model: it fits no priced Neuron instance at any supported TP degree")

    spec = speculation(args)

    def capacity(c) -> float:
        profile, cost, sched, cache = neuron_setup(args, config, c.instance, c.tp)

        def meets(rate: float) -> bool:
            result = simulate(
                requests, profile, cost, sched, cache, request_rate=rate, seed=args.seed, speculation=spec
            )
            return attains(result.records, slos, args.attainment)

        return max_rate(meets)

    mean_out = sum(r.max_tokens for r in requests) / len(requests)
    rows = plan(chosen, args.peak_rps, capacity, price_per_hour, mean_out)
    print(
        f"plan for {args.model} ({args.quantization or 'bf16'}), peak {args.peak_rps} req/s, SLOs {slos} ms "
        f"for {args.attainment:.0%} of requests (simulated: predictions, not measurements)\n"
    )
    print(
        "| instance | TP | replicas/instance | req/s per replica | instances | $/hour | $/M output tokens |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows[: args.top]:
        print(
            f"| {r.instance} | {r.tp} | {r.replicas_per_instance} | {r.rps_per_replica:.2f} | "
            f"{r.instances} | "
            f"{r.cost_per_hour:.2f} | {r.cost_per_million_output_tokens:.2f} |"
        )
    if len(rows) > args.top:
        print(f"... {len(rows) - args.top} more (--top)")
    if rows:
        best = rows[0]
        print(
            f"\ncheapest: {best.instances} x {best.instance} at TP {best.tp}, ${best.cost_per_hour:.2f}/hour"
        )
        if spec is not None:
            profile, cost, _, _ = neuron_setup(args, config, best.instance, best.tp)
            context = sum(len(r.prompt_token_ids) + r.max_tokens // 2 for r in requests) // len(requests)
            print()
            print_speculation_pays(profile, cost, spec, context)
    return 0
