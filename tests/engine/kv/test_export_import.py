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


def test_garbage_in_the_unfilled_tail_does_not_matter(engines, prompts):
    source, dest = engines
    meta, data, first = prefill_then_export(source, prompts[4])  # 31 tokens: last block has 15
    data = data.clone()
    data[:, -1, :, 15:] = torch.randn_like(data[:, -1, :, 15:])
    rid = dest.import_request(prompts[4], first, PARAMS, meta, data)
    dest.abort_request(rid)
    dest.step()
    assert dest.kv.pool.num_used_blocks == 0
