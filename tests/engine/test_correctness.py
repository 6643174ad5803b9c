"""Greedy float32 output is token-identical to transformers, however the engine batches.

One batch of 16 prompts (1 to 1,500 tokens, with code and non-ASCII text), 32 tokens each.
"""

from __future__ import annotations

import pytest

from tandem import LLM, SamplingParams
from tests.conftest import NUM_REFERENCE_TOKENS

GREEDY = SamplingParams(max_tokens=NUM_REFERENCE_TOKENS, temperature=0)


def run_and_check(llm: LLM, prompts, reference_outputs, params=GREEDY) -> None:
    outputs = llm.generate(prompts, params)
    llm.engine.check_invariants()
    pool = llm.engine.kv.pool
    assert pool.num_free_blocks == pool.num_blocks, "blocks leaked after the batch finished"
    for i, (out, ref) in enumerate(zip(outputs, reference_outputs)):
        assert out.token_ids == ref, f"prompt {i} ({len(prompts[i])} tokens) diverged"


def test_matches_transformers_in_small_chunks(model_path, prompts, reference_outputs):
    """40 tokens a step, less the running decodes: prompts in chunks that end mid-block.
    (Steps of several whole prompts: the prefix-caching test's, at 256.)"""
    llm = LLM(
        str(model_path), dtype="float32", max_num_batched_tokens=40, enable_prefix_caching=False
    )
    run_and_check(llm, prompts, reference_outputs)


def test_matches_with_prefix_caching_and_shared_prefixes(
    model_path, prompts, reference_outputs, hf_model
):
    from tests.conftest import hf_greedy

    llm = LLM(
        str(model_path), dtype="float32", max_num_batched_tokens=256, enable_prefix_caching=True
    )
    run_and_check(llm, prompts, reference_outputs)  # fills the cache
    # Second pass: prompts that share long prefixes with the first pass and with each other.
    shared = [p[:-3] + p[:3] for p in prompts if len(p) > 64][::3]
    shared_refs = [hf_greedy(hf_model, p, NUM_REFERENCE_TOKENS) for p in shared]
    hits_before = llm.engine.kv.num_prefix_hits
    run_and_check(llm, prompts + shared, reference_outputs + shared_refs)
    assert llm.engine.kv.num_prefix_hits > hits_before, "the shared prefixes never hit the cache"
    outputs = llm.generate(prompts[-1], GREEDY)
    assert outputs[0].num_cached_tokens >= len(prompts[-1]) - llm.engine.config.block_size


def test_matches_when_preemption_is_forced(model_path, prompts, reference_outputs):
    # 110 blocks of 16 tokens hold the longest request but not the whole batch.
    llm = LLM(
        str(model_path),
        dtype="float32",
        max_num_batched_tokens=512,
        enable_prefix_caching=True,
        num_blocks=110,
    )
    engine = llm.engine
    ids = [engine.add_request(p, GREEDY) for p in prompts]
    finished = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            finished[out.request_id] = out
        engine.check_invariants()
    preemptions = engine.scheduler.num_preemptions
    assert preemptions > 0, "the small pool never forced a preemption"
    assert [finished[i].token_ids for i in ids] == reference_outputs
    assert engine.kv.pool.num_free_blocks == engine.kv.pool.num_blocks


def test_a_request_resumed_from_its_generated_tokens_goes_on_as_if_never_stopped(
    engine_pair, prompts, reference_outputs
):
    """What a router sends when a decode instance died: the prompt and the tokens it
    had streamed. Greedy and seeded output, and the text after the resumed tokens,
    match one uninterrupted run."""
    from engine.errors import InvalidRequestError

    engine, _ = engine_pair
    seeded = SamplingParams(max_tokens=NUM_REFERENCE_TOKENS, temperature=0.9, seed=7)

    def run(requests: dict[str, object]) -> dict[str, object]:
        finished = {}
        while len(finished) < len(requests):
            finished.update((o.request_id, o) for o in engine.step() if o.finished)
        return finished

    chosen = [0, 11]
    started = {engine.add_request(prompts[i], seeded): i for i in chosen}
    whole_by_prompt = {started[rid]: out for rid, out in run(started).items()}
    runs = {}
    for i in chosen:
        full = whole_by_prompt[i]
        for params, tokens in ((GREEDY, reference_outputs[i]), (seeded, full.token_ids)):
            for done in (1, 13):
                rid = engine.add_request(prompts[i], params, output_token_ids=tokens[:done])
                runs[rid] = (tokens, done, full.text if params is seeded else None)
    finished = run(runs)
    for rid, (tokens, done, text) in runs.items():
        assert finished[rid].token_ids == tokens, f"resumed after {done} tokens, it diverged"
        if text is not None:
            assert finished[rid].text == text
    with pytest.raises(InvalidRequestError, match="nothing is left to generate"):
        engine.add_request(prompts[0], GREEDY, output_token_ids=reference_outputs[0])
    with pytest.raises(InvalidRequestError, match="outside the vocabulary"):
        engine.add_request(prompts[0], GREEDY, output_token_ids=[-1])
    assert not engine.requests
    engine.check_invariants()
    assert engine.kv.pool.num_free_blocks == engine.kv.pool.num_blocks
