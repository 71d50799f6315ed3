"""Benchmark workloads: what each request asks for. Deterministic for a given seed.

- ``fixed``: every prompt ``input_len`` tokens, every answer ``output_len``;
- ``random``: lengths drawn uniformly from ranges;
- ``shopping``: the shopping assistant's real shape: one shared system prompt, product snippets
  and reviews retrieved from the catalog shipped with the package, and a customer question (chat);
- ``jsonl``: one JSON object per line, ``{"prompt": ...}`` or ``{"messages": [...]}``, with an
  optional ``"max_tokens"``.
Token lengths are exact when a tokenizer is given (prompts are decoded from token ids), else
about one token per word.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from neuronserve.bench.prompts import SHOPPING_SYSTEM_PROMPT


@dataclass
class RequestSpec:
    """One request: a completion ``prompt`` or chat ``messages``, and how many tokens to generate."""

    max_tokens: int
    prompt: str | None = None
    messages: list[dict] | None = None
    prompt_len: int | None = None  # tokens, when the workload knows it

    @property
    def is_chat(self) -> bool:
        return self.messages is not None


_WORDS = [
    "price", "battery", "review", "motor", "size", "colour", "quiet", "warranty", "travel", "kitchen",
    "running", "comfort", "weight", "shipping", "return", "value", "durable", "compact", "design",
    "budget", "feature", "quality",
]  # fmt: skip


def _text_of_length(n: int, rng: random.Random, tokenizer=None) -> str:
    if tokenizer is None:
        return " ".join(rng.choice(_WORDS) for _ in range(n))
    # Decode random ordinary token ids, then re-encode and trim: exactly n tokens.
    ids = [rng.randrange(1000, min(tokenizer.vocab_size, 30000)) for _ in range(n + 8)]
    ids = tokenizer.encode(tokenizer.decode(ids), add_special_tokens=False)[:n]
    return tokenizer.decode(ids)


def fixed(
    num_prompts: int, input_len: int, output_len: int, seed: int = 0, tokenizer=None
) -> list[RequestSpec]:
    return random_lengths(num_prompts, (input_len, input_len), (output_len, output_len), seed, tokenizer)


def random_lengths(
    num_prompts: int,
    input_range: tuple[int, int],
    output_range: tuple[int, int],
    seed: int = 0,
    tokenizer=None,
) -> list[RequestSpec]:
    for name, (lo, hi) in (("input_range", input_range), ("output_range", output_range)):
        if not 1 <= lo <= hi:
            raise ValueError(f"{name}: need 1 <= low <= high, got {lo}..{hi}")
    rng = random.Random(seed)
    specs = []
    for _ in range(num_prompts):
        n_in, n_out = rng.randint(*input_range), rng.randint(*output_range)
        specs.append(
            RequestSpec(max_tokens=n_out, prompt=_text_of_length(n_in, rng, tokenizer), prompt_len=n_in)
        )
    return specs


def load_catalog() -> list[dict]:
    """The seeded product catalog shipped as package data (see benchmarks/make_catalog.py)."""
    text = resources.files("neuronserve.bench").joinpath("data/catalog.json").read_text()
    return json.loads(text)["products"]


_QUESTIONS = [
    "Which of these {c} would you pick for a beginner, and why?",
    "I care most about durability. Which of these {c} should I buy?",
    "Compare the first two {c} for value for money.",
    "What do reviewers complain about most for these {c}?",
    "Is the most expensive of these {c} worth the extra money?",
    "Which of these {c} is best for a small apartment?",
]

SHOPPING_INSTRUCTIONS = (
    SHOPPING_SYSTEM_PROMPT
    + " Use only the product information given. Refer to a product with its tag, for example "
    '<product id="B0123456789"/>, so the shop can show its card. Mention price and rating when '
    "they matter, and say honestly when the reviews are mixed."
)


def _snippet(p: dict) -> str:
    reviews = " ".join(f'"{r["text"]}" ({r["stars"]}/5)' for r in p["reviews"])
    return (
        f'<product id="{p["id"]}"/> {p["title"]}: ${p["price_usd"]:.2f}, rated {p["rating"]}/5. '
        f"Features: {', '.join(p['features'])}. Reviews: {reviews}"
    )


def shopping(
    num_prompts: int, output_len: int = 128, seed: int = 0, products_per_question: int = 3
) -> list[RequestSpec]:
    """Chat requests: shared system prompt + retrieved product snippets + a customer question."""
    catalog = load_catalog()
    by_category: dict[str, list[dict]] = {}
    for p in catalog:
        by_category.setdefault(p["category"], []).append(p)
    categories = sorted(by_category)
    rng = random.Random(seed)
    specs = []
    for _ in range(num_prompts):
        category = rng.choice(categories)
        # "Retrieval": the best-rated products of the category lead; the rest vary per question.
        ranked = sorted(by_category[category], key=lambda p: (-p["rating"], p["id"]))
        chosen = ranked[:1] + rng.sample(ranked[1:], products_per_question - 1)
        context = "\n".join(_snippet(p) for p in chosen)
        question = rng.choice(_QUESTIONS).format(c=category)
        messages = [
            {"role": "system", "content": SHOPPING_INSTRUCTIONS},
            {"role": "user", "content": f"Products:\n{context}\n\nQuestion: {question}"},
        ]
        specs.append(RequestSpec(max_tokens=output_len, messages=messages))
    return specs


def jsonl(path: str | Path, default_max_tokens: int = 128) -> list[RequestSpec]:
    specs = []
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}:{number}: not JSON ({exc.msg})") from None
        if not isinstance(item, dict) or ("prompt" in item) == ("messages" in item):
            raise ValueError(f'{path}:{number}: expected an object with "prompt" or "messages"')
        max_tokens = item.get("max_tokens", default_max_tokens)
        if not isinstance(max_tokens, int) or max_tokens < 1:
            raise ValueError(f"{path}:{number}: max_tokens must be an integer >= 1")
        specs.append(
            RequestSpec(max_tokens=max_tokens, prompt=item.get("prompt"), messages=item.get("messages"))
        )
    if not specs:
        raise ValueError(f"{path}: no prompts")
    return specs
