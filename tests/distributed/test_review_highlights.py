"""The review-highlights example: one batch job for stale products, cached by the reviews' hash,
shown on the shopping assistant's cards."""

from __future__ import annotations

import copy
import json

from examples.review_highlights.__main__ import main
from examples.review_highlights.highlights import load_highlights, parse_highlights, refresh, reviews_hash
from examples.shopping_assistant.app import card
from examples.shopping_assistant.retrieval import load_catalog


def test_parse_highlights():
    assert parse_highlights("- Comfortable fit\n- Runs small\n* Great value\n- extra") == [
        "Comfortable fit",
        "Runs small",
        "Great value",
    ]
    echoed = "Customer reviews of the X:\n- Quiet (5 stars)\n- Quiet (5 stars)\n- Loud at night (2 stars)"
    assert parse_highlights(echoed) == ["Quiet", "Loud at night"]
    assert parse_highlights("Customers love it. Some find it heavy.") == [
        "Customers love it.",
        "Some find it heavy.",
    ]


def test_only_products_whose_reviews_changed_are_refreshed(tiny_spec, tmp_path):
    products = copy.deepcopy(load_catalog()[:4])
    cache, work = tmp_path / "highlights.json", tmp_path / "work"
    first = refresh(products, tiny_spec, cache, work, progress=False)
    assert (first.refreshed, first.unchanged, first.failed) == (4, 0, 0)
    highlights = load_highlights(cache)
    # (a random tiny model may answer nothing readable; SmolLM2's highlights are in highlights.json)
    assert set(highlights) == {p["id"] for p in products}
    assert not work.joinpath("results.jsonl").exists()

    assert refresh(products, tiny_spec, cache, work, progress=False).refreshed == 0
    products[2]["reviews"].append({"stars": 1, "text": "Broke after a week."})
    again = refresh(products, tiny_spec, cache, work, progress=False)
    assert (again.refreshed, again.unchanged) == (1, 3)
    cached = {pid: e["reviews_hash"] for pid, e in json.loads(cache.read_text()).items()}
    assert cached[products[2]["id"]] == reviews_hash(products[2])
    assert card(products[0], load_highlights(cache))["highlights"] == highlights[products[0]["id"]]


def test_runs_from_one_command(tiny_model_dir, tmp_path):
    args = ["--model", tiny_model_dir, "--limit", "3", "--no-progress"]
    assert main([*args, "--cache", str(tmp_path / "h.json"), "--work-dir", str(tmp_path / "w")]) == 0
    assert len(load_highlights(tmp_path / "h.json")) == 3
