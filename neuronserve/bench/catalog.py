"""The seeded product catalog: products with features, customer reviews and (optionally) customer
Q&A. The benchmark's shopping workload ships 48 of them (``data/catalog.json``, written by
``benchmarks/make_catalog.py``); the shopping-assistant example ships a few hundred."""

from __future__ import annotations

import random

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


def build(
    seed: int = 2026, per_category: int = 6, model_numbers: bool = False, qa: bool = False
) -> list[dict]:
    """``per_category`` products in each of the 8 categories, with features and 3 reviews each.
    ``model_numbers``: titles carry a model number (unique names in large catalogs); ``qa``: two
    customer questions with answers per product (drawn from their own generator, so the rest of
    the catalog is the same with or without them)."""
    rng = random.Random(seed)
    products, taken = [], set()
    for category, (names, features) in CATEGORIES.items():
        singular = category.removesuffix("s")
        for _ in range(per_category):
            name = f"{rng.choice(names)} {rng.choice(ADJECTIVES)}"
            if model_numbers:  # drawn until the name is new: names must tell products apart
                numbered = f"{name} {rng.randrange(100, 1000)}"
                while numbered.title() in taken:
                    numbered = f"{name} {rng.randrange(100, 1000)}"
                taken.add(numbered.title())
                name = numbered
            title = f"{name} {singular}"
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
            if qa:
                products[-1]["qa"] = _questions(products[-1], features)
    return products


def _questions(product: dict, category_features: list[str]) -> list[dict]:
    rng = random.Random(product["id"])
    has = rng.choice(product["features"])
    missing = rng.choice([f for f in category_features if f not in product["features"]])
    return [
        {"q": f"Does it have {has}?", "a": f"Yes, the {product['title']} has {has}."},
        {"q": f"Does it come with {missing}?", "a": f"No, {missing} is not part of this model."},
    ]
