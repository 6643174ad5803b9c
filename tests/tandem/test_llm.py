"""The offline API as a user meets it: prompts in, text and tokens out, clear errors."""

from __future__ import annotations

from collections import Counter

import pytest

from engine.request import RequestStatus
from tandem import LLM, InvalidRequestError, SamplingParams

GREEDY = SamplingParams(max_tokens=24, temperature=0)


@pytest.fixture(scope="module")
def llm(model_path):
    return LLM(str(model_path), dtype="float32", max_num_batched_tokens=256)


@pytest.fixture(autouse=True)
def no_leaks(request):
    yield
    if "llm" in request.fixturenames:
        engine = request.getfixturevalue("llm").engine
        engine.check_invariants()
        assert engine.kv.pool.num_used_blocks == 0, "a test left KV blocks allocated"
        assert not engine.has_unfinished_requests()


def test_strings_and_token_ids_give_the_same_output(llm):
    text = "The capital of France is"
    ids = llm.tokenizer.encode(text)
    by_text, by_ids = llm.generate([text, ids], GREEDY)
    assert by_text.token_ids == by_ids.token_ids
    assert "Paris" in by_text.text
    assert llm.generate(text, GREEDY)[0].token_ids == by_text.token_ids  # a bare prompt works too


def test_max_tokens_ends_with_length(llm):
    [out] = llm.generate(
        "Count: one, two, three,", SamplingParams(max_tokens=5, temperature=0, ignore_eos=True)
    )
    assert len(out.token_ids) == 5 and out.finish_reason == "length"


def test_stop_string_is_excluded_from_the_text(llm):
    [full] = llm.generate("Count: one, two, three,", GREEDY)
    stop = full.text.split()[1]  # a word the model will produce
    [out] = llm.generate(
        "Count: one, two, three,", SamplingParams(max_tokens=24, temperature=0, stop=[stop])
    )
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert stop not in out.text and full.text.startswith(out.text)


def test_stop_token_id_ends_generation(llm):
    [full] = llm.generate("Count: one, two, three,", GREEDY)
    stop_id = full.token_ids[3]
    [out] = llm.generate(
        "Count: one, two, three,",
        SamplingParams(max_tokens=24, temperature=0, stop_token_ids=[stop_id]),
    )
    first = full.token_ids.index(stop_id)  # generation ends at its first occurrence
    assert (
        out.token_ids == full.token_ids[: first + 1]
        and out.finish_reason == "stop"
        and out.stop_reason == stop_id
    )


def test_chat_uses_the_template_and_stops_at_eos(llm):
    conversation = [{"role": "user", "content": "What is 2+2?"}]
    [out] = llm.chat(conversation, SamplingParams(max_tokens=64, temperature=0))
    assert out.finish_reason == "stop" and out.token_ids[-1] in llm.engine.eos_token_ids
    assert "4" in out.text and "<|im_end|>" not in out.text
    expected = llm.tokenizer.apply_chat_template(
        conversation, tokenize=False, add_generation_prompt=True
    )
    assert llm.tokenizer.decode(out.prompt_token_ids) == expected
    [ignored] = llm.chat(
        conversation, SamplingParams(max_tokens=64, temperature=0, ignore_eos=True)
    )
    assert len(ignored.token_ids) == 64 and ignored.finish_reason == "length"


def test_logprobs_are_sorted_and_include_the_sampled_token(llm):
    [out] = llm.generate("The sky is", SamplingParams(max_tokens=6, temperature=0, logprobs=5))
    assert len(out.logprobs) == 6
    for token_id, entry in zip(out.token_ids, out.logprobs):
        assert entry.token_id == token_id and entry.rank == 1  # greedy picks the top token
        values = [lp for _, lp in entry.top]
        assert len(values) == 5 and values == sorted(values, reverse=True)
        assert entry.top[0] == (token_id, pytest.approx(entry.logprob)) and entry.logprob <= 0
    [out20] = llm.generate("The sky is", SamplingParams(max_tokens=1, temperature=0, logprobs=20))
    assert len(out20.logprobs[0].top) == 20


def test_seeded_sampling_is_the_same_alone_and_in_a_busy_batch(llm):
    seeded = SamplingParams(max_tokens=24, temperature=1.0, top_p=0.9, seed=1234)
    [alone] = llm.generate("Once upon a time", seeded)
    others = ["Write a poem about the sea." * k for k in range(1, 8)]
    busy = llm.generate(
        [*others[:3], "Once upon a time", *others[3:]],
        [SamplingParams(max_tokens=16, temperature=0.8)] * 3
        + [seeded]
        + [SamplingParams(max_tokens=30)] * 4,
    )
    assert busy[3].token_ids == alone.token_ids
    [other_seed] = llm.generate(
        "Once upon a time", SamplingParams(max_tokens=24, temperature=1.0, seed=99)
    )
    assert other_seed.token_ids != alone.token_ids


def test_top_k_one_is_greedy(llm):
    [greedy] = llm.generate("The sky is", GREEDY)
    [top1] = llm.generate("The sky is", SamplingParams(max_tokens=24, temperature=1.0, top_k=1))
    assert top1.token_ids == greedy.token_ids


def test_logit_bias_forces_a_token(llm):
    forced = llm.tokenizer.encode(" banana", add_special_tokens=False)[0]
    [out] = llm.generate(
        "The sky is", SamplingParams(max_tokens=4, temperature=0, logit_bias={forced: 100.0})
    )
    assert out.token_ids == [forced] * 4


def test_frequency_penalty_reduces_repetition(llm):
    prompt = "Repeat after me: la la la la la la"
    [plain] = llm.generate(prompt, SamplingParams(max_tokens=32, temperature=0, ignore_eos=True))
    [penalised] = llm.generate(
        prompt, SamplingParams(max_tokens=32, temperature=0, ignore_eos=True, frequency_penalty=2.0)
    )
    assert max(Counter(penalised.token_ids).values()) < max(Counter(plain.token_ids).values())


def test_abort_in_every_phase_frees_all_blocks(llm):
    engine = llm.engine
    decoding = engine.add_request("Hi", GREEDY)
    while not engine.requests[decoding].output_token_ids:
        engine.step()
    prefilling = engine.add_request(list(range(1000, 2500)), GREEDY)
    engine.step()  # one 255-token chunk of 1,500 (the decode takes 1 of the 256 budget)
    waiting = engine.add_request(list(range(3000, 4500)), GREEDY)
    assert engine.requests[decoding].num_output_tokens >= 1
    assert 0 < engine.requests[prefilling].num_computed_tokens < 1500
    assert engine.requests[waiting].status == RequestStatus.WAITING
    assert engine.kv.pool.num_used_blocks > 0
    for rid in (waiting, prefilling, decoding):
        engine.abort_request(rid)
        engine.check_invariants()
    reasons = {o.request_id: o.finish_reason for o in engine.step()}
    assert reasons == {waiting: "abort", prefilling: "abort", decoding: "abort"}


@pytest.mark.parametrize(
    ("prompt", "params", "message"),
    [
        ([], GREEDY, "empty"),
        ([5, 10, 10**6], GREEDY, "outside the vocabulary"),
        ([5] * 9000, GREEDY, "at most 8191"),
        ([5], SamplingParams(max_tokens=10**6), "exceeds the room left"),
        ([5], SamplingParams(stop_token_ids=[10**6]), "stop_token_ids"),
    ],
)
def test_bad_requests_are_refused_and_leave_nothing_behind(llm, prompt, params, message):
    with pytest.raises(InvalidRequestError, match=message):
        llm.generate([prompt], params)
    assert llm.generate("Hi", SamplingParams(max_tokens=2))[0].finish_reason is not None


def test_bfloat16_default_generates_sensible_text():
    llm = LLM()  # the default: SmolLM2-135M-Instruct in bfloat16
    [out] = llm.chat(
        [{"role": "user", "content": "What is the capital of France?"}],
        SamplingParams(max_tokens=24, temperature=0),
    )
    assert "Paris" in out.text
