"""Shopping questions: the workload the demo and the benchmarks share (deterministic, no downloads)."""

from __future__ import annotations

SHOPPING_SYSTEM_PROMPT = "You are a helpful shopping assistant. Answer briefly and concretely."

_PRODUCTS = [
    "running shoes for flat feet",
    "a cast iron skillet",
    "a robot vacuum for a small apartment",
    "a blender that crushes ice",
    "a backpack for a weekend hike",
    "noise-cancelling headphones for commuting",
    "a stroller for city sidewalks",
    "an espresso machine for beginners",
    "a standing desk",
    "a winter jacket for wet climates",
    "a mechanical keyboard for programming",
    "a tent for two people",
    "a cordless drill for home repairs",
    "a baby car seat",
    "a laptop for college",
    "an air purifier for allergies",
]
_ASKS = [
    "What should I look for when buying {p}?",
    "Is it worth paying more for {p}? Give me two reasons either way.",
    "I have a budget of about 100 dollars. Which features matter most in {p}, and which can I skip?",
    "How do I keep {p} in good shape for years?",
]


def shopping_questions(n: int) -> list[str]:
    """``n`` distinct questions (cycling through products, then question forms)."""
    combos = [ask.format(p=p) for ask in _ASKS for p in _PRODUCTS]
    if n > len(combos):
        raise ValueError(f"n: at most {len(combos)} distinct questions, asked for {n}")
    return combos[:n]


def shopping_conversations(n: int) -> list[list[dict]]:
    return [
        [{"role": "system", "content": SHOPPING_SYSTEM_PROMPT}, {"role": "user", "content": q}]
        for q in shopping_questions(n)
    ]
