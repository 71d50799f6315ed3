"""A draft model as proposer: a smaller model with the same tokenizer drafts ``k`` tokens one at a
time, on its own paged KV cache with its own blocks (a ``BlockManager`` of its own, no prefix
caching), batched across the requests that draft.

Per request the draft keeps the tokens whose KV it holds. Before drafting it keeps the longest
prefix of them that the request's verified tokens still agree with, frees the blocks past it (the
rejected drafts' KV), computes the tokens it has not seen (the whole prompt at first, later the
accepted drafts and the target's token) and then drafts. Sampled drafts (temperature > 0) come
from the draft's own sampling distribution ``q``, kept for rejection sampling.

The draft runs on the eager ``cpu`` backend whatever the target's backend (its prompt catch-up is
an unbounded chunk, which a static bucket may not hold).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch

from neuronserve.backends.inputs import SeqChunk
from neuronserve.config import SpeculativeConfig
from neuronserve.core import BlockManager, Request
from neuronserve.engine.sampler import Sampler
from neuronserve.engine.spec.speculator import DraftRequest


class _DraftState:
    __slots__ = ("request", "token_ids")

    def __init__(self, request_id: str, token_ids: list[int]) -> None:
        self.request = Request(request_id, token_ids)  # block table + computed count, for the BlockManager
        self.token_ids: list[int] = []  # the tokens whose KV the draft cache holds, in order


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class DraftModelProposer:
    def __init__(self, runner, vocab_size: int) -> None:
        """``runner``: a ``ChunkModelRunner`` of the draft model with its own KV cache."""
        self.runner = runner
        cache = runner.cache_config
        self.block_manager = BlockManager(cache.num_blocks, cache.block_size, enable_prefix_caching=False)
        self.vocab_size = vocab_size
        self._states: dict[str, _DraftState] = {}
        self._probs: dict[str, torch.Tensor] = {}

    @classmethod
    def load(cls, config: SpeculativeConfig, target, target_config, target_tokenizer) -> DraftModelProposer:
        """Load ``config.model`` like the target (``target``: its ``ModelSpec``), on the cpu backend,
        with a KV cache as large as the target's scheduler limits need."""
        from neuronserve.backends.build import ModelSpec, build_rank

        spec = ModelSpec(
            model=config.model,
            backend="cpu",
            dtype=target.dtype,
            quantization=target.quantization,
            modules_to_not_convert=target.modules_to_not_convert,
            scheduler_config=dataclasses.replace(target.scheduler_config, num_speculative_tokens=0),
            cache_config=target.cache_config,
            kv_cache_gb=target.kv_cache_gb or 0.5,
            kernels=target.kernels,
        )
        built = build_rank(spec)
        if built.model_config.vocab_size != target_config.vocab_size:
            raise ValueError(
                f"speculative_config.model: the draft's vocabulary ({built.model_config.vocab_size} tokens) "
                f"differs from the target's ({target_config.vocab_size}); it needs the same tokenizer"
            )
        return cls(built.runner, target_config.vocab_size)

    def propose(self, requests: Sequence[DraftRequest], k: int) -> list[list[int]]:
        states = [self._catch_up(r) for r in requests]
        live = [i for i, s in enumerate(states) if s is not None]
        chunks = {i: requests[i].token_ids[len(states[i].token_ids) :] for i in live}
        drafts: dict[int, list[int]] = {i: [] for i in live}
        probs: dict[int, list[torch.Tensor]] = {i: [] for i in live}
        for step in range(k):
            if step:  # the last draft's KV is computed now, after the first draft step's catch-up
                chunks = {i: [drafts[i][-1]] for i in live}
            live = [i for i in live if self.block_manager.allocate(states[i].request, len(chunks[i]))]
            if not live:
                break
            seq = [SeqChunk(chunks[i], len(states[i].token_ids), states[i].request.block_ids) for i in live]
            logits = self.runner.run_chunks(seq)
            for row, i in enumerate(live):
                state = states[i]
                state.token_ids += chunks[i]
                state.request.num_computed_tokens = len(state.token_ids)
                token, q = self._sample(logits[row], requests[i])
                drafts[i].append(token)
                if q is not None:
                    probs[i].append(q)
        out = []
        for i, r in enumerate(requests):
            d = drafts.get(i, [])
            self._probs.pop(r.request_id, None)
            if d and probs.get(i):
                self._probs[r.request_id] = torch.stack(probs[i])
            out.append(d)
        return out

    def _catch_up(self, r: DraftRequest) -> _DraftState | None:
        """The request's draft state, rolled back to what its verified tokens still agree with."""
        state = self._states.get(r.request_id)
        if state is None:
            state = self._states[r.request_id] = _DraftState(r.request_id, r.token_ids)
        keep = _common_prefix(state.token_ids, r.token_ids)
        keep = min(keep, len(r.token_ids) - 1)  # the last token is always fed, for its logits
        del state.token_ids[keep:]
        state.request.num_computed_tokens = keep
        self.block_manager.trim(state.request, keep)
        return state

    def _sample(self, logits: torch.Tensor, r: DraftRequest) -> tuple[int, torch.Tensor | None]:
        if r.params.greedy:
            return int(logits.argmax()), None
        q = Sampler._probs([r.params], logits[None])[0]
        return int(torch.multinomial(q, 1, generator=r.generator)), q

    def draft_probs(self, request_id: str) -> torch.Tensor | None:
        return self._probs.get(request_id)

    def release(self, request_id: str) -> None:
        state = self._states.pop(request_id, None)
        self._probs.pop(request_id, None)
        if state is not None:
            self.block_manager.free(state.request)
