"""Scheduler policy on its own (no model): budgets, decode priority, preemption, abort."""

from __future__ import annotations

from engine.kv.cache_manager import KVCacheManager
from engine.request import Request, RequestStatus
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler, SchedulerOutput


def make_scheduler(num_blocks=64, budget=32, max_seqs=8, caching=False) -> Scheduler:
    return Scheduler(KVCacheManager(num_blocks, 4, caching), budget, max_seqs)


def make_request(rid: str, num_prompt: int, first: int = 0) -> Request:
    return Request(
        request_id=rid,
        prompt_token_ids=list(range(first, first + num_prompt)),
        params=SamplingParams(max_tokens=100),
        eos_token_ids=frozenset(),
    )


def fake_update(sched: Scheduler, out: SchedulerOutput, token: int = 7) -> None:
    """What the engine does after a step: count computed tokens, append a sampled one."""
    by_id = {r.request_id: r for r in sched.running}
    for item in out.scheduled:
        request = by_id[item.request_id]
        request.num_computed_tokens += len(item.token_ids)
        sched.kv.cache_computed_blocks(request)
        if item.sample:
            request.append_token(token)
    sched.check_invariants()


def shape(out: SchedulerOutput) -> list[tuple[str, int]]:
    return [(s.request_id, len(s.token_ids)) for s in out.scheduled]


def test_long_prompt_is_chunked_to_the_budget():
    sched = make_scheduler(budget=32)
    sched.add(make_request("a", 70))
    out = sched.schedule()
    assert shape(out) == [("a", 32)] and not out.scheduled[0].sample
    fake_update(sched, out)
    out = sched.schedule()
    assert shape(out) == [("a", 32)] and out.scheduled[0].start_pos == 32
    fake_update(sched, out)
    out = sched.schedule()
    assert shape(out) == [("a", 6)] and out.scheduled[0].sample
    fake_update(sched, out)
    assert shape(sched.schedule()) == [("a", 1)]  # now decoding


def test_decodes_go_first_and_prefill_fills_the_rest():
    sched = make_scheduler(budget=16)
    sched.add(make_request("a", 3))
    sched.add(make_request("b", 3))
    fake_update(sched, sched.schedule())  # both prefilled in one step
    sched.add(make_request("c", 40))
    out = sched.schedule()
    assert shape(out) == [("a", 1), ("b", 1), ("c", 14)]
    fake_update(sched, out)
    out = sched.schedule()
    assert shape(out) == [("a", 1), ("b", 1), ("c", 14)]  # decodes never stall behind c


def test_max_num_seqs_limits_admission():
    sched = make_scheduler(budget=100, max_seqs=2)
    for rid in "abc":
        sched.add(make_request(rid, 2))
    assert [s.request_id for s in sched.schedule().scheduled] == ["a", "b"]
    assert [r.request_id for r in sched.waiting] == ["c"]


def test_preemption_by_recompute_when_blocks_run_out():
    sched = make_scheduler(num_blocks=4, budget=64)  # 4 blocks of 4 tokens
    sched.add(make_request("a", 8))
    sched.add(make_request("b", 7))
    fake_update(sched, sched.schedule())  # a: 9 tokens (3 blocks needed next), b: 8
    out = sched.schedule()
    # a needs a third block; none is free, so b (the latest admitted) is preempted.
    assert shape(out) == [("a", 1)]
    assert out.preempted_ids == ["b"]
    b = sched.waiting[0]
    assert b.status == RequestStatus.WAITING and b.num_computed_tokens == 0 and not b.block_ids
    assert b.token_ids[-1] == 7  # its generated token is kept, to be recomputed
    fake_update(sched, out)
    assert sched.kv.pool.num_free_blocks == 1


def test_finish_frees_every_block_in_any_state():
    sched = make_scheduler(num_blocks=16, budget=8)
    sched.add(make_request("a", 20))
    sched.add(make_request("b", 3))
    fake_update(sched, sched.schedule())  # a mid-prompt, b waiting
    a = sched.running[0]
    b = sched.waiting[0]
    sched.finish(a, RequestStatus.FINISHED_ABORTED)
    sched.finish(b, RequestStatus.FINISHED_ABORTED)
    sched.check_invariants()
    assert sched.kv.pool.num_free_blocks == 16 and sched.num_unfinished == 0


def test_prefix_hit_skips_cached_blocks_but_never_the_last_token():
    sched = make_scheduler(num_blocks=16, budget=64, caching=True)
    sched.add(make_request("a", 12))
    fake_update(sched, sched.schedule())
    sched.add(make_request("b", 12))  # same 12 tokens
    out = sched.schedule()
    item = next(s for s in out.scheduled if s.request_id == "b")
    assert (
        item.start_pos == 8 and len(item.token_ids) == 4
    )  # blocks 0-1 hit; block 2 holds the last token
    b = sched.running[-1]
    a = sched.running[0]
    assert b.block_ids[:2] == a.block_ids[:2] and b.num_cached_tokens == 8
    assert sched.kv.pool.ref_count(a.block_ids[0]) == 2
    fake_update(sched, out)
