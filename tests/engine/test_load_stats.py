"""What a worker reports for routing: step samples, prefix-cache counters, Status fields."""

from __future__ import annotations

import threading
from typing import Any

import pytest

from cluster.worker_base import WorkerServicer
from engine.config import EngineConfig
from engine.engine import LLMEngine
from engine.kv.cache_manager import KVCacheManager
from engine.loop import EngineLoop
from engine.outputs import RequestOutput
from engine.request import Request
from engine.sampling_params import SamplingParams
from proto.tandem.internal.v1 import worker_pb2 as pb
from router.load import LoadTracker

BUDGET = 64
PARAMS = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def engine(model_path) -> LLMEngine:
    config = EngineConfig(
        model=str(model_path), dtype="float32", max_num_batched_tokens=BUDGET, num_blocks=64
    )
    return LLMEngine(config)


class _Finished:
    """on_outputs for an EngineLoop: counts finished requests, wakes whoever waits."""

    def __init__(self) -> None:
        self.request_ids: list[str] = []
        self._event = threading.Condition()

    def __call__(self, outputs: list[RequestOutput]) -> None:
        with self._event:
            self.request_ids += [o.request_id for o in outputs if o.finished]
            self._event.notify_all()

    def wait_for(self, num: int) -> None:
        with self._event:
            assert self._event.wait_for(lambda: len(self.request_ids) >= num, timeout=60)


def _run(loop: EngineLoop, finished: _Finished, prompt_ids: list[int]) -> None:
    loop.call(loop.engine.add_request, prompt_ids, PARAMS)
    finished.wait_for(len(finished.request_ids) + 1)


class _Servicer(WorkerServicer):
    """The shared Status code around a real engine loop; no links, no handoffs."""

    role = "colocated"

    class _NoLinks:
        def links(self) -> list[Any]:
            return []

    def __init__(self, loop: EngineLoop) -> None:
        super().__init__("w0")
        self.engine, self.loop, self.links = loop.engine, loop, self._NoLinks()

    def counters(self) -> dict[str, Any]:
        return {"handoffs_completed": 0}


def test_steps_are_sampled_and_shared_prefixes_counted(engine: LLMEngine, prompts) -> None:
    shared = prompts[6][:48]  # three full blocks
    first, second = shared + prompts[5][:52], shared + prompts[4][:17]
    queries, hits = engine.kv.num_prefix_queries, engine.kv.num_prefix_hits
    finished = _Finished()
    loop = EngineLoop(engine, finished)
    loop.start()
    try:
        _run(loop, finished, first)
        _run(loop, finished, second)
        stats = loop.call(engine.stats)
        samples = loop.step_samples()
    finally:
        loop.stop()

    assert stats["prefix_cache_queries"] - queries == len(first) + len(second)
    assert stats["prefix_cache_hits"] - hits == 48
    # first: 100 prompt tokens in chunks of 64 and 36, then 3 decode steps; second: its 17
    # uncached prompt tokens in one step, then 3 decode steps.
    assert len(samples) == loop.num_steps == 9
    shapes = [(s.num_batched_tokens, s.num_seqs, s.num_prefill_tokens) for s in samples]
    decodes = [(1, 1, 0)] * 3
    assert shapes == [(64, 1, 64), (36, 1, 36), *decodes, (17, 1, 17), *decodes]
    assert all(s.seconds > 0 for s in samples)
    assert [s.end_time for s in samples] == sorted(s.end_time for s in samples)


def test_the_ring_keeps_the_latest_steps(engine: LLMEngine, prompts) -> None:
    finished = _Finished()
    loop = EngineLoop(engine, finished, max_step_samples=3)
    loop.start()
    try:
        _run(loop, finished, prompts[7])  # 128 tokens: 2 prefill steps, 3 decode steps
        samples = loop.step_samples()
    finally:
        loop.stop()
    assert loop.num_steps == 5
    assert [s.num_batched_tokens for s in samples] == [1, 1, 1]


def test_status_reports_the_load_a_router_tracks(engine: LLMEngine, prompts) -> None:
    finished = _Finished()
    loop = EngineLoop(engine, finished)
    loop.start()
    servicer = _Servicer(loop)
    try:
        for prompt_ids in (prompts[8], prompts[8][:150], prompts[5]):
            _run(loop, finished, prompt_ids)
        status = servicer.Status(pb.StatusRequest(check_invariants=True), context=None)
    finally:
        loop.stop()

    assert status.instance_id == "w0" and status.role == "colocated"
    assert status.invariants_error == "" and status.steps == loop.num_steps
    assert (status.max_num_batched_tokens, status.max_num_seqs) == (BUDGET, 256)
    assert (status.num_running, status.num_waiting, status.num_queued_prefill_tokens) == (0, 0, 0)
    assert status.num_blocks == 64 and status.num_free_blocks == 64
    assert status.prefix_cache_queries == engine.kv.num_prefix_queries > 0
    assert status.prefix_cache_hits == engine.kv.num_prefix_hits >= 144  # 150 of prompt 8
    assert len(status.step_samples) == loop.num_steps
    assert [s.num_batched_tokens for s in status.step_samples[:4]] == [64, 64, 64, 8]
    assert status.step_samples[0].num_prefill_tokens == 64

    tracker = LoadTracker()
    load = tracker.update("w0", status, now=0.0)
    assert load.kv_usage == 0.0 and load.prefix_cache_hits == status.prefix_cache_hits
    model = tracker.step_model("w0")
    assert model is not None and model.num_samples == len(status.step_samples)
    assert model.predict(BUDGET) > model.predict(1) > 0


def test_a_lookup_retried_for_want_of_blocks_counts_once() -> None:
    kv = KVCacheManager(num_blocks=4, block_size=4, enable_prefix_caching=True)
    params = SamplingParams(max_tokens=1)
    cached = Request("a", list(range(9)), params, frozenset())
    assert kv.allocate(cached, 9, kv.match_prefix(cached))
    cached.num_computed_tokens = 9
    kv.cache_computed_blocks(cached)  # blocks 0 and 1 (tokens 0-7) cached, 3 blocks held
    assert (kv.num_prefix_queries, kv.num_prefix_hits) == (9, 0)

    request = Request("b", [*range(8), 50, 51, 52, 53, 54, 55], params, frozenset())
    for _ in range(3):  # the scheduler retries each step while the pool is short
        hits = kv.match_prefix(request)
        assert len(hits) == 2 and not kv.allocate(request, 6, hits)
    assert (kv.num_prefix_queries, kv.num_prefix_hits) == (9, 0)
    kv.free(cached)
    assert kv.allocate(request, 6, kv.match_prefix(request))
    assert (kv.num_prefix_queries, kv.num_prefix_hits) == (9 + 14, 8)
    kv.check_invariants()
