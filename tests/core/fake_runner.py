"""A stand-in model runner for scheduler tests: it stores token ids as the "KV" of each slot and
reads every context back through the block table, so a wrong slot, a wrongly shared prefix block or
a stale block after preemption shows up as a context that differs from the request's tokens.

Draft tokens scheduled after a decode (``out.spec_token_ids``) are verified greedily against
``next_token``: the runner returns the accepted drafts and the next true token, as the engine does."""

from __future__ import annotations

from neuronserve.core import PAD_BLOCK_ID, SchedulerOutput

VOCAB = 97


def next_token(context: list[int]) -> int:
    """A deterministic 'model': the next token depends on the whole context."""
    h = 0
    for t in context:
        h = (h * 31 + t + 1) % 1_000_003
    return h % VOCAB


class FakeRunner:
    def __init__(self, block_size: int) -> None:
        self.block_size = block_size
        self.kv: dict[int, int] = {}  # slot -> token id written there
        self.computed: dict[str, list[int]] = {}  # request id -> token ids computed, in order

    def execute(self, out: SchedulerOutput) -> dict[str, int | list[int]]:
        bs = self.block_size
        sampled: dict[str, int | list[int]] = {}
        for i, request in enumerate(out.requests):
            slots, tokens = out.slot_mapping(i), out.token_ids(i)
            assert all(s // bs != PAD_BLOCK_ID for s in slots), "a real token wrote to the pad block"
            for slot, token in zip(slots, tokens):
                self.kv[slot] = token
            end = out.num_computed_tokens[i] + out.num_new_tokens[i]
            table = request.block_ids
            context = [self.kv.get(table[p // bs] * bs + p % bs) for p in range(end)]
            drafts = out.spec_token_ids.get(request.request_id, [])
            expected = request.token_ids_slice(0, end - len(drafts)) + drafts
            assert context == expected, f"{request.request_id}: bad KV context"
            self.computed.setdefault(request.request_id, []).extend(tokens)
            if drafts:
                sampled[request.request_id] = verify_greedily(context[: end - len(drafts)], drafts)
            elif out.samples(i):
                sampled[request.request_id] = next_token(context)
        return sampled


def verify_greedily(context: list[int], drafts: list[int]) -> list[int]:
    """The drafts that equal the model's next tokens, then the model's token after them."""
    emitted = []
    for draft in [*drafts, None]:
        emitted.append(next_token(context + emitted))
        if emitted[-1] != draft:
            break
    return emitted
