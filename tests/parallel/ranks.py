"""Run a function on N spawned ranks joined by a gloo group; the functions they run live here
(spawned processes import them by name)."""

from __future__ import annotations

import io
import multiprocessing as mp
import queue
import traceback

import torch

from neuronserve.backends.inputs import SeqChunk, build_step_inputs
from neuronserve.parallel.group import TPGroup


def run_ranks(fn, tp: int, *args, timeout_s: float = 180.0) -> list:
    """``fn(group, *args)`` on ranks ``0..tp-1``; returns each rank's result, in rank order."""
    from neuronserve.parallel.group import open_store

    ctx = mp.get_context("spawn")
    store = open_store(tp, timeout_s=60)
    results = ctx.Queue()
    procs = [
        ctx.Process(target=_rank_main, args=(fn, rank, tp, store.port, results, args)) for rank in range(tp)
    ]
    for p in procs:
        p.start()
    out: dict[int, object] = {}
    try:
        while len(out) < tp:
            rank, ok, value = results.get(timeout=timeout_s)
            if not ok:
                raise AssertionError(f"rank {rank} failed:\n{value}")
            out[rank] = torch.load(io.BytesIO(value), weights_only=False)
    except queue.Empty:
        raise AssertionError(
            f"ranks {sorted(set(range(tp)) - set(out))} gave no result in {timeout_s} s"
        ) from None
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    return [out[r] for r in range(tp)]


def _rank_main(fn, rank, tp, port, results, args):
    from neuronserve.parallel.group import GlooGroup

    torch.set_num_threads(1)
    try:
        group = GlooGroup(rank, tp, port=port, timeout_s=60)
        # As bytes: a tensor put on a queue as is is shared through a file descriptor that
        # disappears when this process exits, possibly before rank 0's reader takes it.
        buffer = io.BytesIO()
        torch.save(fn(group, *args), buffer)
        results.put((rank, True, buffer.getvalue()))
    except BaseException:
        results.put((rank, False, traceback.format_exc()))


# ------------------------------------------------------------------ what the ranks run
BLOCK_SIZE = 4

# A schedule that mixes everything one step can hold: a chunked prefill, a prefill beside the
# second chunk, decodes, and decodes beside a new prefill. (token ids, start position, block table)
SCHEDULE = [
    [([5, 17, 3, 99], 0, [1, 2])],
    [([42, 8, 150], 4, [1, 2]), ([7, 7, 200, 1, 64], 0, [3, 4])],
    [([11], 7, [1, 2]), ([23], 5, [3, 4])],
    [([12], 8, [1, 2, 5]), ([31, 32, 33, 34, 35, 36], 0, [6, 7]), ([24], 6, [3, 4])],
    [([13], 9, [1, 2, 5]), ([37], 6, [6, 7]), ([25], 7, [3, 4])],
]


@torch.inference_mode()
def model_logits(group: TPGroup, model_dir: str) -> dict:
    """Load this rank's shard, run ``SCHEDULE`` twice — through the CPU runner (eager attention
    plan, transposed layout) and through the bare forward padded to fixed shapes (the traced and
    Neuron path) — and return both logits and the shapes of every shard."""
    from neuronserve.backends.cpu import CPUModelRunner
    from neuronserve.config import CacheConfig, SchedulerConfig
    from neuronserve.model.loader import load_model

    model, config, _ = load_model(model_dir, tp_group=group)
    shapes = {name: tuple(p.shape) for name, p in model.named_parameters()}
    shapes["kv_cache"] = model.kv_cache_shape(8, BLOCK_SIZE)
    padded_kv = torch.zeros(model.kv_cache_shape(8, BLOCK_SIZE))
    padded = []
    for step in SCHEDULE:
        chunks = [SeqChunk(*c) for c in step]
        inputs = build_step_inputs(chunks, BLOCK_SIZE, num_tokens=16, num_seqs=4, max_blocks=4)
        padded.append(model(*inputs.as_args(), padded_kv)[0][: len(chunks)].clone())
    runner = CPUModelRunner(
        model, config, CacheConfig(block_size=BLOCK_SIZE, num_blocks=8), SchedulerConfig(max_num_seqs=4)
    )
    eager = [runner.run_chunks([SeqChunk(*c) for c in step]).clone() for step in SCHEDULE]
    return {"eager": eager, "padded": padded, "shapes": shapes}


@torch.inference_mode()
def quantized_logits(group: TPGroup, model_dir: str) -> list[torch.Tensor]:
    """``SCHEDULE`` through the CPU runner with int8 weights and an int8 KV cache (its scales
    calibrated on every rank at once, meeting at the collectives)."""
    from neuronserve.backends.cpu import CPUModelRunner
    from neuronserve.config import CacheConfig, SchedulerConfig
    from neuronserve.model.loader import load_model
    from neuronserve.quant import quantize_model
    from neuronserve.quant.kv import calibrate_kv_scales

    model, config, _ = load_model(model_dir, tp_group=group)
    quantize_model(model, "int8")
    calibrate_kv_scales(model, list(range(3, 60)), torch.int8, block_size=BLOCK_SIZE)
    cache = CacheConfig(block_size=BLOCK_SIZE, num_blocks=8, cache_dtype="int8")
    runner = CPUModelRunner(model, config, cache, SchedulerConfig(max_num_seqs=4))
    return [runner.run_chunks([SeqChunk(*c) for c in step]).clone() for step in SCHEDULE]
