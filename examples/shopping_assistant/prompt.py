"""The assistant's prompt: one shared system prompt (every question starts with the same tokens,
so the prefix cache serves it after the first), then the retrieved products, then the question."""

from __future__ import annotations

SYSTEM_PROMPT = (
    "You are the shopping assistant of an online store. Answer the customer's question in two or "
    "three short sentences, using only the products listed in the message, their prices, ratings, "
    "features, reviews and Q&A. Recommend one product when you can and name it exactly as listed. "
    'Cite each product you mention with its tag, for example <product id="B0123456789"/>, right '
    "after its name. Never invent products, prices or features."
)


def short_name(product: dict) -> str:
    """The name without the category word ("Vortex Pro 340" for "Vortex Pro 340 Blender"): what
    a reply most often repeats."""
    return product["title"].rsplit(" ", 1)[0]


def snippet(p: dict) -> str:
    reviews = " ".join(f'"{r["text"]}" ({r["stars"]}/5)' for r in p["reviews"])
    qa = " ".join(f"Q: {x['q']} A: {x['a']}" for x in p.get("qa", []))
    return (
        f'<product id="{p["id"]}"/> {p["title"]}: ${p["price_usd"]:.2f}, rated {p["rating"]}/5. '
        f"Features: {', '.join(p['features'])}. Reviews: {reviews} {qa}"
    )


def build_messages(question: str, products: list[dict]) -> list[dict]:
    listing = "\n".join(snippet(p) for p in products) or "(no matching products)"
    return [
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": f"Products:\n{listing}\n\nQuestion: {question}"},
    ]
