"""A decoding request moves between two engines while it runs: its blocks are copied in
stages while it keeps decoding, then it pauses for the last blocks and its tokens. Its
tokens and text come out as if one engine had run it, greedy or seeded."""

from __future__ import annotations

import pytest

from engine.engine import LLMEngine
from engine.errors import KVImportError, MigrationError
from engine.outputs import RequestOutput
from engine.sampling_params import SamplingParams

GREEDY = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
SEEDED = SamplingParams(max_tokens=40, temperature=1.0, top_p=0.9, seed=1234, ignore_eos=True)


@pytest.fixture(scope="module")
def engines(engine_pair):
    return engine_pair


class Collector:
    """Every output of both engines, per request: what a router would stream."""

    def __init__(self) -> None:
        self.tokens: dict[str, list[int]] = {}
        self.text: dict[str, str] = {}
        self.finished: dict[str, str | None] = {}

    def add(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            self.tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
            self.text[out.request_id] = self.text.get(out.request_id, "") + out.new_text
            if out.finished:
                self.finished[out.request_id] = out.finish_reason


def migrate(source: LLMEngine, dest: LLMEngine, request_id: str, seen: Collector) -> None:
    """The engine half of a live migration, with one step of the source between the
    copy of its full blocks and the pause (the request keeps decoding meanwhile)."""
    request = source.requests[request_id]
    blocks, preemptions = source.full_blocks(request_id)
    dest.reserve(
        request_id,
        request.prompt_token_ids,
        request.params,
        request.num_computed_tokens + 1,
        source.layout(),
    )
    data, crc = source.read_blocks(blocks)
    seen.add(source.step())  # the request decodes on while its blocks travel
    assert source.full_blocks(request_id)[1] == preemptions  # not preempted meanwhile
    dest.write_kv(request_id, 0, data, crc)
    block_ids, output_ids, num_kv_tokens = source.pause(request_id)
    seen.add(source.step())  # a paused request is not scheduled
    assert source.requests[request_id].output_token_ids == output_ids
    dest.grow_reservation(request_id, num_kv_tokens)
    rest, crc = source.read_blocks(block_ids[len(blocks) :])
    dest.write_kv(request_id, len(blocks), rest, crc)
    dest.commit(request_id, output_ids, num_kv_tokens)
    source.release(request_id)


def run_alone(
    engine: LLMEngine, prompt: list[int], params: SamplingParams
) -> tuple[list[int], str]:
    seen = Collector()
    rid = engine.add_request(prompt, params)
    while rid not in seen.finished:
        seen.add(engine.step())
    return seen.tokens[rid], seen.text[rid]


def test_requests_migrated_back_and_forth_mid_decode_give_the_same_tokens_and_text(
    engines, prompts
):
    source, dest = engines
    cases = [(prompts[9], GREEDY), (prompts[6], SEEDED), (prompts[3], GREEDY), (prompts[5], SEEDED)]
    expected = [run_alone(source, prompt, params) for prompt, params in cases]
    seen = Collector()
    ids = [source.add_request(prompt, params) for prompt, params in cases]
    where = dict.fromkeys(ids, source)
    step = 0
    while len(seen.finished) < len(ids):
        step += 1
        for engine in engines:
            seen.add(engine.step())
        for i, rid in enumerate(ids):  # each one moves every few steps, at its own pace
            if rid in seen.finished or step % (3 + i) != 0:
                continue
            here = where[rid]
            done = len(here.requests[rid].output_token_ids)
            if not 0 < done < cases[i][1].max_tokens - 2:
                continue  # not decoding yet, or it would finish while it moves
            there = dest if here is source else source
            migrate(here, there, rid, seen)
            where[rid] = there
    for rid, (tokens, text) in zip(ids, expected, strict=True):
        assert seen.finished[rid] == "length"
        assert seen.tokens[rid] == tokens
        assert seen.text[rid] == text
    for engine in engines:
        engine.check_invariants()
        assert engine.kv.pool.num_used_blocks == 0


def test_a_rolled_back_migration_resumes_at_the_source_and_frees_the_reservation(engines, prompts):
    source, dest = engines
    tokens, text = run_alone(source, prompts[7], SEEDED)
    seen = Collector()
    rid = source.add_request(prompts[7], SEEDED)
    while not source.requests[rid].output_token_ids or len(seen.tokens.get(rid, [])) < 5:
        seen.add(source.step())
    free_before = dest.kv.pool.num_free_blocks
    request = source.requests[rid]
    dest.reserve(rid, request.prompt_token_ids, request.params, request.num_tokens, source.layout())
    with pytest.raises(KVImportError, match="cannot reserve KV for"):
        dest.grow_reservation(rid, dest.max_model_len)
    assert dest.grow_reservation(rid, request.num_tokens + 40) == -(
        -(request.num_tokens + 40) // 16
    )
    source.pause(rid)
    seen.add(source.step())
    dest.abort_request(rid)  # the migration gives up: the destination frees its blocks
    assert [o.finish_reason for o in dest.step()] == ["abort"]
    assert dest.kv.pool.num_free_blocks == free_before
    assert source.resume(rid)
    while rid not in seen.finished:
        seen.add(source.step())
    assert (seen.tokens[rid], seen.text[rid]) == (tokens, text)
    for engine in engines:
        engine.check_invariants()
        assert engine.kv.pool.num_used_blocks == 0


def test_only_a_decoding_request_can_be_paused_and_an_abort_while_paused_frees_it(engines, prompts):
    source, _ = engines
    rid = source.add_request(prompts[9], GREEDY)
    with pytest.raises(MigrationError, match="not decoding"):
        source.pause(rid)  # waiting for its prefill
    with pytest.raises(MigrationError, match="not on this instance"):
        source.full_blocks("nobody")
    while not source.requests[rid].output_token_ids:
        source.step()
    source.pause(rid)
    source.abort_request(rid)  # the client went away mid-migration
    assert [o.finish_reason for o in source.step()] == ["abort"]
    assert not source.resume(rid)
    source.check_invariants()
    assert source.kv.pool.num_used_blocks == 0


def test_blocks_shared_through_the_prefix_cache_stay_with_the_requests_that_share_them(
    engines, prompts
):
    """A and B share a prefix on the source (the same blocks, two references). A moves:
    the source keeps the shared blocks for B and frees only A's own; the destination
    holds A's copy in blocks of its own, which its prefix cache then offers to C. All
    three give the tokens they give alone."""
    source, dest = engines
    for engine in engines:
        engine.kv.pool.reset_prefix_cache()
    prefix = prompts[-1][:96]  # six full blocks
    prompt_a, prompt_b, prompt_c = prefix + prompts[2], prefix + prompts[4], prefix + prompts[8]
    alone = [run_alone(source, p, GREEDY) for p in (prompt_a, prompt_b, prompt_c)]
    for engine in engines:
        engine.kv.pool.reset_prefix_cache()
    seen = Collector()
    a = source.add_request(prompt_a, GREEDY)
    seen.add(source.step())  # A first, so that B finds its prefix in the cache
    b = source.add_request(prompt_b, GREEDY)
    while len(seen.tokens.get(b, [])) < 3:
        seen.add(source.step())
    pool = source.kv.pool
    shared = source.requests[a].block_ids[:6]
    assert source.requests[b].block_ids[:6] == shared
    assert [pool.ref_count(x) for x in shared] == [2] * 6
    b_blocks = list(source.requests[b].block_ids)

    migrate(source, dest, a, seen)

    assert [pool.ref_count(x) for x in shared] == [1] * 6  # B's now, and only B's
    assert source.requests[b].block_ids[: len(b_blocks)] == b_blocks
    assert pool.num_used_blocks == len(source.requests[b].block_ids)
    moved = dest.requests[a].block_ids
    assert all(dest.kv.pool.ref_count(x) == 1 for x in moved)
    hits_before = dest.kv.num_prefix_hits
    c = dest.add_request(prompt_c, GREEDY)  # finds A's prefix in the destination's cache
    while len(seen.finished) < 3:
        for engine in engines:
            seen.add(engine.step())
    assert dest.requests.get(c) is None and seen.finished[c] == "length"
    assert dest.kv.num_prefix_hits - hits_before >= 96
    assert [(seen.tokens[r], seen.text[r]) for r in (a, b, c)] == alone
    for engine in engines:
        engine.check_invariants()
        assert engine.kv.pool.num_used_blocks == 0
