"""Regenerate ``neuronserve/bench/data/catalog.json``: the seeded product catalog (products with
features and customer reviews) that the shopping workload retrieves snippets from.

    python benchmarks/make_catalog.py
"""

from __future__ import annotations

import json
from pathlib import Path

from neuronserve.bench.catalog import build

if __name__ == "__main__":
    out = Path(__file__).parents[1] / "neuronserve" / "bench" / "data" / "catalog.json"
    out.write_text(json.dumps({"seed": 2026, "products": build()}, indent=1) + "\n")
    print(f"wrote {out}")
