"""The planner's arithmetic on a case computed by hand, the capacity search, and the commands."""

import pytest

from neuronserve.bench.cost import price_per_hour
from neuronserve.cli import main
from neuronserve.sim.planner import Candidate, max_rate, plan


def test_a_plan_computed_by_hand():
    capacity = {("inf2.xlarge", 1): 1.5, ("inf2.48xlarge", 24): 30.0, ("inf2.24xlarge", 4): 0.0}
    rows = plan(
        [Candidate("inf2.48xlarge", 24), Candidate("inf2.xlarge", 1), Candidate("inf2.24xlarge", 4)],
        peak_rps=10,
        capacity=lambda c: capacity[(c.instance, c.tp)],
        price_per_hour=price_per_hour,
        mean_output_tokens=100,
    )
    # inf2.xlarge: 2 cores = 2 replicas of TP 1 at 1.5 req/s: ceil(10 / 1.5) = 7 replicas -> 4 instances
    # at $0.7582 = $3.0328/h; 10 req/s x 100 tokens = 1000 tok/s -> $3.0328 / 3.6M tokens.
    # inf2.48xlarge TP 24: one replica of 30 req/s -> 1 instance, $12.9813/h. inf2.24xlarge: no capacity.
    assert [(r.instance, r.tp, r.instances) for r in rows] == [
        ("inf2.xlarge", 1, 4),
        ("inf2.48xlarge", 24, 1),
    ]
    assert rows[0].replicas_per_instance == 2
    assert rows[0].cost_per_hour == pytest.approx(4 * 0.7582)
    assert rows[0].cost_per_million_output_tokens == pytest.approx(4 * 0.7582 / 3600 / 1000 * 1e6)
    assert rows[1].cost_per_hour == pytest.approx(12.9813)


def test_max_rate_finds_the_threshold():
    assert max_rate(lambda r: r <= 7.3, rel_tol=0.01) == pytest.approx(7.3, rel=0.02)
    assert max_rate(lambda r: r <= 0.2, rel_tol=0.01) == pytest.approx(0.2, rel=0.02)
    assert max_rate(lambda r: False) == 0.0


def test_simulate_and_plan_commands(tmp_path, capsys):
    assert main(["simulate", "--model", "llama-3-8b", "--instance", "inf2.48xlarge", "-tp", "24",
                 "--quantization", "int8", "--num-prompts", "20", "--request-rate", "2",
                 "--goodput", "ttft:1000", "tpot:50", "--out", str(tmp_path)]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "simulated (a prediction, not a measurement): llama-3-8b on inf2.48xlarge TP 24" in out
    assert (tmp_path / "simulate.json").exists()
    assert main(["plan", "--model", "llama-3.2-1b", "--peak-rps", "5", "--slo", "ttft:1000,tpot:50",
                 "--num-prompts", "20", "--instances", "inf2.xlarge,trn1.2xlarge"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "| instance | TP |" in out and "cheapest:" in out
