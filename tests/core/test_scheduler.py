import pytest

from neuronserve.core import (
    CacheConfig,
    FinishReason,
    QueueFullError,
    Request,
    RequestStatus,
    SchedulerConfig,
)
from tests.core.conftest import make_scheduler, req
from tests.core.fake_runner import FakeRunner


def run_to_completion(s, runner=None, max_steps=1000):
    runner = runner or FakeRunner(s.block_size)
    finished = []
    for _ in range(max_steps):
        if not s.has_unfinished():
            return finished, runner
        out = s.schedule()
        finished += s.update(out, runner.execute(out))
        s.block_manager.check_integrity()
    raise AssertionError("did not finish")


# ------------------------------------------------------------------ configuration and validation
@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(max_num_seqs=0), "max_num_seqs"),
        (dict(token_buckets=()), "token_buckets"),
        (dict(max_num_batched_tokens=1024), "max_num_batched_tokens"),
        (dict(max_num_seqs=600), "max_num_seqs"),
        (dict(max_waiting=0), "max_waiting"),
        (dict(max_model_len=0), "max_model_len"),
    ],
)
def test_scheduler_config_errors_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"^{field}:"):
        SchedulerConfig(**kwargs)


def test_cache_config_errors_name_the_field():
    with pytest.raises(ValueError, match="^block_size:"):
        CacheConfig(block_size=0)
    with pytest.raises(ValueError, match="^num_blocks:"):
        CacheConfig(num_blocks=1)


def test_a_pool_smaller_than_one_max_length_request_is_refused():
    with pytest.raises(ValueError, match="^num_blocks:.*max_model_len=64"):
        make_scheduler(num_blocks=10, block_size=4, max_model_len=64)


def test_buckets_are_sorted_and_deduplicated():
    cfg = SchedulerConfig(token_buckets=[512, 16, 16, 64], max_num_batched_tokens=512)
    assert cfg.token_buckets == (16, 64, 512)


@pytest.mark.parametrize(
    "request_, field",
    [
        (Request("e", [], max_tokens=4), "prompt_token_ids"),
        (Request("n", [1, -2], max_tokens=4), "prompt_token_ids"),
        (Request("z", [1, 2], max_tokens=0), "max_tokens"),
        (Request("l", list(range(60)), max_tokens=8), "max_tokens"),
    ],
)
def test_bad_requests_raise_naming_the_field_and_change_nothing(scheduler, request_, field):
    scheduler.add_request(req("ok"))
    with pytest.raises(ValueError, match=f"^{field}:"):
        scheduler.add_request(request_)
    assert [r.request_id for r in scheduler.waiting] == ["ok"]
    assert list(scheduler.requests) == ["ok"]


def test_duplicate_request_id_is_refused(scheduler):
    scheduler.add_request(req("a"))
    with pytest.raises(ValueError, match="^request_id:"):
        scheduler.add_request(req("a"))
    assert len(scheduler.waiting) == 1


def test_admission_control_raises_queue_full_and_keeps_the_queue():
    s = make_scheduler(max_waiting=2)
    s.add_request(req("a"))
    s.add_request(req("b"))
    with pytest.raises(QueueFullError):
        s.add_request(req("c"))
    assert [r.request_id for r in s.waiting] == ["a", "b"]
    s.schedule()  # both admitted: the queue has room again
    s.add_request(req("c"))


def test_abort_of_an_unknown_id_is_a_no_op(scheduler):
    assert scheduler.abort("nope") is None
    assert not scheduler.has_unfinished()


def test_abort_frees_blocks_of_waiting_and_running_requests(scheduler):
    scheduler.add_request(req("a", n_prompt=10))
    scheduler.add_request(req("b", n_prompt=10, start=50))
    out = scheduler.schedule()
    scheduler.update(out, FakeRunner(4).execute(out))
    scheduler.add_request(req("c"))
    assert scheduler.abort("a").finish_reason is FinishReason.ABORT
    assert scheduler.abort("c").status is RequestStatus.FINISHED
    scheduler.block_manager.check_integrity()
    assert [r.request_id for r in scheduler.running] == ["b"]
    assert scheduler.abort("b") is not None
    assert scheduler.block_manager.num_free_blocks == scheduler.block_manager.num_usable_blocks
    assert not scheduler.has_unfinished()


# ------------------------------------------------------------------ batching
def test_prefill_is_chunked_to_the_token_budget():
    s = make_scheduler(max_num_batched_tokens=16, token_buckets=(8, 16), max_num_seqs=4)
    s.add_request(req("long", n_prompt=40, max_tokens=2))
    runner, chunks = FakeRunner(4), []
    while s.has_unfinished():
        out = s.schedule()
        chunks.append((out.num_new_tokens[0], out.bucket))
        s.update(out, runner.execute(out))
    assert chunks == [(16, 16), (16, 16), (8, 8), (1, 8)]


def test_decodes_go_first_and_prefill_chunks_fill_the_rest_of_the_step():
    s = make_scheduler(max_num_batched_tokens=16, token_buckets=(4, 8, 16), max_num_seqs=4)
    runner = FakeRunner(4)
    s.add_request(req("a", n_prompt=6, max_tokens=8))
    s.add_request(req("b", n_prompt=6, max_tokens=8, start=20))
    out = s.schedule()
    assert out.num_new_tokens == [6, 6] and out.bucket == 16
    s.update(out, runner.execute(out))
    s.add_request(req("c", n_prompt=30, max_tokens=2, start=40))
    out = s.schedule()
    # Two decodes, then c's first chunk takes the 14 tokens left: prefill and decode in one step.
    assert out.request_ids == ["a", "b", "c"]
    assert out.num_new_tokens == [1, 1, 14] and out.num_scheduled_tokens == 16
    s.update(out, runner.execute(out))
    out = s.schedule()
    assert out.num_new_tokens == [1, 1, 14]
    s.update(out, runner.execute(out))
    out = s.schedule()
    assert out.num_new_tokens == [1, 1, 2] and out.bucket == 4


def test_max_num_seqs_bounds_the_batch():
    s = make_scheduler(max_num_seqs=2)
    for i in range(4):
        s.add_request(req(f"r{i}", start=10 * i + 1))
    out = s.schedule()
    assert out.request_ids == ["r0", "r1"]
    assert [r.request_id for r in s.waiting] == ["r2", "r3"]


def test_waiting_order_is_priority_then_arrival():
    s = make_scheduler(max_num_seqs=1, max_num_batched_tokens=8, token_buckets=(8,))
    s.add_request(req("late-low", priority=2))
    s.add_request(req("first-normal", priority=1, start=10))
    s.add_request(req("urgent", priority=0, start=20))
    s.add_request(req("second-normal", priority=1, start=30))
    order, runner = [], FakeRunner(4)
    while s.has_unfinished():
        out = s.schedule()
        order += [r for r in out.request_ids if r not in order]
        s.update(out, runner.execute(out))
    assert order == ["urgent", "first-normal", "second-normal", "late-low"]


def test_bucket_is_the_smallest_that_holds_the_step():
    s = make_scheduler(token_buckets=(8, 16, 32))
    s.add_request(req("a", n_prompt=9))
    assert s.schedule().bucket == 16
    assert make_scheduler().schedule().bucket == 0  # nothing to do


# ------------------------------------------------------------------ preemption
def test_preemption_victim_is_lowest_priority_then_latest_arrival():
    # 7 usable blocks of 4 tokens. Each request holds 2 blocks after its 7-token prefill and
    # needs a 3rd for its 9th token.
    s = make_scheduler(num_blocks=8, block_size=4, max_model_len=24, enable_prefix_caching=False)
    runner = FakeRunner(4)
    s.add_request(req("p0-first", n_prompt=7, max_tokens=10, priority=0))
    s.add_request(req("p1-first", n_prompt=7, max_tokens=10, priority=1, start=20))
    s.add_request(req("p1-second", n_prompt=7, max_tokens=10, priority=1, start=40))
    s.add_request(req("p0-second", n_prompt=7, max_tokens=10, priority=0, start=60))
    out = s.schedule()
    # Priority order; p1-second's 2 blocks do not fit in the 1 left, so it waits.
    assert out.request_ids == ["p0-first", "p0-second", "p1-first"]
    s.update(out, runner.execute(out))
    out = s.schedule()
    assert out.preempted_ids == []
    s.update(out, runner.execute(out))
    out = s.schedule()  # the 9th token: p0-first takes the free block, p0-second preempts
    assert out.preempted_ids == ["p1-first"]
    assert out.request_ids == ["p0-first", "p0-second"]
    s.update(out, runner.execute(out))
    victim = s.requests["p1-first"]
    assert victim.status is RequestStatus.PREEMPTED and victim.num_computed_tokens == 0
    assert victim.block_ids == [] and victim.output_token_ids != []
    # It waits again ahead of p1-second, which arrived after it.
    assert [r.request_id for r in s.waiting] == ["p1-first", "p1-second"]
    s.block_manager.check_integrity()
    finished, _ = run_to_completion(s, runner)
    assert sorted(r.request_id for r in finished) == [
        "p0-first",
        "p0-second",
        "p1-first",
        "p1-second",
    ]
    assert all(len(r.output_token_ids) == 10 for r in finished)


def test_equal_priorities_preempt_the_latest_arrival():
    s = make_scheduler(num_blocks=7, block_size=4, max_model_len=24, enable_prefix_caching=False)
    runner = FakeRunner(4)
    for i, name in enumerate(["first", "second", "third"]):
        s.add_request(req(name, n_prompt=8, max_tokens=8, start=20 * i))
    preempted = []
    while not preempted:
        out = s.schedule()
        preempted = out.preempted_ids
        s.update(out, runner.execute(out))
    assert preempted == ["third"]


def test_preempted_victim_already_scheduled_is_unscheduled():
    s = make_scheduler(
        num_blocks=7,
        block_size=4,
        max_model_len=24,
        max_num_batched_tokens=8,
        token_buckets=(4, 8),
        max_num_seqs=2,
    )
    runner = FakeRunner(4)
    s.add_request(req("decoder", n_prompt=3, max_tokens=12, priority=1))
    out = s.schedule()
    s.update(out, runner.execute(out))
    s.add_request(req("big", n_prompt=20, max_tokens=2, priority=0, start=30))
    for expected in ([1, 7], [1, 7]):
        out = s.schedule()
        assert out.request_ids == ["decoder", "big"] and out.num_new_tokens == expected
        s.update(out, runner.execute(out))
    out = s.schedule()
    # big's last chunk needs a 5th block; none is free, so the decoder (lower priority) is
    # preempted although it was already scheduled this step, and leaves the batch.
    assert out.preempted_ids == ["decoder"]
    assert out.request_ids == ["big"] and out.num_new_tokens == [6] and out.bucket == 8
    s.update(out, runner.execute(out))
    s.block_manager.check_integrity()
    finished, _ = run_to_completion(s, runner)
    assert {r.request_id for r in finished} == {"decoder", "big"}


# ------------------------------------------------------------------ stop conditions
def test_stop_conditions():
    s = make_scheduler()
    eos = 7
    s.add_request(req("len", max_tokens=3))
    s.add_request(req("eos", max_tokens=10, start=10, eos_token_id=eos))
    s.add_request(req("ign", max_tokens=3, start=20, eos_token_id=eos, ignore_eos=True))
    s.add_request(req("stop", max_tokens=10, start=30, stop_token_ids=[5]))
    scripted = {"len": [1, 2, 3], "eos": [1, eos], "ign": [eos, eos, eos], "stop": [4, 5]}
    finished = []
    while s.has_unfinished():
        out = s.schedule()
        sampled = {
            r.request_id: scripted[r.request_id][len(r.output_token_ids)]
            for i, r in enumerate(out.requests)
            if out.samples(i)
        }
        finished += s.update(out, sampled)
    got = {r.request_id: (r.finish_reason, r.output_token_ids) for r in finished}
    assert got == {
        "len": (FinishReason.LENGTH, [1, 2, 3]),
        "eos": (FinishReason.STOP, [1, eos]),
        "ign": (FinishReason.LENGTH, [eos, eos, eos]),
        "stop": (FinishReason.STOP, [4, 5]),
    }
    assert s.block_manager.num_free_blocks == s.block_manager.num_usable_blocks


def test_update_names_a_missing_sampled_token(scheduler):
    scheduler.add_request(req("a"))
    out = scheduler.schedule()
    with pytest.raises(ValueError, match="sampled_token_ids"):
        scheduler.update(out, {})


def test_a_request_aborted_between_schedule_and_update_is_skipped(scheduler):
    scheduler.add_request(req("a"))
    out = scheduler.schedule()
    scheduler.abort("a")
    assert scheduler.update(out, {"a": 3}) == []
    scheduler.block_manager.check_integrity()


# ------------------------------------------------------------------ prefix caching
SYSTEM = list(range(100, 133))  # a shared 33-token system prompt


def shopping_requests():
    return [Request(f"q{i}", SYSTEM + [200 + i] * (3 + i), max_tokens=5) for i in range(4)]


def test_a_second_request_with_a_shared_prefix_reuses_cached_blocks():
    s = make_scheduler(max_num_seqs=1)
    runner = FakeRunner(4)
    first, second = shopping_requests()[:2]
    s.add_request(first)
    run_to_completion(s, runner)
    hits_before = s.stats().prefix_cache_hits
    s.add_request(second)
    out = s.schedule()
    assert out.num_computed_tokens == [32]  # 8 full blocks of the system prompt were cached
    assert second.num_cached_tokens == 32
    assert s.stats().prefix_cache_hits - hits_before == 32
    s.update(out, runner.execute(out))


def test_outputs_are_the_same_with_prefix_caching_on_and_off():
    results = {}
    for caching in (True, False):
        s = make_scheduler(max_num_seqs=2, enable_prefix_caching=caching)
        for r in shopping_requests():
            s.add_request(r)
        finished, runner = run_to_completion(s)
        results[caching] = (
            {r.request_id: r.output_token_ids for r in finished},
            sum(len(t) for t in runner.computed.values()),
            s.stats().prefix_cache_hits,
        )
    (on_tokens, on_work, on_hits), (off_tokens, off_work, off_hits) = results[True], results[False]
    assert on_tokens == off_tokens
    assert on_hits > 0 and off_hits == 0
    assert on_work == off_work - on_hits  # caching saved exactly the tokens it hit


def test_stats_report_the_queue_and_cache(scheduler):
    for i in range(3):
        scheduler.add_request(req(f"r{i}", n_prompt=9, start=10 * i))
    out = scheduler.schedule()
    st = scheduler.stats()
    assert (st.num_running, st.num_waiting, st.num_steps) == (3, 0, 1)
    assert st.num_free_blocks == scheduler.block_manager.num_usable_blocks - 9
    assert st.kv_cache_usage == pytest.approx(9 / 63)
    scheduler.update(out, FakeRunner(4).execute(out))


def test_two_running_prefills_share_the_budget_without_exceeding_it():
    s = make_scheduler(
        max_num_batched_tokens=16, token_buckets=(8, 16), max_num_seqs=4, enable_prefix_caching=False
    )
    a, b = req("a", n_prompt=30, max_tokens=2), req("b", n_prompt=30, max_tokens=2, start=40)
    for r in (a, b):
        s.add_request(r)
    out = s.schedule()
    assert out.num_new_tokens == [16]
    s.update(out, {})
    # Put b mid-prefill too (as a recompute after preemption can leave it), then step.
    s.waiting.remove(b)
    assert s.block_manager.allocate(b, 4)
    b.num_computed_tokens, b.status = 4, a.status
    s.running.append(b)
    out = s.schedule()
    assert out.request_ids == ["a", "b"] and out.num_new_tokens == [14, 2]
    assert out.num_scheduled_tokens == 16


# ------------------------------------------------------------------ the persistent decode batch
def test_a_missing_decode_token_is_refused_before_anything_changes(scheduler):
    runner = FakeRunner(scheduler.block_size)
    scheduler.add_request(req("a", max_tokens=8))
    scheduler.add_request(req("b", max_tokens=8, start=20))
    out = scheduler.schedule()
    scheduler.update(out, runner.execute(out))  # both prefilled; both decode from now on
    out = scheduler.schedule()
    assert out.num_decodes == 2
    before = [(r.num_computed_tokens, list(r.output_token_ids)) for r in out.requests]
    with pytest.raises(ValueError, match="sampled_token_ids: no token for request 'b'"):
        scheduler.update(out, [5, None])
    assert [(r.num_computed_tokens, list(r.output_token_ids)) for r in out.requests] == before
    scheduler.update(out, [5, 6])  # the same step, now with its tokens
    assert [r.output_token_ids[-1] for r in out.requests] == [5, 6]


def test_update_refuses_a_stale_output(scheduler):
    scheduler.add_request(req("a", max_tokens=8))
    first = scheduler.schedule()
    scheduler.update(first, [3])
    second = scheduler.schedule()
    scheduler.update(second, [4])
    with pytest.raises(ValueError, match="^output:"):
        scheduler.update(second, [4])


def test_decode_rows_keep_their_order_and_positions_follow_the_clock():
    s = make_scheduler(max_num_seqs=4)
    runner = FakeRunner(s.block_size)
    for i in range(3):
        s.add_request(req(f"r{i}", n_prompt=3 + i, max_tokens=10, start=10 * i))
    out = s.schedule()
    s.update(out, runner.execute(out))
    first = s.schedule()
    s.update(first, runner.execute(first))
    second = s.schedule()
    assert second.requests is first.requests  # no row joined or left: the same row list
    assert second.num_computed_tokens == [n + 1 for n in first.num_computed_tokens]
    assert second.num_computed_tokens == [r.num_computed_tokens for r in second.requests]
    sampled = runner.execute(second)
    s.abort("r1")  # a row leaves mid-step: the step's output keeps its own rows
    assert [r.request_id for r in second.requests] == ["r0", "r1", "r2"]
    s.update(second, sampled)
    third = s.schedule()
    assert [r.request_id for r in third.requests] == ["r0", "r2"]
    assert third.num_computed_tokens == [r.num_computed_tokens for r in third.requests]


def test_blocks_filled_while_decoding_are_cached_when_the_request_ends():
    s = make_scheduler(max_num_seqs=1)
    runner = FakeRunner(4)
    first = Request("first", list(range(100, 107)), max_tokens=6)  # 7 + 6 tokens: 3 full blocks
    s.add_request(first)
    run_to_completion(s, runner)
    again = Request("again", first.all_token_ids, max_tokens=2)
    s.add_request(again)
    out = s.schedule()
    assert again.num_cached_tokens == 12  # the prompt's block and both blocks of decoded tokens
    s.update(out, runner.execute(out))
