"""Regenerate ``catalog.json``: 288 seeded products (8 categories x 36) with features, reviews and
customer Q&A, model numbers in their names so that every name is distinct.

    python examples/shopping_assistant/make_catalog.py
"""

from __future__ import annotations

import json
from pathlib import Path

from neuronserve.bench.catalog import build

SEED = 7

if __name__ == "__main__":
    products = build(SEED, per_category=36, model_numbers=True, qa=True)
    names = [p["title"] for p in products]
    assert len(set(names)) == len(names), "duplicate product names"
    out = Path(__file__).with_name("catalog.json")
    out.write_text(json.dumps({"seed": SEED, "products": products}, indent=1) + "\n")
    print(f"wrote {out} ({len(products)} products)")
