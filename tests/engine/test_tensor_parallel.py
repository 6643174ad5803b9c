"""One model split by heads over three processes (engine/parallel.py) serves what one
process does: the same greedy tokens, KV blocks that move to and from whole engines,
clear refusals, and a lost rank that ends its requests instead of hanging them.

SmolLM2-135M has 9 query heads, 3 KV heads and an MLP 1,536 wide: it splits 3 ways.
"""

from __future__ import annotations

import os
import time

import psutil
import pytest

from engine.config import EngineConfig
from engine.engine import LLMEngine
from engine.errors import UnsupportedModelError
from engine.parallel import SHM_DIR, TensorParallelError
from engine.sampling_params import SamplingParams

PARAMS = SamplingParams(max_tokens=32, temperature=0, ignore_eos=True)
CHOSEN = [3, 8, 11, 14]  # 17, 200, 490 and 1,300-token prompts


def config(model_path, tensor_parallel_size: int = 3, **fields) -> EngineConfig:
    return EngineConfig(
        model=str(model_path),
        dtype="float32",
        num_blocks=400,
        max_num_batched_tokens=256,  # long prompts prefill in chunks, with context
        tensor_parallel_size=tensor_parallel_size,
        num_threads=1,
        **fields,
    )


def kv_files(group_id: str) -> list[str]:
    folder = SHM_DIR if os.path.isdir(SHM_DIR) else "/tmp"
    return [name for name in os.listdir(folder) if group_id in name]


def run_all(engine: LLMEngine, request_ids: list[str]) -> dict[str, list[int]]:
    done: dict[str, list[int]] = {}
    while len(done) < len(request_ids):
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out.token_ids
    return done


@pytest.fixture(scope="module")
def split(model_path):
    engine = LLMEngine(config(model_path))
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def whole(model_path):
    return LLMEngine(config(model_path, 1))


def test_three_ranks_generate_the_reference_tokens(split, prompts, reference_outputs):
    assert [p.poll() for p in split.tp.shards.processes] == [None, None]  # two live shards
    ids = [split.add_request(prompts[i], PARAMS) for i in CHOSEN]  # batched together
    done = run_all(split, ids)
    assert [done[i] for i in ids] == [reference_outputs[i] for i in CHOSEN]
    assert split.kv.pool.num_used_blocks == 0
    split.check_invariants()
    assert kv_files(split.config.tp_group_id) == []  # mapped, and unlinked from /dev/shm
    assert split.describe()["tensor_parallel_size"] == 3


def test_logprobs_match_one_process(split, whole, prompts):
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, logprobs=3)
    results = []
    for engine in (split, whole):
        rid = engine.add_request(prompts[9], params)
        while not (outs := [o for o in engine.step() if o.request_id == rid and o.finished]):
            pass
        results.append(outs[0].logprobs)
    for a, b in zip(*results):
        assert a.token_id == b.token_id
        assert abs(a.logprob - b.logprob) < 1e-3
        assert [t for t, _ in a.top] == [t for t, _ in b.top]


@pytest.mark.parametrize("direction", ["split to whole", "whole to split"])
def test_kv_blocks_move_between_a_split_and_a_whole_engine(
    split, whole, prompts, reference_outputs, direction
):
    """Exports carry every head, whatever the sender's split: a prefill instance on
    three processes hands off to a decode instance on one, and back."""
    source, dest = (split, whole) if direction == "split to whole" else (whole, split)
    prompt = prompts[10]  # 333... tokens, several chunks
    rid = source.add_request(prompt, PARAMS, hold_after_prefill=True)
    first = None
    while first is None:
        first = next((o.token_ids for o in source.step() if o.request_id == rid), None)
    meta, data = source.export_kv(rid)
    assert data.shape[-2] == 3  # all KV heads
    source.release(rid)
    moved = dest.import_request(prompt, first, PARAMS, meta, data)
    assert run_all(dest, [moved])[moved] == reference_outputs[10]
    for engine in (source, dest):
        assert engine.kv.pool.num_used_blocks == 0
        engine.check_invariants()


def test_a_split_the_model_does_not_allow_is_refused_before_any_process_starts(model_path):
    before = len(psutil.Process().children())
    with pytest.raises(UnsupportedModelError, match=r"tensor_parallel_size=2 .*KV heads 3"):
        LLMEngine(config(model_path, 2))
    assert len(psutil.Process().children()) == before


def test_a_lost_rank_ends_the_requests_and_the_rest_of_the_group(model_path, prompts):
    engine = LLMEngine(config(model_path))
    shards = [psutil.Process(p.pid) for p in engine.tp.shards.processes]
    group_id = engine.config.tp_group_id
    rid = engine.add_request(prompts[5], PARAMS)
    engine.step()
    shards[0].kill()
    shards[0].wait(10)
    with pytest.raises(TensorParallelError, match=r"failed on rank 0: .*Connection closed by peer"):
        for _ in range(40):  # the next collective notices
            engine.step()
    assert rid not in engine.requests and engine.kv.pool.num_used_blocks == 0
    later = engine.add_request(prompts[4], PARAMS)
    with pytest.raises(TensorParallelError, match="Connection closed by peer"):
        engine.step()  # the group stays broken
    assert later not in engine.requests and engine.kv.pool.num_used_blocks == 0
    engine.close()
    deadline = time.monotonic() + 30
    while shards[1].is_running() and shards[1].status() != psutil.STATUS_ZOMBIE:
        assert time.monotonic() < deadline, "the surviving shard did not exit"
        time.sleep(0.2)
    assert kv_files(group_id) == []


def test_an_idle_engine_notices_a_lost_rank(model_path):
    """No step runs to notice: check_group (the engine loop calls it while idle) does."""
    engine = LLMEngine(config(model_path))
    processes = list(engine.tp.shards.processes)
    processes[1].kill()
    processes[1].wait(10)
    with pytest.raises(TensorParallelError, match="a shard process exited with status -9"):
        engine.check_group()
    engine.close()  # the survivor is killed, not waited for
    assert [p.poll() for p in processes] == [-9, -9]


def test_shards_exit_when_the_driver_closes(split):  # last: it ends the module's engine
    processes = list(split.tp.shards.processes)
    split.close()
    assert [p.returncode for p in processes] == [0, 0]
