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
    return parser


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from neuronserve.config import CacheConfig, SchedulerConfig
    from neuronserve.engine.engine import Engine
    from neuronserve.server.app import create_app

    scheduler_config = SchedulerConfig(
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        max_model_len=args.max_model_len,
        max_waiting=args.max_waiting,
    )
    cache_config = CacheConfig(enable_prefix_caching=not args.no_prefix_caching)

    def load_engine() -> Engine:
        return Engine.from_pretrained(
            args.model,
            backend=args.backend,
            scheduler_config=scheduler_config,
            cache_config=cache_config,
            kv_cache_gb=args.kv_cache_gb,
        )

    app = create_app(load_engine, args.served_model_name or args.model, api_key=args.api_key or None)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from neuronserve.config import CacheConfig, SchedulerConfig
    from neuronserve.engine.engine import Engine
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
    scheduler_config = SchedulerConfig(max_num_seqs=1, max_model_len=args.max_model_len)
    engine = Engine.from_pretrained(
        args.model,
        backend=args.backend,
        scheduler_config=scheduler_config,
        cache_config=CacheConfig(),
        kv_cache_gb=0.5,
    )
    if args.chat:
        messages = [{"role": "system", "content": args.system}] if args.system else []
        prompt = engine.tokenizer.apply_chat_template([*messages, {"role": "user", "content": prompt}])
    engine.add_request(prompt, params, request_id="cli")
    out = None
    while engine.has_unfinished():
        for out in engine.step():
            sys.stdout.write(out.outputs[0].delta_text)
            sys.stdout.flush()
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


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    started = time.perf_counter()
    try:
        if args.command == "generate":
            return cmd_generate(args)
        if args.command == "serve":
            return cmd_serve(args)
    except ValueError as exc:  # bad arguments name their field
        print(f"neuronserve: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\ninterrupted after {time.perf_counter() - started:.1f} s", file=sys.stderr)
        return 130
    return 1


if __name__ == "__main__":
    sys.exit(main())
