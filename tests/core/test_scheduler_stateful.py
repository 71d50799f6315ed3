"""Random add/abort/step sequences against a KV pool small enough to force preemption.

After every step the block manager's integrity holds and every context read through a block table
equals the request's tokens (FakeRunner); at the end every request finished or was aborted, every
block is free, and no request starved.
"""

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from neuronserve.core import FinishReason, QueueFullError, Request, RequestStatus
from tests.core.conftest import make_scheduler
from tests.core.fake_runner import FakeRunner

BLOCK_SIZE = 4
MAX_MODEL_LEN = 32
PREFIXES = [list(range(10, 22)), list(range(40, 49)), [7] * 8]  # shared heads of prompts


class SchedulerMachine(RuleBasedStateMachine):
    num_speculative_tokens = 0  # the speculative drive (tests/core/test_speculative.py) sets it

    def __init__(self) -> None:
        super().__init__()
        # 12 usable blocks = 48 tokens: two long requests already contend for the pool.
        self.s = make_scheduler(
            block_size=BLOCK_SIZE,
            num_blocks=13,
            max_num_seqs=4,
            max_num_batched_tokens=16,
            max_model_len=MAX_MODEL_LEN,
            token_buckets=(4, 8, 16),
            max_waiting=6,
            num_speculative_tokens=self.num_speculative_tokens,
        )
        self.runner = FakeRunner(BLOCK_SIZE)
        self.added: dict[str, Request] = {}
        self.aborted: set[str] = set()
        self.next_id = 0

    @rule(
        prefix=st.sampled_from(PREFIXES),
        suffix=st.lists(st.integers(0, 96), max_size=10),
        max_tokens=st.integers(1, 8),
        priority=st.integers(0, 2),
        eos=st.none() | st.integers(0, 96),
    )
    def add(self, prefix, suffix, max_tokens, priority, eos):
        prompt = (prefix + suffix)[: MAX_MODEL_LEN - max_tokens]
        r = Request(f"r{self.next_id}", prompt, max_tokens=max_tokens, priority=priority, eos_token_id=eos)
        self.next_id += 1
        try:
            self.s.add_request(r)
        except QueueFullError:
            assert len(self.s.waiting) >= 6  # preempted requests may exceed it; none is lost
            return
        self.added[r.request_id] = r

    @precondition(lambda self: self.added)
    @rule(data=st.data())
    def abort(self, data):
        rid = data.draw(st.sampled_from(sorted(self.added)))
        if self.s.abort(rid) is not None:
            self.aborted.add(rid)

    @rule()
    def step(self):
        out = self.s.schedule()
        assert out.num_scheduled_tokens <= 16 and len(out) <= 4
        assert out.bucket == 0 or out.num_scheduled_tokens <= out.bucket
        self.s.update(out, self.runner.execute(out))

    @invariant()
    def blocks_are_consistent(self):
        self.s.block_manager.check_integrity()

    def teardown(self):
        live = [r for r in self.added.values() if not r.is_finished]
        # No starvation: once arrivals stop, everything left finishes within a bound of steps.
        bound = 2 * sum(r.num_prompt_tokens + r.max_tokens for r in live) + 10
        steps = 0
        while self.s.has_unfinished():
            self.step()
            self.s.block_manager.check_integrity()
            steps += 1
            assert steps <= bound, f"starvation: {self.s.stats()}"
        for rid, r in self.added.items():
            assert r.status is RequestStatus.FINISHED
            if rid in self.aborted:
                assert r.finish_reason is FinishReason.ABORT
            else:
                assert r.finish_reason in (FinishReason.LENGTH, FinishReason.STOP)
                assert 1 <= len(r.output_token_ids) <= r.max_tokens
        bm = self.s.block_manager
        assert bm.num_free_blocks == bm.num_usable_blocks and not bm.block_tables


SchedulerMachine.TestCase.settings = settings(
    max_examples=60,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestScheduler = SchedulerMachine.TestCase


def test_preemption_happens_under_this_pool():
    """Guards the stateful test's premise: its pool is small enough to preempt."""
    m = SchedulerMachine()
    for i in range(4):
        m.add(PREFIXES[0], [i] * 10, 8, 0, None)
    while m.s.has_unfinished():
        m.step()
    assert m.s.stats().num_preemptions > 0
    m.teardown()
