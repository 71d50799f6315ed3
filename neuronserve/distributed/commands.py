"""``neuronserve serve --replicas N`` and ``neuronserve run-batch``: the CLI side of
``neuronserve.distributed`` (Ray is imported only when a command needs it)."""

from __future__ import annotations

import argparse
import sys


def add_replica_arguments(group) -> None:
    """``serve``'s options for replicas on Ray Serve."""
    group.add_argument(
        "--replicas", type=int, default=1, help="engine replicas behind the endpoint (> 1: Ray Serve)"
    )
    group.add_argument("--address", default=None, help="join this Ray cluster (default: start a local one)")
    group.add_argument("--routing", choices=["prefix", "round_robin", "least_outstanding"], default="prefix")
    group.add_argument("--num-cpus-per-replica", type=float, default=1.0)
    group.add_argument("--neuron-cores-per-replica", type=int, default=0, help="Ray's neuron_cores resource")
    group.add_argument(
        "--autoscale",
        default=None,
        metavar="MIN:MAX",
        help="Ray Serve autoscaling between MIN and MAX replicas (target from --target-ongoing-requests)",
    )
    group.add_argument(
        "--target-ongoing-requests",
        type=float,
        default=None,
        help="autoscaling target per replica (requests in flight; default: --autoscale-plan's, else Ray's)",
    )
    group.add_argument(
        "--autoscale-plan",
        default=None,
        metavar="INSTANCE:TP",
        help="take the target from `neuronserve plan`'s simulation of one replica there, e.g. inf2.xlarge:2",
    )
    group.add_argument("--slo", default="ttft:1000,tpot:100", help="with --autoscale-plan: SLOs in ms")
    group.add_argument(
        "--plan-model", default=None, help="with --autoscale-plan: a preset (default: --model)"
    )


def add_batch_arguments(batch: argparse.ArgumentParser) -> None:
    """``run-batch``'s own options (the model options are the CLI's shared ones)."""
    batch.add_argument("--input", "-i", required=True, help="requests, one JSON object a line")
    batch.add_argument("--output", "-o", required=True, help="results (appended; a rerun skips done lines)")
    batch.add_argument(
        "--executor",
        choices=["auto", "local", "ray"],
        default="auto",
        help="local: one engine in this process; ray: Ray Data over --replicas (auto: ray if installed "
        "and --replicas > 1)",
    )
    batch.add_argument("--replicas", type=int, default=1, help="engine workers (Ray Data)")
    batch.add_argument("--address", default=None, help="join this Ray cluster")
    batch.add_argument("--num-cpus-per-replica", type=float, default=1.0)
    batch.add_argument("--max-num-seqs", type=int, default=32, help="most sequences decoded together")
    batch.add_argument("--concurrency", type=int, default=64, help="requests in flight per engine")
    batch.add_argument("--kv-cache-gb", type=float, default=1.0, help="KV-cache memory per engine, GiB")
    batch.add_argument("--no-progress", action="store_true")


def engine_spec(args: argparse.Namespace, **overrides):
    """The engine a replica or batch worker builds, from the shared model options."""
    from neuronserve.distributed.spec import EngineSpec

    if args.buckets or args.context_buckets or args.target:
        raise ValueError(
            "buckets: --buckets, --context-buckets and --target are single-engine options for now"
        )
    return EngineSpec(
        model=args.model,
        backend=args.backend,
        kernels=args.kernels,
        quantization=args.quantization,
        kv_cache_dtype=args.kv_cache_dtype,
        max_model_len=args.max_model_len,
        tensor_parallel_size=args.tensor_parallel_size,
        artifact_cache=args.artifact_cache,
        **overrides,
    )


def cmd_serve_replicas(args: argparse.Namespace) -> int:
    """``serve --replicas N`` (or ``--address``): the same API from N engines on Ray Serve."""
    from neuronserve.distributed import require_ray

    require_ray()
    from neuronserve.distributed import serve as ray_serve
    from neuronserve.distributed.autoscale import autoscaling_config
    from neuronserve.distributed.spec import ReplicaConfig

    spec = engine_spec(
        args,
        served_model_name=args.served_model_name,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        max_waiting=args.max_waiting,
        kv_cache_gb=args.kv_cache_gb,
        enable_prefix_caching=not args.no_prefix_caching,
        api_key=args.api_key or None,
    )
    autoscaling = None
    if args.autoscale:
        low, _, high = args.autoscale.partition(":")
        target = args.target_ongoing_requests
        if target is None and args.autoscale_plan:
            target = plan_target_from_args(args)
        autoscaling = autoscaling_config(int(low), int(high or low), target)
    config = ReplicaConfig(
        num_replicas=args.replicas,
        num_cpus=args.num_cpus_per_replica,
        num_neuron_cores=args.neuron_cores_per_replica,
        max_ongoing_requests=args.max_num_seqs + args.max_waiting,
        routing=args.routing,
        autoscaling=autoscaling,
    )
    print(
        f"neuronserve on Ray Serve: {args.replicas} replicas, {args.routing} routing, http://{args.host}:{args.port}"
    )
    ray_serve.start(spec, config, address=args.address, host=args.host, port=args.port, blocking=True)
    return 0


def plan_target_from_args(args: argparse.Namespace) -> float:
    from neuronserve.bench.metrics import parse_goodput
    from neuronserve.distributed.autoscale import plan_target

    instance, _, tp = args.autoscale_plan.partition(":")
    slos = parse_goodput(args.slo.replace(",", " ").split())
    t = plan_target(args.plan_model or args.model, instance, int(tp or 1), slos)
    print(
        f"autoscaling target from the plan: {t.rps_per_replica:.2f} req/s per replica x {t.mean_e2e_s:.2f} s "
        f"mean latency = {t.target_ongoing_requests:.1f} requests in flight per replica (simulated)"
    )
    return t.target_ongoing_requests


def cmd_run_batch(args: argparse.Namespace) -> int:
    from neuronserve.distributed import ray_available
    from neuronserve.distributed.batch import run_batch

    executor = args.executor
    if executor == "auto":
        executor = "ray" if ray_available() and (args.replicas > 1 or args.address) else "local"
    spec = engine_spec(args, max_num_seqs=args.max_num_seqs, max_waiting=None, kv_cache_gb=args.kv_cache_gb)
    summary = run_batch(
        args.input,
        args.output,
        spec,
        backend=executor,
        replicas=args.replicas,
        num_cpus_per_replica=args.num_cpus_per_replica,
        concurrency=args.concurrency,
        address=args.address,
        progress=not args.no_progress,
    )
    print(
        f"{summary.total} requests: {summary.skipped} already done, {summary.succeeded} succeeded, "
        f"{summary.failed} failed (see {args.output})",
        file=sys.stderr,
    )
    return 0
