"""Review highlights: each product's reviews summarized into a few short lines by a batch job, cached
by a hash of the reviews, so a rerun refreshes only the products whose reviews changed.

    python -m examples.review_highlights                    # every product, one engine in process
    python -m examples.review_highlights --replicas 2       # on Ray Data (the distributed extra)

Results go to ``highlights.json`` beside this file (``--cache``), which the shopping assistant's
page reads to show highlights on its product cards. The batch's request and result files live in
``--work-dir``; a run that is killed resumes from them (``run-batch`` skips answered lines), and
they are removed once their results are in the cache.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

CACHE = Path(__file__).with_name("highlights.json")
WORK_DIR = Path(__file__).with_name(".work")
MAX_HIGHLIGHTS = 3
INSTRUCTION = "Summarize these reviews as three short bullet points (praise and complaints)."


def reviews_hash(product: dict) -> str:
    """Names a product's reviews: any change to them (text, stars, order) changes it."""
    data = json.dumps(product["reviews"], sort_keys=True, ensure_ascii=False).encode()
    return hashlib.sha256(data).hexdigest()[:16]


def request_line(product: dict) -> dict:
    """The product's OpenAI batch line; its ``custom_id`` carries the reviews' hash, so results
    of older reviews are never mistaken for current ones."""
    reviews = "\n".join(f"- {r['text']} ({r['stars']} stars)" for r in product["reviews"])
    # The instruction after the reviews: SmolLM2-135M follows it more often there than in a
    # system prompt (tried on a handful of products).
    content = f"Customer reviews of the {product['title']}:\n{reviews}\n\n{INSTRUCTION}"
    return {
        "custom_id": f"{product['id']}:{reviews_hash(product)}",
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {
            "messages": [{"role": "user", "content": content}],
            "max_tokens": 48,
            "temperature": 0,
            "repetition_penalty": 1.1,
        },
    }


def parse_highlights(text: str) -> list[str]:
    """At most three distinct highlights from the model's answer: its bullet lines, else its
    sentences; headings ("...:") and star counts echoed from the prompt are dropped."""
    lines = [re.sub(r"^\s*(?:[-*\u2022]|\d+[.)])\s*", "", line).strip() for line in text.splitlines()]
    bullets = [line for line in lines if line and not line.endswith(":")]
    if len(bullets) < 2:
        bullets = [
            s.strip() for s in re.split(r"(?<=[.!?])\s+", text) if s.strip() and not s.strip().endswith(":")
        ]
    out: list[str] = []
    for b in bullets:
        b = " ".join(re.sub(r"\s*\(\d stars?\)\s*$", "", b).split())[:120]
        if b and b.lower() not in {o.lower() for o in out}:
            out.append(b)
    return out[:MAX_HIGHLIGHTS]


def load_cache(path: Path = CACHE) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def load_highlights(path: Path = CACHE) -> dict[str, list[str]]:
    """Product id -> its highlights (what the shopping assistant's cards show)."""
    return {pid: entry["highlights"] for pid, entry in load_cache(path).items()}


def stale(products: list[dict], cache: dict) -> list[dict]:
    """The products without highlights for their current reviews."""
    return [p for p in products if cache.get(p["id"], {}).get("reviews_hash") != reviews_hash(p)]


@dataclass
class Refresh:
    products: int
    refreshed: int
    unchanged: int
    failed: int


def refresh(
    products: list[dict],
    spec,
    cache_path: Path = CACHE,
    work_dir: Path = WORK_DIR,
    backend: str = "local",
    replicas: int = 1,
    progress: bool = True,
) -> Refresh:
    """Summarize the reviews of every stale product with ``run-batch`` and update the cache."""
    from neuronserve.distributed.batch import run_batch

    cache = load_cache(cache_path)
    todo = stale(products, cache)
    if not todo:
        return Refresh(len(products), 0, len(products), 0)
    work_dir.mkdir(parents=True, exist_ok=True)
    requests, results = work_dir / "requests.jsonl", work_dir / "results.jsonl"
    requests.write_text("".join(json.dumps(request_line(p)) + "\n" for p in todo))
    run_batch(requests, results, spec, backend=backend, replicas=replicas, progress=progress)
    by_id = {p["id"]: p for p in products}
    refreshed = failed = 0
    for line in results.read_text().splitlines():
        record = json.loads(line)
        product_id, _, digest = (record.get("custom_id") or "").partition(":")
        response = record.get("response") or {}
        product = by_id.get(product_id)
        if product is None or digest != reviews_hash(product):
            continue  # a result for reviews that have changed since
        if response.get("status_code") != 200:
            failed += 1
            continue
        text = response["body"]["choices"][0]["message"]["content"]
        cache[product_id] = {"reviews_hash": digest, "highlights": parse_highlights(text)}
        refreshed += 1
    cache_path.write_text(json.dumps(dict(sorted(cache.items())), indent=1, ensure_ascii=False) + "\n")
    requests.unlink()
    results.unlink()
    return Refresh(len(products), refreshed, len(products) - len(todo), failed)
