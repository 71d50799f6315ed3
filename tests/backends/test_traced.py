"""cpu-traced: one exported graph per bucket, the eager backend's logits within 1e-5 for every
bucket (prefill, decode, mixed), and an artifact cache that compiles each graph once."""

import copy
import json

import pytest
import torch

from neuronserve.backends.cpu import CPUModelRunner
from neuronserve.backends.inputs import SeqChunk
from neuronserve.backends.traced import CPUTracedRunner
from neuronserve.config import CacheConfig, CompileConfig, SchedulerConfig
from tests.model.conftest import make_pair

SCHED = SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=16, max_model_len=64, token_buckets=(8, 16))
CACHE = CacheConfig(block_size=4, num_blocks=40)


def _compile(tmp_path) -> CompileConfig:
    return CompileConfig(context_buckets=(16,), artifact_cache=str(tmp_path), progress=False)


@pytest.fixture(scope="module")
def model():
    # One layer: what these tests check (buckets, keys, the artifact cache) does not depend on depth,
    # and exporting a graph costs time per layer.
    return make_pair("gqa-9-3-llama3", num_layers=1)[1]


# Steps that, between them, land in every bucket: (tokens <= 8 | <= 16) x (context <= 16 | <= 64).
SCHEDULE = [
    [([5, 17, 3, 99, 4], 0, [1, 2])],  # prefill: t8, k4
    [([42, 8, 150, 9, 9, 9, 9, 9, 9, 9], 5, [1, 2, 3, 4]), ([7, 7, 200], 0, [5])],  # mixed prefills: t16, k4
    [([11], 15, [1, 2, 3, 4]), ([23], 3, [5])],  # decodes: t8, k4
    [(list(range(30, 42)), 16, [1, 2, 3, 4, 6, 7, 8]), ([24], 4, [5, 9])],  # long context: t16, k16
    [([12], 28, [1, 2, 3, 4, 6, 7, 8, 10]), ([25], 5, [5, 9])],  # decodes past 16: t8, k16
]


def test_every_bucket_matches_eager_with_one_graph_each(model, tmp_path):
    traced = CPUTracedRunner(copy.deepcopy(model), model.config, CACHE, SCHED, _compile(tmp_path))
    eager = CPUModelRunner(copy.deepcopy(model), model.config, CACHE, SCHED)
    assert len(traced.buckets) == 4 and len(traced.graphs) == 4 and traced.compiled == traced.buckets
    assert len({id(g) for g in traced.graphs.values()}) == 4  # distinct programs
    for step in SCHEDULE:
        chunks = [SeqChunk(*c) for c in step]
        torch.testing.assert_close(traced.run_chunks(chunks), eager.run_chunks(chunks), atol=1e-5, rtol=0)
    assert set(traced.calls) == set(traced.buckets)  # each bucket's graph ran
    # the same cache, but the pad block 0, which only padded steps write to
    torch.testing.assert_close(traced.kv_cache[:, :, 1:], eager.kv_cache[:, :, 1:], atol=1e-5, rtol=0)


def test_a_second_start_compiles_nothing_and_bad_files_are_rebuilt(model, tmp_path):
    first = CPUTracedRunner(copy.deepcopy(model), model.config, CACHE, SCHED, _compile(tmp_path))
    assert len(first.compiled) == 4
    again = CPUTracedRunner(copy.deepcopy(model), model.config, CACHE, SCHED, _compile(tmp_path))
    assert again.compiled == []
    root = tmp_path / first.cache.key
    manifest = json.loads((root / "manifest.json").read_text())
    corrupt, missing = first.buckets[0], first.buckets[1]
    path = root / manifest["files"][corrupt.name]["file"]
    path.write_bytes(path.read_bytes()[:-10] + b"0123456789")  # same size, wrong bytes
    (root / manifest["files"][missing.name]["file"]).unlink()
    third = CPUTracedRunner(copy.deepcopy(model), model.config, CACHE, SCHED, _compile(tmp_path))
    assert third.compiled == [corrupt, missing]
    chunks = [SeqChunk(*c) for c in SCHEDULE[0]]
    torch.testing.assert_close(third.run_chunks(chunks), first.run_chunks(chunks), atol=1e-6, rtol=0)


def test_the_key_changes_with_what_changes_a_graph(model, tmp_path, monkeypatch):
    # Only the keys matter here: stand-in graphs instead of exporting every bucket of four runners.
    monkeypatch.setattr(CPUTracedRunner, "compile_bucket", lambda self, bucket: bucket.name.encode())
    monkeypatch.setattr(CPUTracedRunner, "load_graph", lambda self, data: data)
    base = CPUTracedRunner(copy.deepcopy(model), model.config, CACHE, SCHED, _compile(tmp_path))
    other_weights = copy.deepcopy(model)
    with torch.no_grad():
        other_weights.norm.weight.add_(1)
    keys = {
        base.cache.key,
        CPUTracedRunner(other_weights, model.config, CACHE, SCHED, _compile(tmp_path)).cache.key,
        CPUTracedRunner(
            copy.deepcopy(model),
            model.config,
            CacheConfig(block_size=4, num_blocks=41),
            SCHED,
            _compile(tmp_path),
        ).cache.key,
        CPUTracedRunner(
            copy.deepcopy(model),
            model.config,
            CACHE,
            SCHED,
            CompileConfig(context_buckets=(32,), artifact_cache=str(tmp_path), progress=False),
        ).cache.key,
    }
    assert len(keys) == 4


def test_an_artifact_holds_the_graph_not_the_weights(model, tmp_path):
    runner = CPUTracedRunner(copy.deepcopy(model), model.config, CACHE, SCHED, _compile(tmp_path))
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    sizes = [f["bytes"] for f in runner.cache.manifest()["files"].values()]
    assert max(sizes) < weight_bytes / 2, (sizes, weight_bytes)


def test_tensor_parallel_is_refused_with_the_alternative(tmp_path):
    from neuronserve.model.llama import LlamaForCausalLM
    from tests.parallel.test_layers import RankOf

    _, one = make_pair("gqa-9-3-llama3")
    sharded = LlamaForCausalLM(one.config, RankOf(0, 2))
    with pytest.raises(ValueError, match="cpu-traced runs at TP 1"):
        CPUTracedRunner(sharded, one.config, CACHE, SCHED, _compile(tmp_path))


def test_the_compile_command_builds_then_reuses_every_graph(tmp_path, capsys):
    from neuronserve.cli import main

    hf, _ = make_pair("mqa-7-1")
    hf.save_pretrained(tmp_path / "model")
    cache = str(tmp_path / "cache")
    argv = ["compile", "--model", str(tmp_path / "model"), "--buckets", "8,16", "--context-buckets", "16",
            "--max-model-len", "32", "--max-num-seqs", "4", "--artifact-cache", cache]  # fmt: skip
    assert main(argv) == 0
    first = capsys.readouterr().out
    assert "4 graphs (4 compiled, 0 from the cache)" in first and "t16-b4-k2" in first
    assert main(argv) == 0
    assert "4 graphs (0 compiled, 4 from the cache)" in capsys.readouterr().out
    assert main([*argv, "--backend", "cpu"]) == 2
    assert "backend: cpu compiles nothing" in capsys.readouterr().err


def test_speculative_steps_keep_one_graph_per_bucket_with_fixed_logit_rows(model, tmp_path):
    """With k = 2 each bucket returns min(T, B * 3) logit rows: a decode verifying two drafts next
    to a plain decode and a prefill chunk matches eager, and no graph was added."""
    import dataclasses

    sched = dataclasses.replace(SCHED, num_speculative_tokens=2)
    traced = CPUTracedRunner(copy.deepcopy(model), model.config, CACHE, sched, _compile(tmp_path))
    eager = CPUModelRunner(copy.deepcopy(model), model.config, CACHE, sched)
    assert len(traced.graphs) == 4 and {b.logit_rows for b in traced.buckets} == {8, 12}
    prefill = [SeqChunk([5, 17, 3, 99, 4, 6], 0, [1, 2]), SeqChunk([7, 7, 200, 8], 0, [5])]
    spec = [SeqChunk([9, 41, 42], 6, [1, 2, 3], 3), SeqChunk([11], 4, [5, 9]), SeqChunk([1, 2, 3], 0, [6])]
    for chunks in (prefill, spec):
        logits = traced.run_chunks(chunks)
        assert logits.shape[0] == sum(c.num_logits for c in chunks)
        torch.testing.assert_close(logits, eager.run_chunks(chunks), atol=1e-5, rtol=0)
