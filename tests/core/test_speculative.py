"""Draft tokens in the scheduler: scheduled after a decode's next token, accepted as a prefix,
rolled back (slots and blocks) otherwise; prefix-cache hashes only ever cover verified tokens.
The stateful test drives random add/abort/step sequences with random drafts under preemption."""

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import rule

from neuronserve.core import Request, RequestStatus
from tests.core.conftest import make_scheduler, req
from tests.core.fake_runner import FakeRunner, next_token
from tests.core.test_scheduler_stateful import SchedulerMachine


def _decoding(s, r: Request, runner: FakeRunner | None = None) -> None:
    """Run ``s`` until ``r`` has sampled its first token (it then decodes)."""
    runner = runner or FakeRunner(s.block_size)
    while not r.output_token_ids:
        out = s.schedule()
        s.update(out, runner.execute(out))


def true_continuation(r: Request, n: int) -> list[int]:
    tokens = list(r.all_token_ids)
    for _ in range(n):
        tokens.append(next_token(tokens))
    return tokens[r.num_tokens :]


def test_drafts_join_the_decode_and_accepted_ones_become_output():
    s = make_scheduler(num_speculative_tokens=3)
    r = req("a", n_prompt=6, max_tokens=10)
    s.add_request(r)
    runner = FakeRunner(s.block_size)
    _decoding(s, r, runner)
    r.spec_token_ids = true_continuation(r, 3)[:2] + [96]  # two right, one wrong
    out = s.schedule()
    assert out.num_new_tokens == [4] and out.spec_token_ids == {"a": r.spec_token_ids}
    assert out.token_ids(0) == [r.all_token_ids[-1], *r.spec_token_ids] and out.num_logits(0) == 4
    before = r.num_tokens
    s.update(out, runner.execute(out))
    assert r.num_tokens == before + 3  # two drafts + the corrected token
    assert r.num_computed_tokens == r.num_tokens - 1
    assert r.all_token_ids == r.prompt_token_ids + true_continuation(Request("x", r.prompt_token_ids), 4)
    s.block_manager.check_integrity()


def test_rejected_drafts_return_their_blocks_and_are_never_hashed():
    s = make_scheduler(block_size=4, num_speculative_tokens=8, max_num_batched_tokens=32)
    r = req("a", n_prompt=7, max_tokens=20)
    s.add_request(r)
    runner = FakeRunner(4)
    _decoding(s, r, runner)  # 8 tokens: two blocks, full once this decode's token is computed
    free_before = s.block_manager.num_free_blocks
    r.spec_token_ids = [96] * 8  # all wrong: positions 8..15 span two more blocks
    out = s.schedule()
    assert out.num_new_tokens == [9] and s.block_manager.num_free_blocks == free_before - 2
    s.update(out, runner.execute(out))
    assert r.num_computed_tokens == 8 and len(r.block_ids) == 2  # the rejected drafts' blocks are back
    assert s.block_manager.num_free_blocks == free_before
    assert 96 not in r.all_token_ids[:8]
    blocks = list(r.block_ids)
    s.abort("a")  # blocks filled while decoding reach the prefix cache when the request ends
    hashed = [s.block_manager.block_hash[b] for b in blocks]
    assert all(h is not None for h in hashed) and r.block_hashes == hashed  # the verified tokens' only
    s.block_manager.check_integrity()


def test_drafts_respect_k_budget_max_tokens_and_a_stop_token():
    s = make_scheduler(num_speculative_tokens=2, max_num_batched_tokens=8)
    r = req("a", n_prompt=5, max_tokens=4)
    s.add_request(r)
    _decoding(s, r)
    r.spec_token_ids = [1, 2, 3, 4, 5]
    out = s.schedule()
    assert out.spec_token_ids["a"] == [1, 2]  # k = 2
    s.update(out, [[1, 2, 7]])
    # 4 tokens generated of max_tokens=4: finished by length, nothing beyond it.
    assert r.output_token_ids[1:] == [1, 2, 7] and r.status is RequestStatus.FINISHED

    r = req("b", n_prompt=5, max_tokens=8, eos_token_id=2, start=20)
    s.add_request(r)
    _decoding(s, r)
    r.spec_token_ids = [1, 2, 3]
    out = s.schedule()
    s.update(out, [[1, 2, 3]])  # a stop token among accepted drafts ends the request there
    assert r.output_token_ids[-2:] == [1, 2] and r.finish_reason.value == "stop"
    s.block_manager.check_integrity()
    assert s.block_manager.num_free_blocks == s.block_manager.num_usable_blocks


def test_drafts_never_preempt_and_wait_for_free_blocks():
    s = make_scheduler(block_size=4, num_blocks=4, max_model_len=12, num_speculative_tokens=4)
    r = req("a", n_prompt=6, max_tokens=6)
    s.add_request(r)
    _decoding(s, r)
    other = req("b", n_prompt=4, max_tokens=1, start=50)
    s.add_request(other)
    s.schedule()  # b's prefill takes the last free block
    r.spec_token_ids = [1, 2, 3, 4]
    s.running.remove(other)  # keep b's blocks held, out of the way
    out = s.schedule()
    assert out.spec_token_ids == {} and out.num_new_tokens == [1] and s.num_preemptions == 0


def test_update_refuses_tokens_that_do_not_verify_the_drafts():
    s = make_scheduler(num_speculative_tokens=2)
    r = req("a")
    s.add_request(r)
    _decoding(s, r)
    r.spec_token_ids = [5, 6]
    out = s.schedule()
    for bad in ([6, 1], [5, 6, 7, 8], []):
        try:
            s.update(out, [bad])
        except ValueError as e:
            assert "sampled_token_ids" in str(e)
        else:
            raise AssertionError(f"{bad} was accepted")


class SpeculativeMachine(SchedulerMachine):
    """The scheduler's stateful test, with random drafts before every step: right for a random
    number of positions, then wrong, so acceptance, rollback and block trimming all happen."""

    num_speculative_tokens = 3

    def __init__(self) -> None:
        super().__init__()
        self.num_right = 2

    @rule(num_right=st.integers(0, 4))
    def set_accuracy(self, num_right):
        self.num_right = num_right

    @rule()
    def step(self):
        for r in self.s.running:
            r.spec_token_ids = true_continuation(r, 3)[: self.num_right] + [96, 95][: 3 - self.num_right]
        super().step()


SpeculativeMachine.TestCase.settings = settings(
    max_examples=40,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestSpeculativeScheduler = SpeculativeMachine.TestCase


def test_speculation_preserves_outputs_of_a_random_drive():
    """The same requests with and without (random-accuracy) drafts produce the same tokens."""
    results = []
    for k in (0, 3):
        s = make_scheduler(num_speculative_tokens=k, num_blocks=20, max_num_seqs=4)
        runner = FakeRunner(s.block_size)
        reqs = [req(f"r{i}", n_prompt=3 + i, max_tokens=12, start=i) for i in range(6)]
        for r in reqs:
            s.add_request(r)
        step = 0
        while s.has_unfinished():
            for r in s.running:
                right = step % 4
                r.spec_token_ids = true_continuation(r, 3)[:right] + [96] * (3 - right) if k else []
            out = s.schedule()
            s.update(out, runner.execute(out))
            s.block_manager.check_integrity()
            step += 1
        results.append([r.output_token_ids for r in reqs])
    assert results[0] == results[1]
