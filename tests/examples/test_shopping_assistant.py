"""The shopping assistant: retrieval finds the product asked about, the shared system prompt hits
the prefix cache, and in a real headless Chromium the answer streams in with a product card shown
before it ends and no raw tag text on the page."""

from __future__ import annotations

import shutil
import time

import httpx
import pytest

from examples.shopping_assistant.prompt import SYSTEM_PROMPT, build_messages, short_name
from examples.shopping_assistant.retrieval import Retriever, load_catalog
from neuronserve.model.loader import DEFAULT_MODEL

CATALOG = load_catalog()


def test_the_catalog_is_a_few_hundred_distinct_products_with_reviews_and_qa():
    assert len(CATALOG) == 288 and len({p["title"] for p in CATALOG}) == 288
    assert all(len(p["reviews"]) == 3 and len(p["qa"]) == 2 for p in CATALOG)


@pytest.mark.parametrize("index", [0, 41, 97, 150, 233, 287])
def test_the_expected_product_is_in_the_top_3(index):
    retriever = Retriever(CATALOG)
    product = CATALOG[index]
    by_name = retriever.search(f"Tell me about the {short_name(product)}")
    assert product["id"] in [p["id"] for p in by_name]
    # by what it has: its category and two of its features (a pair that names it among its kind)
    question = f"a {product['category']} with {product['features'][0]} and {product['features'][1]}"
    found = [p["id"] for p in retriever.search(question)]
    rivals = [
        p
        for p in CATALOG
        if p["category"] == product["category"] and set(product["features"][:2]) <= set(p["features"])
    ]
    assert product["id"] in found or len(rivals) > 3, (question, found)


def test_the_prompt_shares_its_system_prompt_and_cites_ids():
    products = CATALOG[:3]
    messages = build_messages("Which is best?", products)
    assert messages[0] == {"role": "system", "content": SYSTEM_PROMPT}
    assert all(f'<product id="{p["id"]}"/>' in messages[1]["content"] for p in products)


def _prefix_hits(url: str) -> float:
    text = httpx.get(f"{url}/metrics").text
    line = next(line for line in text.splitlines() if line.startswith("neuronserve:prefix_cache_hits_total"))
    return float(line.split()[-1])


def test_the_shared_system_prompt_hits_the_prefix_cache(shop):
    hits = []
    for question in ("Which blender crushes ice?", "Is there a quiet robot vacuum for pet hair?"):
        found = httpx.get(f"{shop.url}/api/search", params={"q": question}).json()
        body = {"model": DEFAULT_MODEL, "messages": found["messages"], "max_tokens": 4, "temperature": 0}
        assert httpx.post(f"{shop.url}/v1/chat/completions", json=body, timeout=120).status_code == 200
        hits.append(_prefix_hits(shop.url))
    # The second question reuses at least the system prompt's full blocks from the first.
    assert hits[1] - hits[0] >= 16 * 4, hits


def test_search_rejects_an_empty_query(shop):
    response = httpx.get(f"{shop.url}/api/search", params={"q": ""})
    assert response.status_code == 400 and "q" in response.text


# ------------------------------------------------------------------ the browser
def _chromium() -> tuple[str, str]:
    """Debian's chromium and chromium-driver, installed by `make browser` (which `make test` runs)."""
    if not (shutil.which("chromium") and shutil.which("chromedriver")):
        pytest.skip("chromium and chromedriver are not installed: run `make browser` (apt-get, as root)")
    return shutil.which("chromium"), shutil.which("chromedriver")


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    binary, driver = _chromium()
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1000,900"):
        options.add_argument(flag)
    chrome = webdriver.Chrome(service=Service(driver), options=options)
    yield chrome
    chrome.quit()


def test_the_page_streams_an_answer_and_shows_a_card_before_it_ends(shop, browser, tmp_path):
    from selenium.webdriver.common.by import By

    browser.get(shop.url)
    browser.find_element(By.ID, "question").send_keys("Which blender is best for crushing ice?")
    browser.find_element(By.ID, "ask").click()
    lengths, deadline = [], time.monotonic() + 180
    while time.monotonic() < deadline:
        state = browser.execute_script("return window.assistant")
        lengths.append(len(browser.find_element(By.ID, "answer").text))
        if state["doneAt"] is not None or state["error"]:
            break
        time.sleep(0.05)
    shot = tmp_path / "shopping_assistant.png"
    browser.save_screenshot(str(shot))
    print(f"screenshot: {shot}")
    state = browser.execute_script("return window.assistant")
    assert state["error"] is None and state["doneAt"] is not None, state
    assert len(set(lengths)) > 3, "the answer did not stream in"  # it grew step by step
    cards = browser.find_elements(By.CSS_SELECTOR, "#answer .card")
    assert cards and state["cards"] == len(cards)
    assert state["firstCardAt"] < state["doneAt"]  # a card was on the page before the answer ended
    text = browser.find_element(By.ID, "answer").text
    html = browser.execute_script("return document.getElementById('answer').innerHTML")
    assert (
        "<product" not in text and "/>" not in text and "&lt;product" not in html and "<product" not in html
    )
    assert shot.stat().st_size > 10_000
