"""The shopping assistant: a web page, catalog search and neuronserve's OpenAI-compatible API in
one server.

    python -m examples.shopping_assistant.app            # then open http://127.0.0.1:8080

``GET /`` is the page; ``GET /api/search?q=`` retrieves products and builds the chat messages;
the page then streams the answer from ``POST /v1/chat/completions`` (SSE, ``hold_markup`` on, so a
``<product id="…"/>`` tag never arrives split) and turns every tag into a product card the moment
it arrives. Since a 135M model does not follow the citation instruction reliably, the page also
inserts a product's card right after the first mention of its name (see ``static/index.html``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from fastapi import Query
from fastapi.responses import HTMLResponse

from examples.review_highlights.highlights import load_highlights
from examples.shopping_assistant.prompt import build_messages, short_name
from examples.shopping_assistant.retrieval import Retriever, load_catalog

PAGE = Path(__file__).with_name("static") / "index.html"


def card(p: dict, highlights: dict[str, list[str]] | None = None) -> dict:
    """What the page shows of a product; ``highlights``: review highlights by product id (made by
    ``python -m examples.review_highlights``), shown when the product has some."""
    return {
        "id": p["id"],
        "title": p["title"],
        "name": short_name(p),
        "price_usd": p["price_usd"],
        "rating": p["rating"],
        "category": p["category"],
        "highlights": (highlights or {}).get(p["id"], []),
    }


def create_shop_app(load_engine, model_name: str, products: list[dict] | None = None, top_k: int = 3):
    """neuronserve's OpenAI-compatible app (``load_engine`` runs at start-up) with the page and the
    search route added."""
    from neuronserve.server.app import create_app

    retriever = Retriever(products if products is not None else load_catalog())
    highlights = load_highlights()
    app = create_app(load_engine, model_name)

    @app.get("/", response_class=HTMLResponse)
    async def page() -> str:
        return PAGE.read_text().replace("__MODEL__", model_name)

    @app.get("/api/search")
    async def search(q: str = Query(..., min_length=1, max_length=500)) -> dict:
        found = retriever.search(q, k=top_k)
        return {"products": [card(p, highlights) for p in found], "messages": build_messages(q, found)}

    return app


def main() -> None:
    import uvicorn

    from neuronserve.config import SchedulerConfig
    from neuronserve.engine.engine import Engine
    from neuronserve.model.loader import DEFAULT_MODEL

    parser = argparse.ArgumentParser(description="the shopping assistant demo")
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    args = parser.parse_args()

    def load_engine() -> Engine:
        return Engine.from_pretrained(
            args.model, scheduler_config=SchedulerConfig(max_num_seqs=16, max_model_len=2048), kv_cache_gb=0.5
        )

    print(f"shopping assistant on http://{args.host}:{args.port}")
    uvicorn.run(create_shop_app(load_engine, args.model), host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
