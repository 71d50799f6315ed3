"""BM25 retrieval over the catalog (``bm25s``): each product is one document of its name,
category, features, reviews and customer Q&A."""

from __future__ import annotations

import json
from pathlib import Path

CATALOG = Path(__file__).with_name("catalog.json")


def load_catalog(path: str | Path = CATALOG) -> list[dict]:
    return json.loads(Path(path).read_text())["products"]


def document(p: dict) -> str:
    reviews = " ".join(r["text"] for r in p["reviews"])
    qa = " ".join(f"{x['q']} {x['a']}" for x in p.get("qa", []))
    return f"{p['title']}. {p['category']}. {', '.join(p['features'])}. {reviews} {qa}"


class Retriever:
    def __init__(self, products: list[dict]) -> None:
        import bm25s

        self.products = products
        self._bm25s = bm25s
        self.index = bm25s.BM25()
        self.index.index(bm25s.tokenize([document(p) for p in products], stopwords="en", show_progress=False),
                         show_progress=False)  # fmt: skip

    def search(self, query: str, k: int = 3) -> list[dict]:
        """The ``k`` best products for ``query`` (fewer when fewer match any word)."""
        tokens = self._bm25s.tokenize([query], stopwords="en", show_progress=False)
        if not tokens.vocab:
            return []
        docs, scores = self.index.retrieve(tokens, k=min(k, len(self.products)), show_progress=False)
        return [self.products[int(d)] for d, s in zip(docs[0], scores[0]) if s > 0]
