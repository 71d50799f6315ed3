"""Regenerate ``neuronserve/bench/data/catalog.json``: the seeded product catalog (products with
features and customer reviews) that the shopping workload retrieves snippets from.

    python benchmarks/make_catalog.py
"""

from __future__ import annotations

import json
import random
from pathlib import Path

CATEGORIES = {
    "running shoes": (
        ["Stride", "Trail", "Tempo", "Glide"],
        [
            "arch support",
            "wide toe box",
            "carbon plate",
            "breathable mesh",
            "8 mm drop",
            "recycled upper",
            "reflective heel",
        ],
    ),
    "blenders": (
        ["Vortex", "Pulse", "Crush", "Silk"],
        [
            "1200 W motor",
            "ice-crushing blades",
            "64 oz jar",
            "dishwasher-safe jar",
            "10 speeds",
            "self-cleaning mode",
            "BPA-free plastic",
        ],
    ),
    "robot vacuums": (
        ["Roam", "Sweep", "Dock", "Orbit"],
        [
            "lidar mapping",
            "self-emptying base",
            "pet-hair brush",
            "2700 Pa suction",
            "no-go zones",
            "mopping pad",
            "120 min battery",
        ],
    ),
    "headphones": (
        ["Hush", "Echo", "Aria", "Transit"],
        [
            "active noise cancelling",
            "30 h battery",
            "USB-C",
            "multipoint Bluetooth",
            "foldable",
            "transparency mode",
            "memory-foam cushions",
        ],
    ),
    "backpacks": (
        ["Ridge", "Summit", "Trek", "Daypack"],
        [
            "35 L capacity",
            "rain cover",
            "hip belt",
            "hydration sleeve",
            "ventilated back",
            "laptop pocket",
            "1.1 kg weight",
        ],
    ),
    "skillets": (
        ["Forge", "Hearth", "Ember", "Cast"],
        [
            "pre-seasoned",
            "12 inch",
            "helper handle",
            "oven-safe to 260 C",
            "induction-ready",
            "pour spouts",
            "lifetime warranty",
        ],
    ),
    "espresso machines": (
        ["Crema", "Barista", "Ristretto", "Lungo"],
        [
            "15 bar pump",
            "steam wand",
            "built-in grinder",
            "PID temperature control",
            "1.8 L tank",
            "30 s heat-up",
            "pressurized baskets",
        ],
    ),
    "standing desks": (
        ["Rise", "Lift", "Stand", "Flex"],
        [
            "dual motor",
            "4 memory presets",
            "120 kg load",
            "anti-collision",
            "bamboo top",
            "cable tray",
            "62-127 cm height range",
        ],
    ),
}
ADJECTIVES = ["Pro", "Lite", "Max", "Plus", "Air", "One", "X", "Go"]
PRAISE = [
    "works exactly as described",
    "great value for the price",
    "sturdy and well made",
    "easy to set up",
    "my second one, still love it",
    "quiet and efficient",
]
COMPLAINTS = [
    "the manual is confusing",
    "a bit heavier than expected",
    "took a week to break in",
    "the app needs work",
    "runs slightly small",
    "loud on the highest setting",
]


def build(seed: int = 2026) -> list[dict]:
    rng = random.Random(seed)
    products = []
    for category, (names, features) in CATEGORIES.items():
        singular = category.removesuffix("s")
        for _ in range(6):
            title = f"{rng.choice(names)} {rng.choice(ADJECTIVES)} {singular}"
            reviews = []
            for _ in range(3):
                stars = rng.choice([2, 3, 4, 4, 5, 5, 5])
                text = rng.choice(PRAISE) if stars >= 4 else rng.choice(COMPLAINTS)
                if rng.random() < 0.5:
                    text += f"; {rng.choice(COMPLAINTS if stars >= 4 else PRAISE)}"
                reviews.append({"stars": stars, "text": text.capitalize() + "."})
            products.append(
                {
                    "id": f"B0{rng.randrange(10**8, 10**9)}",
                    "category": category,
                    "title": title.title(),
                    "price_usd": round(rng.uniform(25, 600), 2),
                    "rating": round(sum(r["stars"] for r in reviews) / 3, 1),
                    "features": rng.sample(features, 4),
                    "reviews": reviews,
                }
            )
    return products


if __name__ == "__main__":
    out = Path(__file__).parents[1] / "neuronserve" / "bench" / "data" / "catalog.json"
    out.write_text(json.dumps({"seed": 2026, "products": build()}, indent=1) + "\n")
    print(f"wrote {out}")
