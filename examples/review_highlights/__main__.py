"""``python -m examples.review_highlights``: refresh the catalog's review highlights."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from examples.review_highlights.highlights import CACHE, WORK_DIR, refresh
from examples.shopping_assistant.retrieval import load_catalog
from neuronserve.distributed import ray_available
from neuronserve.distributed.spec import EngineSpec
from neuronserve.model.loader import DEFAULT_MODEL


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="summarize each product's reviews into highlights")
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--cache", type=Path, default=CACHE, help="highlights by product, with review hashes")
    parser.add_argument("--work-dir", type=Path, default=WORK_DIR, help="the batch's files while it runs")
    parser.add_argument("--limit", type=int, default=None, help="only the first N products")
    parser.add_argument("--replicas", type=int, default=1, help="> 1: Ray Data over that many engines")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)

    products = load_catalog()[: args.limit]
    backend = "ray" if args.replicas > 1 and ray_available() else "local"
    spec = EngineSpec(
        model=args.model, max_model_len=1024, max_num_seqs=32, max_waiting=None, kv_cache_gb=0.5
    )
    result = refresh(
        products, spec, args.cache, args.work_dir, backend, args.replicas, progress=not args.no_progress
    )
    print(
        f"{result.products} products: {result.refreshed} refreshed, {result.unchanged} unchanged, "
        f"{result.failed} failed; highlights in {args.cache}",
        file=sys.stderr,
    )
    return 1 if result.failed else 0


if __name__ == "__main__":
    sys.exit(main())
