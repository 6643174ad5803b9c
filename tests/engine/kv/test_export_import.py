"""A request's KV blocks move between two engines and decoding continues exactly."""

from __future__ import annotations

import json

import pytest
import torch

from engine.config import EngineConfig
from engine.engine import LLMEngine
from engine.errors import KVImportError
from engine.kv.kv_cache import KVBlockMeta
from engine.sampling_params import SamplingParams

PARAMS = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def engines(model_path):
    config = EngineConfig(model=str(model_path), dtype="float32", max_num_batched_tokens=64)
    return LLMEngine(config), LLMEngine(config)


def run_to_end(engine: LLMEngine, request_id: str) -> list[int]:
    while True:
        for out in engine.step():
            if out.request_id == request_id and out.finished:
                return out.token_ids


def prefill_then_export(engine: LLMEngine, prompt: list[int]):
    rid = engine.add_request(prompt, PARAMS)
    while not engine.requests[rid].output_token_ids:
        engine.step()  # chunked prefill, 64 tokens a step
    meta, data = engine.export_kv(rid)
    outputs = list(engine.requests[rid].output_token_ids)
    engine.abort_request(rid)
    engine.step()
    return meta, data, outputs


def test_decoding_continues_identically_on_the_importing_engine(engines, prompts):
    source, dest = engines
    prompt = prompts[9]  # 333 tokens: 21 blocks, the last one partly filled
    expected = run_to_end(source, source.add_request(prompt, PARAMS))
    meta, data, first = prefill_then_export(source, prompt)
    assert meta.num_tokens == len(prompt) and data.shape[1] == -(-len(prompt) // 16)
    meta = KVBlockMeta.from_dict(json.loads(json.dumps(meta.to_dict())))  # travels as plain data
    rid = dest.import_request(prompt, first, PARAMS, meta, data)
    assert run_to_end(dest, rid) == expected
    for engine in engines:
        engine.check_invariants()
        assert engine.kv.pool.num_used_blocks == 0


def test_corrupted_blocks_are_refused_and_nothing_leaks(engines, prompts):
    source, dest = engines
    meta, data, first = prefill_then_export(source, prompts[6])
    data = data.clone()
    data[3, 0, 1, 0, 0, 0] += 1.0  # one value flipped in layer 3, block 0, values
    with pytest.raises(KVImportError, match="checksum"):
        dest.import_request(prompts[6], first, PARAMS, meta, data)
    dest.check_invariants()
    assert dest.kv.pool.num_used_blocks == 0 and not dest.has_unfinished_requests()


def test_mismatched_layout_is_refused(engines, prompts):
    source, dest = engines
    meta, data, first = prefill_then_export(source, prompts[5])
    wrong = KVBlockMeta(**{**meta.to_dict(), "block_size": 32})
    with pytest.raises(KVImportError, match="block_size"):
        dest.import_request(prompts[5], first, PARAMS, wrong, data)
    with pytest.raises(KVImportError, match="tokens"):
        dest.import_request(prompts[5][:-1], first, PARAMS, meta, data)
    assert dest.kv.pool.num_used_blocks == 0 and not dest.has_unfinished_requests()


@pytest.mark.parametrize("layer_groups", [None, [range(0, 7), range(7, 19), range(19, 30)]])
def test_chunk_by_chunk_handoff_matches_one_engine(engines, prompts, layer_groups):
    """The prefill worker's path: blocks read as each chunk finishes, written into a
    reservation, committed with the first token; the sender's copy is held, then released.
    With layer groups, the final chunk leaves group by group from inside its step."""
    source, dest = engines
    prompt = prompts[11]  # 490 tokens: 8 chunks of 64
    expected = run_to_end(source, source.add_request(prompt, PARAMS))
    rid = source.add_request(prompt, PARAMS, request_id="handoff-1", hold_after_prefill=True)
    dest.reserve(rid, prompt, PARAMS, len(prompt), source.layout())
    sent, first = 0, None
    shipped_in_step: list[range] = []

    def on_layer(batch, layer):  # what PrefillService._on_layer does
        nonlocal sent
        for group in layer_groups:
            if group.stop - 1 == layer and batch.scheduled[0].sample:
                end = -(-len(prompt) // 16)
                data, checksum = source.read_kv(rid, sent, end, group)
                assert data.shape[0] == len(group)
                dest.write_kv(rid, sent, data, checksum, first_layer=group.start)
                shipped_in_step.append(group)
                if group.stop == 30:
                    sent = end

    source.layer_listener = on_layer if layer_groups else None
    try:
        while first is None:
            for out in source.step():
                assert not out.finished
                first = out.token_ids
            request = source.requests[rid]
            computed = request.num_computed_tokens
            end = -(-computed // 16) if first else computed // 16
            if end > sent:
                data, checksum = source.read_kv(rid, sent, end)
                dest.write_kv(rid, sent, data, checksum)
                sent = end
            source.check_invariants()
            dest.check_invariants()
    finally:
        source.layer_listener = None
    assert shipped_in_step == (layer_groups or [])
    assert source.requests[rid].status.name == "HELD" and not source.has_pending_steps()
    dest.commit(rid, first, len(prompt))
    source.release(rid)
    assert source.kv.pool.num_used_blocks == 0
    assert run_to_end(dest, rid) == expected
    dest.check_invariants()
    assert dest.kv.pool.num_used_blocks == 0


def test_blocks_outside_the_model_or_reservation_are_refused(engines, prompts):
    source, dest = engines
    rid = source.add_request(prompts[3], PARAMS, hold_after_prefill=True)
    while source.has_pending_steps():
        source.step()
    with pytest.raises(KVImportError, match="layers"):
        source.read_kv(rid, 0, 1, range(25, 31))
    data, checksum = source.read_kv(rid, 0, 1, range(20, 30))
    dest.reserve("r-9", prompts[3], PARAMS, len(prompts[3]), dest.layout())
    with pytest.raises(KVImportError, match="do not fit"):
        dest.write_kv("r-9", 0, data, checksum, first_layer=21)
    dest.write_kv("r-9", 0, data, checksum, first_layer=20)
    for engine, request_id in ((source, rid), (dest, "r-9")):
        engine.abort_request(request_id)
        engine.step()
        engine.check_invariants()
        assert engine.kv.pool.num_used_blocks == 0


def test_an_abandoned_reservation_frees_its_blocks(engines, prompts):
    _, dest = engines
    num_blocks = dest.reserve("r-1", prompts[8], PARAMS, len(prompts[8]), dest.layout())
    assert num_blocks == -(-len(prompts[8]) // 16) and dest.kv.pool.num_used_blocks == num_blocks
    with pytest.raises(KVImportError, match="no reservation"):
        dest.commit("r-2", [1], len(prompts[8]))
    with pytest.raises(KVImportError, match="checksum"):
        shape = (30, 1, *dest.kv_cache.layers[0].shape[1:])
        dest.write_kv("r-1", 0, torch.zeros(shape), checksum=12345)
    dest.abort_request("r-1")
    dest.step()
    dest.check_invariants()
    assert dest.kv.pool.num_used_blocks == 0 and not dest.has_unfinished_requests()
