"""Metric code on synthetic timing traces, against hand-computed values."""

import math

import pytest

from neuronserve.bench.cost import add_costs, cost_per_million, instance_prices, price_per_hour
from neuronserve.bench.metrics import RequestRecord, parse_goodput, percentile, summarize


def trace() -> list[RequestRecord]:
    # Request A: sent at 0, chunks at 0.5, 0.6, 0.8, 1.0; 4 tokens; done at 1.0.
    a = RequestRecord(
        sent=0.0, ok=True, prompt_tokens=10, output_tokens=4, chunk_times=[0.5, 0.6, 0.8, 1.0], done=1.0
    )
    # Request B: sent at 1, chunks at 3 and 5 (2 tokens); done at 5.
    b = RequestRecord(sent=1.0, ok=True, prompt_tokens=20, output_tokens=2, chunk_times=[3.0, 5.0], done=5.0)
    # Request C failed: counted, not used in latency statistics.
    c = RequestRecord(sent=2.0, error="HTTP 500: boom", done=2.5)
    return [a, b, c]


def test_per_request_definitions():
    a, b, _ = trace()
    assert a.ttft == pytest.approx(0.5) and a.e2e == pytest.approx(1.0)
    assert a.tpot == pytest.approx((1.0 - 0.5) / 3)
    assert a.itls == pytest.approx([0.1, 0.2, 0.2])
    assert b.ttft == pytest.approx(2.0) and b.tpot == pytest.approx(2.0) and b.itls == pytest.approx([2.0])
    assert RequestRecord(sent=0, ok=True, output_tokens=1, chunk_times=[0.3], done=0.3).tpot is None


def test_summary_by_hand():
    s = summarize(trace(), duration=5.0)
    assert (s["completed"], s["failed"]) == (2, 1)
    assert (s["total_input_tokens"], s["total_output_tokens"]) == (30, 6)
    assert s["request_throughput"] == pytest.approx(0.4)
    assert s["output_throughput"] == pytest.approx(1.2)
    assert s["total_token_throughput"] == pytest.approx(7.2)
    assert s["mean_ttft_ms"] == pytest.approx(1250) and s["median_ttft_ms"] == pytest.approx(1250)
    assert s["std_ttft_ms"] == pytest.approx(750)  # population std of 500 and 2000
    assert s["p99_ttft_ms"] == pytest.approx(500 + 0.99 * 1500)
    assert s["mean_tpot_ms"] == pytest.approx((500 / 3 + 2000) / 2)
    # ITLs: 100, 200, 200, 2000 ms -> median 200, p90 = 200 + 0.7 * 1800
    assert s["median_itl_ms"] == pytest.approx(200) and s["p90_itl_ms"] == pytest.approx(1460)
    assert s["mean_e2el_ms"] == pytest.approx(2500)


def test_goodput_counts_requests_meeting_every_slo():
    slos = parse_goodput(["ttft:1000", "tpot:500"])
    assert slos == {"ttft": 1000.0, "tpot": 500.0}
    s = summarize(trace(), duration=5.0, slos=slos)
    assert s["request_goodput"] == pytest.approx(1 / 5)  # only A: B's TTFT is 2000 ms
    assert s["output_goodput"] == pytest.approx(4 / 5)
    assert summarize(trace(), 5.0, parse_goodput(["e2el:5000"]))["request_goodput"] == pytest.approx(2 / 5)
    for bad in (["speed:3"], ["ttft:fast"], ["ttft:-1"]):
        with pytest.raises(ValueError, match="^goodput: "):
            parse_goodput(bad)


def test_percentile_matches_linear_interpolation():
    assert percentile([1, 2, 3, 4], 50) == 2.5
    assert percentile([10], 99) == 10
    assert percentile([0, 10], 90) == pytest.approx(9)
    assert math.isnan(percentile([], 50))


def test_cost_per_million_tokens():
    # $0.7582/h at 100 tok/s: 360,000 tokens an hour -> $2.106 per million.
    assert cost_per_million(0.7582, 100) == pytest.approx(0.7582 / 0.36)
    assert cost_per_million(1.0, 0) == math.inf
    s = add_costs(summarize(trace(), 5.0, parse_goodput(["ttft:1000"])), price=3.6)
    assert s["cost_per_million_output_tokens"] == pytest.approx(3.6 / (3600 * 1.2) * 1e6)
    assert s["cost_per_million_total_tokens"] == pytest.approx(3.6 / (3600 * 7.2) * 1e6)
    assert s["cost_per_million_output_tokens_at_goodput"] == pytest.approx(3.6 / (3600 * 0.8) * 1e6)


def test_price_table_has_every_instance_with_a_source():
    table = instance_prices()["instances"]
    expected = {"inf2.xlarge", "inf2.8xlarge", "inf2.24xlarge", "inf2.48xlarge"}
    expected |= {"trn1.2xlarge", "trn1.32xlarge", "trn2.48xlarge"}
    assert set(table) == expected
    for entry in table.values():
        assert entry["on_demand"] > 0 and entry["source"].startswith("https://") and entry["as_of"]
        assert entry["reserved_1yr"] is None or 0 < entry["reserved_1yr"] < entry["on_demand"]
    assert price_per_hour("inf2.xlarge") == table["inf2.xlarge"]["on_demand"]
    assert price_per_hour("inf2.xlarge", "reserved_1yr") == table["inf2.xlarge"]["reserved_1yr"]
    with pytest.raises(ValueError, match="^instance: unknown 'p5.48xlarge'"):
        price_per_hour("p5.48xlarge")
    with pytest.raises(ValueError, match="no reserved_1yr price for trn2.48xlarge"):
        price_per_hour("trn2.48xlarge", "reserved_1yr")
