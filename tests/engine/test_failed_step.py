"""A step that fails ends its own requests, frees their blocks, and spares the rest."""

from __future__ import annotations

from engine.config import EngineConfig
from engine.engine import LLMEngine
from engine.sampling_params import SamplingParams

PARAMS = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)


def test_a_failed_step_aborts_its_requests_and_the_engine_goes_on(model_path, prompts):
    engine = LLMEngine(
        EngineConfig(model=str(model_path), dtype="float32", max_num_batched_tokens=64)
    )
    baseline = engine.add_request(prompts[2], PARAMS)
    expected = None
    while expected is None:
        expected = next((o.token_ids for o in engine.step() if o.finished), None)

    def explode(batch, layer):
        if layer == 12:
            raise RuntimeError("out of memory")

    engine.layer_listener = explode
    doomed = [engine.add_request(p, PARAMS) for p in prompts[:2]]
    outputs = engine.step()
    assert {o.request_id for o in outputs} == set(doomed)
    assert all(o.finished and o.finish_reason == "abort" for o in outputs)
    assert engine.kv.pool.num_used_blocks == 0 and not engine.has_unfinished_requests()
    engine.check_invariants()

    engine.layer_listener = None
    again = engine.add_request(prompts[2], PARAMS)
    result = None
    while result is None:
        done = [o for o in engine.step() if o.request_id == again and o.finished]
        result = done[0].token_ids if done else None
    assert result == expected and baseline != again
