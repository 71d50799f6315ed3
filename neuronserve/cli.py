"""The ``neuronserve`` command.

neuronserve generate "Is a cast iron pan dishwasher safe?" --chat --max-tokens 128
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from neuronserve.model.loader import DEFAULT_MODEL


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=DEFAULT_MODEL, help="a model name, a HF directory or a .gguf file")
    parser.add_argument("--backend", default="cpu")
    parser.add_argument("--max-model-len", type=int, default=2048, help="most tokens per sequence")
    parser.add_argument("--quantization", choices=["int8", "fp8", "int4"], default=None, help="weight-only")
    parser.add_argument(
        "--quantize-lm-head", action="store_true", help="with --quantization: the LM head too (default: kept)"
    )
    parser.add_argument("--kv-cache-dtype", choices=["auto", "int8", "fp8"], default="auto")
    parser.add_argument(
        "--kernels",
        choices=["native", "torch"],
        default="native",
        help="cpu backend: C++ kernels or torch ops",
    )
    parser.add_argument(
        "--tensor-parallel-size", "-tp", type=int, default=1, help="shard the model over this many processes"
    )
    parser.add_argument(
        "--speculative-config",
        default=None,
        help='speculative decoding as JSON, as in vLLM: \'{"method": "ngram", "num_speculative_tokens": 4}\' '
        'or \'{"method": "draft_model", "model": "...", "num_speculative_tokens": 4}\'',
    )
    graphs = parser.add_argument_group("static graphs (cpu-traced, neuron)")
    graphs.add_argument(
        "--artifact-cache", "--cache", default=None, help="compiled graphs: a directory or s3://bucket/prefix"
    )
    graphs.add_argument(
        "--buckets", default=None, help="token buckets (a step's padded size), e.g. 16,64 (default: 16..512)"
    )
    graphs.add_argument(
        "--context-buckets", default=None, help="context lengths graphs are built for, e.g. 256,1024"
    )
    graphs.add_argument(
        "--target", default=None, help="the Neuron instance compiled for (fit check), e.g. inf2.48xlarge"
    )
    graphs.add_argument("--optlevel", type=int, default=1, choices=[1, 2, 3], help="neuronx-cc -O level")
    graphs.add_argument(
        "--auto-cast", default="none", choices=["none", "matmult", "all"], help="neuronx-cc --auto-cast"
    )
    graphs.add_argument("--lnc", type=int, default=None, choices=[1, 2], help="Trn2 logical NeuronCore size")


def _token_buckets(args: argparse.Namespace, max_batched: int = 512) -> dict:
    """SchedulerConfig arguments for --buckets: the buckets, and a step budget they can hold."""
    if not args.buckets:
        return {"max_num_batched_tokens": max_batched}
    buckets = tuple(int(b) for b in args.buckets.split(","))
    return {"token_buckets": buckets, "max_num_batched_tokens": min(max_batched, max(buckets))}


def _compile_config(args: argparse.Namespace):
    from neuronserve.config import CompileConfig

    kwargs = {}
    if args.context_buckets:
        kwargs["context_buckets"] = tuple(int(c) for c in args.context_buckets.split(","))
    return CompileConfig(
        artifact_cache=args.artifact_cache,
        target=args.target,
        optlevel=args.optlevel,
        auto_cast=args.auto_cast,
        lnc=args.lnc,
        **kwargs,
    )


def _add_sampling_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--min-p", type=float, default=0.0)
    parser.add_argument("--repetition-penalty", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--stop", action="append", default=None, help="a stop string (repeatable)")
    parser.add_argument("--hold-markup", action="store_true", help="never print half a <tag>")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="neuronserve", description="Serve Llama-family models.")
    commands = parser.add_subparsers(dest="command", required=True)
    gen = commands.add_parser("generate", help="generate from one prompt, streaming to the terminal")
    gen.add_argument("prompt", help="the prompt text ('-' reads standard input)")
    gen.add_argument("--chat", action="store_true", help="send the prompt as a user message (chat template)")
    gen.add_argument("--system", default=None, help="a system message (with --chat)")
    _add_model_args(gen)
    _add_sampling_args(gen)

    _add_serve_parser(commands)

    quant = commands.add_parser("quantize", help="quantize a model's weights once and save them")
    quant.add_argument("--model", default=DEFAULT_MODEL, help="a model name, a HF directory or a .gguf file")
    quant.add_argument("--dtype", choices=["int8", "fp8", "int4"], required=True)
    quant.add_argument("--group-size", type=int, default=32, help="int4: inputs per group")
    quant.add_argument("--quantize-lm-head", action="store_true", help="also the LM head (default: kept)")
    quant.add_argument("--out", required=True, help="the directory to write")

    comp = commands.add_parser(
        "compile", help="compile (or fetch from the artifact cache) one graph per bucket, then exit"
    )
    _add_model_args(comp)
    comp.set_defaults(backend="cpu-traced")
    comp.add_argument("--max-num-seqs", type=int, default=32, help="the batch a graph holds (its B)")

    sim = commands.add_parser(
        "simulate", help="predict a benchmark on Inf2/Trn1/Trn2 (or this CPU) with the real scheduler"
    )
    plan = commands.add_parser("plan", help="the cheapest instance, TP degree and fleet for a load and SLOs")
    from neuronserve.sim.commands import add_arguments

    add_arguments(sim, plan)

    _add_bench_parser(commands)
    from neuronserve.distributed.commands import add_batch_arguments

    batch = commands.add_parser(
        "run-batch", help="run an OpenAI Batch API JSONL file (resumable), in process or on Ray Data"
    )
    _add_model_args(batch)
    add_batch_arguments(batch)
    return parser


def _add_serve_parser(commands) -> None:
    serve = commands.add_parser("serve", help="the OpenAI-compatible HTTP server")
    _add_model_args(serve)
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument(
        "--api-key",
        default=os.environ.get("NEURONSERVE_API_KEY"),
        help="require this key (or $NEURONSERVE_API_KEY)",
    )
    serve.add_argument(
        "--served-model-name", default=None, help="the model name clients send (default: --model)"
    )
    serve.add_argument("--max-num-seqs", type=int, default=32, help="most sequences decoded together")
    serve.add_argument("--max-num-batched-tokens", type=int, default=512, help="token budget of one step")
    serve.add_argument("--max-waiting", type=int, default=256, help="waiting requests before 429s")
    serve.add_argument("--kv-cache-gb", type=float, default=1.0, help="KV-cache memory, GiB")
    serve.add_argument("--no-prefix-caching", action="store_true")
    serve.add_argument("--log-level", default="info")
    from neuronserve.distributed.commands import add_replica_arguments

    add_replica_arguments(serve.add_argument_group("replicas on Ray Serve (needs the 'distributed' extra)"))


def _add_bench_parser(commands) -> None:
    bench = commands.add_parser(
        "bench", help="benchmark the in-process engine or an OpenAI-compatible server"
    )
    target = bench.add_argument_group("target")
    target.add_argument("--base-url", default=None, help="an OpenAI-compatible server; omit for in-process")
    target.add_argument("--api-key", default=os.environ.get("NEURONSERVE_API_KEY"))
    target.add_argument(
        "--served-model", default=None, help="model name to send (default: the server's first)"
    )
    _add_model_args(bench)
    work = bench.add_argument_group("workload")
    work.add_argument("--workload", choices=["shopping", "fixed", "random", "jsonl"], default="shopping")
    work.add_argument("--num-prompts", type=int, default=64)
    work.add_argument("--input-len", type=int, default=256, help="fixed: prompt tokens")
    work.add_argument("--output-len", type=int, default=128, help="fixed, shopping: tokens to generate")
    work.add_argument("--input-range", default="64:512", help="random: low:high prompt tokens")
    work.add_argument("--output-range", default="32:256", help="random: low:high output tokens")
    work.add_argument("--jsonl", default=None, help="jsonl: the prompts file")
    work.add_argument(
        "--allow-eos", action="store_true", help="stop at end-of-sequence (default: exact lengths)"
    )
    work.add_argument("--seed", type=int, default=0)
    load = bench.add_argument_group("load")
    load.add_argument("--concurrency", default=None, help="closed loop: in flight, e.g. 1,8,32 (a sweep)")
    load.add_argument("--request-rate", default=None, help="open loop: requests/s, e.g. 1,2,4 (a sweep)")
    load.add_argument("--max-concurrency", type=int, default=None, help="open loop: cap in flight")
    load.add_argument("--burstiness", type=float, default=1.0, help="gamma shape: 1 = Poisson")
    out = bench.add_argument_group("metrics and cost")
    out.add_argument("--goodput", nargs="*", default=[], help="SLOs in ms, e.g. ttft:500 tpot:50")
    out.add_argument("--instance", default=None, help="price the run as this instance (see the price table)")
    out.add_argument("--reserved", action="store_true", help="use the 1-year reserved price")
    out.add_argument("--price-per-hour", type=float, default=None, help="the host's $/hour")
    out.add_argument("--out", default="bench-results", help="directory for JSON, markdown and plot")
    out.add_argument("--no-progress", action="store_true")


def _csv(text: str | None, kind) -> list | None:
    return None if text is None else [kind(v) for v in text.split(",") if v.strip()]


def _range(text: str, name: str) -> tuple[int, int]:
    lo, _, hi = text.partition(":")
    try:
        return int(lo), int(hi or lo)
    except ValueError:
        raise ValueError(f"{name}: expected low:high, got {text!r}") from None


def _bench_specs(args: argparse.Namespace) -> list:
    from neuronserve.bench import workloads

    tokenizer = None
    if args.workload in ("fixed", "random"):
        from neuronserve.model.loader import convert_gguf, resolve_model_path
        from neuronserve.model.tokenizer import Tokenizer

        path = resolve_model_path(args.model)
        tokenizer = Tokenizer.from_dir(convert_gguf(path) if path.suffix == ".gguf" else path)
    if args.workload == "shopping":
        specs = workloads.shopping(args.num_prompts, args.output_len, seed=args.seed)
    elif args.workload == "fixed":
        specs = workloads.fixed(args.num_prompts, args.input_len, args.output_len, args.seed, tokenizer)
    elif args.workload == "random":
        specs = workloads.random_lengths(
            args.num_prompts,
            _range(args.input_range, "input_range"),
            _range(args.output_range, "output_range"),
            args.seed,
            tokenizer,
        )
    else:
        if not args.jsonl:
            raise ValueError("jsonl: --workload jsonl needs --jsonl FILE")
        specs = workloads.jsonl(args.jsonl, args.output_len)
    return specs


def _speculative_config(args: argparse.Namespace):
    """--speculative-config parsed and validated (``None`` without it)."""
    import json

    from neuronserve.config import SpeculativeConfig

    text = getattr(args, "speculative_config", None)
    if not text:
        return None
    try:
        config = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"speculative_config: not JSON ({exc})") from None
    return SpeculativeConfig.from_dict(config)


def _engine(args: argparse.Namespace, scheduler_config, cache_config, kv_cache_gb: float):
    """An engine for the model and backend options every command shares (_add_model_args)."""
    from neuronserve.engine.engine import Engine

    return Engine.from_pretrained(
        args.model,
        backend=args.backend,
        scheduler_config=scheduler_config,
        cache_config=cache_config,
        kv_cache_gb=kv_cache_gb,
        quantization=args.quantization,
        modules_to_not_convert=["embed_tokens"] if args.quantize_lm_head else None,
        tensor_parallel_size=args.tensor_parallel_size,
        compile_config=_compile_config(args),
        kernels=args.kernels,
        speculative_config=_speculative_config(args),
    )


def _bench_engine(args: argparse.Namespace, most_in_flight: int):
    """The in-process engine ``neuronserve bench`` measures when no --base-url is given."""
    from neuronserve.config import CacheConfig, SchedulerConfig

    scheduler_config = SchedulerConfig(
        max_num_seqs=min(most_in_flight, 64),
        max_model_len=args.max_model_len,
        max_waiting=None,
        **_token_buckets(args),
    )
    return _engine(args, scheduler_config, CacheConfig(cache_dtype=args.kv_cache_dtype), kv_cache_gb=1.0)


def cmd_bench(args: argparse.Namespace) -> int:
    import asyncio
    from pathlib import Path

    from neuronserve.bench import cost, report
    from neuronserve.bench.metrics import parse_goodput
    from neuronserve.bench.sweep import sweep

    slos = parse_goodput(args.goodput)
    price = args.price_per_hour
    if args.instance:
        price = cost.price_per_hour(args.instance, "reserved_1yr" if args.reserved else "on_demand")
    concurrencies = _csv(args.concurrency, int)
    rates = _csv(args.request_rate, float)
    if concurrencies and rates:
        raise ValueError("concurrency: give --concurrency or --request-rate, not both")
    if not concurrencies and not rates:
        concurrencies = [8]

    specs = _bench_specs(args)

    async def main() -> tuple[str, list[dict]]:
        from neuronserve.bench.clients import EngineClient, OpenAIClient

        if args.base_url:
            client = OpenAIClient(
                args.base_url, args.served_model, args.api_key, ignore_eos=not args.allow_eos
            )
        else:
            from neuronserve.engine.async_engine import AsyncEngine, model_thread

            # Loaded on the thread that runs the steps (one OpenMP team: see async_engine's doc).
            concurrency = max(concurrencies or [args.max_concurrency or 32])
            engine = model_thread().submit(_bench_engine, args, concurrency).result()
            client = EngineClient(AsyncEngine(engine), ignore_eos=not args.allow_eos)
        try:
            async with client:
                runs = await sweep(
                    client,
                    specs,
                    concurrencies=concurrencies,
                    request_rates=rates,
                    max_concurrency=args.max_concurrency,
                    burstiness=args.burstiness,
                    slos=slos,
                    price_per_hour=price,
                    seed=args.seed,
                    progress=not args.no_progress,
                )
        finally:
            if not args.base_url:
                engine.close()  # stops tensor-parallel workers
        return client.name, runs

    name, runs = asyncio.run(main())
    out = Path(args.out)
    report.write_json(
        out / "bench.json",
        {"target": name, "workload": args.workload, "num_prompts": len(specs), "slos_ms": slos, "runs": runs},
    )
    table = report.markdown_table(runs)
    (out / "bench.md").write_text(f"# {name}: {args.workload}, {len(specs)} prompts\n\n{table}\n")
    x_key = "concurrency" if concurrencies else "request_rate"
    report.plot({name: runs}, out / "bench.png", x_key=x_key)
    print(table)
    for run in runs:
        if run["stopped_early"]:
            print(f"stopped early: {run['stopped_early']}", file=sys.stderr)
        for error in run["errors"]:
            print(f"error: {error}", file=sys.stderr)
    print(f"wrote {out}/bench.json, bench.md, bench.png")
    return 1 if any(r["stopped_early"] for r in runs) else 0


def cmd_quantize(args: argparse.Namespace) -> int:
    from neuronserve.model.loader import load_model
    from neuronserve.quant import quantize_model
    from neuronserve.quant.io import save_quantized

    started = time.perf_counter()
    model, _, hf_dir = load_model(args.model)
    skip = ["embed_tokens"] if args.quantize_lm_head else None
    quantize_model(model, args.dtype, skip, group_size=args.group_size)
    out = save_quantized(model, hf_dir, args.out)
    size = (out / "model.safetensors").stat().st_size / 1e6
    print(f"wrote {out} ({args.dtype}, {size:.0f} MB) in {time.perf_counter() - started:.1f} s")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    if args.replicas > 1 or args.address or args.autoscale:
        from neuronserve.distributed.commands import cmd_serve_replicas

        return cmd_serve_replicas(args)

    from neuronserve.config import CacheConfig, SchedulerConfig
    from neuronserve.engine.engine import Engine
    from neuronserve.server.app import create_app

    scheduler_config = SchedulerConfig(
        max_num_seqs=args.max_num_seqs,
        max_model_len=args.max_model_len,
        max_waiting=args.max_waiting,
        **_token_buckets(args, args.max_num_batched_tokens),
    )
    cache_config = CacheConfig(
        enable_prefix_caching=not args.no_prefix_caching, cache_dtype=args.kv_cache_dtype
    )

    def load_engine() -> Engine:
        return _engine(args, scheduler_config, cache_config, args.kv_cache_gb)

    app = create_app(load_engine, args.served_model_name or args.model, api_key=args.api_key or None)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from neuronserve.config import CacheConfig, SchedulerConfig
    from neuronserve.engine.params import SamplingParams

    params = SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        min_p=args.min_p,
        repetition_penalty=args.repetition_penalty,
        seed=args.seed,
        stop=args.stop,
        hold_markup=args.hold_markup,
    )
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    scheduler_config = SchedulerConfig(
        max_num_seqs=1, max_model_len=args.max_model_len, **_token_buckets(args)
    )
    engine = _engine(args, scheduler_config, CacheConfig(cache_dtype=args.kv_cache_dtype), kv_cache_gb=0.5)
    if args.chat:
        messages = [{"role": "system", "content": args.system}] if args.system else []
        prompt = engine.tokenizer.apply_chat_template([*messages, {"role": "user", "content": prompt}])
    engine.add_request(prompt, params, request_id="cli")
    out = None
    try:
        while engine.has_unfinished():
            for out in engine.step():
                sys.stdout.write(out.outputs[0].delta_text)
                sys.stdout.flush()
    finally:
        engine.close()
    sys.stdout.write("\n")
    if out is not None:
        m, n = out.metrics, len(out.outputs[0].token_ids)
        decode_s = (m.last_token_time or m.first_token_time) - m.first_token_time
        rate = f"{(n - 1) / decode_s:.1f} tok/s" if n > 1 and decode_s > 0 else "n/a"
        print(
            f"[{n} tokens, finish: {out.outputs[0].finish_reason}; first token after "
            f"{m.time_to_first_token:.2f} s; decode {rate}]",
            file=sys.stderr,
        )
    return 0


def cmd_compile(args: argparse.Namespace) -> int:
    from neuronserve.backends.build import ModelSpec, build_rank
    from neuronserve.config import CacheConfig, SchedulerConfig

    speculative = _speculative_config(args)
    scheduler_config = SchedulerConfig(
        max_num_seqs=args.max_num_seqs,
        max_model_len=args.max_model_len,
        num_speculative_tokens=speculative.num_speculative_tokens if speculative else 0,
        **_token_buckets(args),
    )
    spec = ModelSpec(
        model=args.model,
        backend=args.backend,
        quantization=args.quantization,
        scheduler_config=scheduler_config,
        cache_config=CacheConfig(cache_dtype=args.kv_cache_dtype),
        kv_cache_gb=1.0,
        tensor_parallel_size=args.tensor_parallel_size,
        compile_config=_compile_config(args),
    )
    started = time.perf_counter()
    runner = build_rank(spec).runner
    if not hasattr(runner, "graphs"):
        raise ValueError(f"backend: {args.backend} compiles nothing; use cpu-traced or neuron")
    manifest = runner.cache.manifest()
    print(f"artifact cache {runner.cache.store} key {runner.cache.key}")
    print(f"{'bucket':<20} {'status':<9} {'bytes':>10}")
    for bucket in runner.buckets:
        status = "compiled" if bucket in runner.compiled else "cached"
        print(f"{bucket.name:<20} {status:<9} {manifest['files'][bucket.name]['bytes']:>10}")
    compiled, total = len(runner.compiled), len(runner.buckets)
    print(
        f"{total} graphs ({compiled} compiled, {total - compiled} from the cache) "
        f"in {time.perf_counter() - started:.1f} s"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    started = time.perf_counter()
    try:
        if args.command == "generate":
            return cmd_generate(args)
        if args.command == "serve":
            return cmd_serve(args)
        if args.command == "bench":
            return cmd_bench(args)
        if args.command == "quantize":
            return cmd_quantize(args)
        if args.command == "compile":
            return cmd_compile(args)
        if args.command == "run-batch":
            from neuronserve.distributed.commands import cmd_run_batch

            return cmd_run_batch(args)
        if args.command in ("simulate", "plan"):
            from neuronserve.sim import commands

            return commands.cmd_simulate(args) if args.command == "simulate" else commands.cmd_plan(args)
    except ValueError as exc:  # bad arguments name their field
        print(f"neuronserve: error: {exc}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as exc:  # an optional extra that is not installed
        if "pip install" not in str(exc):
            raise
        print(f"neuronserve: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\ninterrupted after {time.perf_counter() - started:.1f} s", file=sys.stderr)
        return 130
    return 1


if __name__ == "__main__":
    sys.exit(main())
