"""The artifact cache on a real S3 API (moto's server on localhost): upload after compile,
download on a cold start, a corrupted object caught by its hash and rebuilt, and an object the
manifest does not list (an upload cut short before its manifest) never used."""

import copy
import json
import socket

import boto3
import pytest
import torch
from moto.server import ThreadedMotoServer

from neuronserve.backends.inputs import SeqChunk
from neuronserve.backends.traced import CPUTracedRunner
from neuronserve.config import CacheConfig, CompileConfig, SchedulerConfig
from tests.model.conftest import make_pair

SCHED = SchedulerConfig(max_num_seqs=2, max_num_batched_tokens=8, max_model_len=32, token_buckets=(4, 8))
CACHE = CacheConfig(block_size=4, num_blocks=16)
URL = "s3://neuronserve-artifacts/compiled/smoke"


@pytest.fixture(scope="module")
def s3():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        client = boto3.client("s3")
        client.create_bucket(Bucket="neuronserve-artifacts")
        yield client
    server.stop()


def _runner(model):
    return CPUTracedRunner(
        copy.deepcopy(model),
        model.config,
        CACHE,
        SCHED,
        CompileConfig(context_buckets=(8,), artifact_cache=URL, progress=False),
    )


def _objects(client, key):
    listing = client.list_objects_v2(Bucket="neuronserve-artifacts", Prefix=f"compiled/smoke/{key}/")
    return sorted(o["Key"].rsplit("/", 1)[1] for o in listing.get("Contents", []))


def test_s3_cache_round_trip_corruption_and_unlisted_objects(s3):
    _, model = make_pair("mha-5-tied", num_layers=1)
    first = _runner(model)
    key, names = first.cache.key, [b.name for b in first.buckets]
    assert first.compiled == first.buckets
    assert _objects(s3, key) == sorted(["manifest.json", *(f"{n}.pt2" for n in names)])  # uploaded

    cold = _runner(model)  # a cold start: every graph downloaded and verified, none compiled
    assert cold.compiled == []
    chunks = [SeqChunk([3, 4, 5], 0, [1])]
    torch.testing.assert_close(cold.run_chunks(chunks), first.run_chunks(chunks), atol=1e-6, rtol=0)

    # Corrupt one object in place: caught by its sha256, rebuilt and uploaded again.
    victim = f"compiled/smoke/{key}/{names[0]}.pt2"
    body = s3.get_object(Bucket="neuronserve-artifacts", Key=victim)["Body"].read()
    s3.put_object(Bucket="neuronserve-artifacts", Key=victim, Body=body[: len(body) // 2])
    rebuilt = _runner(model)
    assert [b.name for b in rebuilt.compiled] == [names[0]]
    assert s3.get_object(Bucket="neuronserve-artifacts", Key=victim)["Body"].read() == body
    assert _runner(model).compiled == []

    # An object the manifest does not list (written, then the upload stopped before the manifest
    # named it) is never loaded, even if it sits where the bucket's file would be.
    manifest_key = f"compiled/smoke/{key}/manifest.json"
    manifest = json.loads(s3.get_object(Bucket="neuronserve-artifacts", Key=manifest_key)["Body"].read())
    del manifest["files"][names[1]]
    s3.put_object(Bucket="neuronserve-artifacts", Key=manifest_key, Body=json.dumps(manifest).encode())
    s3.put_object(
        Bucket="neuronserve-artifacts", Key=f"compiled/smoke/{key}/{names[1]}.pt2", Body=b"half an upl"
    )
    resumed = _runner(model)
    assert [b.name for b in resumed.compiled] == [names[1]]
    torch.testing.assert_close(resumed.run_chunks(chunks), first.run_chunks(chunks), atol=1e-6, rtol=0)


def test_a_compile_that_dies_keeps_the_finished_graphs(s3, monkeypatch):
    _, model = make_pair("mqa-7-1", num_layers=1)
    calls = []
    real = CPUTracedRunner.compile_bucket

    def dies_on_the_third(self, bucket):
        calls.append(bucket)
        if len(calls) == 3:
            raise RuntimeError("compiler crashed")
        return real(self, bucket)

    monkeypatch.setattr(CPUTracedRunner, "compile_bucket", dies_on_the_third)
    with pytest.raises(RuntimeError, match="compiler crashed"):
        _runner(model)
    monkeypatch.setattr(CPUTracedRunner, "compile_bucket", real)
    again = _runner(model)
    assert again.compiled == again.buckets[2:]  # the two finished graphs came from S3
