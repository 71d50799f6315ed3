import json
import statistics

import pytest

from neuronserve.bench import workloads
from neuronserve.bench.arrivals import arrival_times


def test_arrivals_have_the_asked_rate_and_burstiness():
    for burstiness in (0.5, 1.0, 4.0):
        times = arrival_times(20000, request_rate=5.0, burstiness=burstiness, seed=1)
        gaps = [b - a for a, b in zip(times, times[1:])]
        mean = statistics.fmean(gaps)
        cv2 = statistics.pvariance(gaps) / mean**2  # gamma(k): squared coefficient of variation = 1/k
        assert mean == pytest.approx(0.2, rel=0.03)
        assert cv2 == pytest.approx(1 / burstiness, rel=0.08)
    assert arrival_times(3, float("inf")) == [0.0, 0.0, 0.0]
    assert arrival_times(5, 2.0, seed=7) == arrival_times(5, 2.0, seed=7)
    with pytest.raises(ValueError, match="^request_rate"):
        arrival_times(3, 0)
    with pytest.raises(ValueError, match="^burstiness"):
        arrival_times(3, 1.0, burstiness=0)


def test_shopping_requests_share_a_prefix_and_cite_catalog_products():
    specs = workloads.shopping(20, output_len=64, seed=3)
    assert specs == workloads.shopping(20, output_len=64, seed=3)  # deterministic
    catalog_ids = {p["id"] for p in workloads.load_catalog()}
    systems = {s.messages[0]["content"] for s in specs}
    assert len(systems) == 1 and "<product id=" in systems.pop()
    for s in specs:
        assert s.is_chat and s.max_tokens == 64
        user = s.messages[1]["content"]
        ids = [part.split('"')[0] for part in user.split('<product id="')[1:]]
        assert len(ids) == 3 and set(ids) <= catalog_ids and "Question: " in user
    assert len({s.messages[1]["content"] for s in specs}) > 10


def test_fixed_and_random_lengths_in_tokens(tokenizer):
    for spec in workloads.fixed(5, input_len=40, output_len=7, tokenizer=tokenizer):
        assert len(tokenizer.encode(spec.prompt, add_special_tokens=False)) == pytest.approx(40, abs=2)
        assert spec.max_tokens == 7
    specs = workloads.random_lengths(50, (10, 20), (3, 9), seed=2)
    assert all(10 <= s.prompt_len <= 20 and 3 <= s.max_tokens <= 9 for s in specs)
    assert len({s.max_tokens for s in specs}) > 3
    with pytest.raises(ValueError, match="^input_range"):
        workloads.random_lengths(2, (5, 1), (1, 1))


def test_jsonl(tmp_path):
    path = tmp_path / "p.jsonl"
    lines = [{"prompt": "hi", "max_tokens": 5}, {"messages": [{"role": "user", "content": "yo"}]}]
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    specs = workloads.jsonl(path, default_max_tokens=9)
    assert [(s.prompt, s.is_chat, s.max_tokens) for s in specs] == [("hi", False, 5), (None, True, 9)]
    path.write_text('{"prompt": "a"}\n{oops\n')
    with pytest.raises(ValueError, match=r"p\.jsonl:2: not JSON"):
        workloads.jsonl(path)
    path.write_text('{"text": "a"}\n')
    with pytest.raises(ValueError, match=r"p\.jsonl:1: expected an object"):
        workloads.jsonl(path)
