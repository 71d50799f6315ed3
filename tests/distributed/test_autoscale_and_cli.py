"""Autoscaling's target from the planner, and the CLI options that build replicas."""

from __future__ import annotations

import pytest

from neuronserve.cli import build_parser
from neuronserve.distributed.autoscale import PlanTarget, autoscaling_config, plan_target
from neuronserve.distributed.commands import engine_spec
from neuronserve.distributed.spec import ReplicaConfig


def test_target_is_littles_law_at_the_slo_rate():
    assert PlanTarget("inf2.xlarge", 2, rps_per_replica=2.0, mean_e2e_s=4.0).target_ongoing_requests == 8.0
    assert PlanTarget("inf2.xlarge", 2, rps_per_replica=0.1, mean_e2e_s=1.0).target_ongoing_requests == 1.0
    target = plan_target("llama-3-8b", "inf2.xlarge", 2, {"ttft": 1000, "tpot": 100}, num_prompts=40)
    assert target.rps_per_replica > 0 and target.mean_e2e_s > 0
    assert target.target_ongoing_requests == pytest.approx(target.rps_per_replica * target.mean_e2e_s)
    with pytest.raises(ValueError, match="slo"):
        plan_target("llama-3-8b", "inf2.xlarge", 2, {"ttft": 0.001}, num_prompts=20)


def test_autoscaling_config_for_ray_serve():
    config = autoscaling_config(1, 4, 13.3)
    assert config["min_replicas"] == 1 and config["max_replicas"] == 4
    assert config["target_ongoing_requests"] == 13.3 and config["initial_replicas"] == 1
    assert "target_ongoing_requests" not in autoscaling_config(0, 2)
    with pytest.raises(ValueError, match="autoscale"):
        autoscaling_config(3, 2)
    with pytest.raises(ValueError, match="target_ongoing_requests"):
        autoscaling_config(1, 2, 0)


def test_replica_config_names_bad_fields():
    assert ReplicaConfig(num_neuron_cores=2).ray_actor_options() == {
        "num_cpus": 1.0,
        "resources": {"neuron_cores": 2},
    }
    with pytest.raises(ValueError, match="num_replicas"):
        ReplicaConfig(num_replicas=0)
    with pytest.raises(ValueError, match="routing"):
        ReplicaConfig(routing="random")


def test_cli_builds_the_replicasengine_spec():
    args = build_parser().parse_args(
        [
            "serve",
            "--replicas",
            "2",
            "--routing",
            "round_robin",
            "--autoscale",
            "1:4",
            "--max-model-len",
            "512",
        ]
    )
    assert args.replicas == 2 and args.routing == "round_robin" and args.autoscale == "1:4"
    spec = engine_spec(args, max_num_seqs=4)
    assert spec.max_model_len == 512 and spec.max_num_seqs == 4 and spec.name == spec.model
    with pytest.raises(ValueError, match="buckets"):
        engine_spec(build_parser().parse_args(["serve", "--replicas", "2", "--buckets", "16,32"]))
    batch = build_parser().parse_args(["run-batch", "-i", "a.jsonl", "-o", "b.jsonl", "--replicas", "2"])
    assert batch.executor == "auto" and batch.replicas == 2
