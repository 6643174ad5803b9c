"""Router against fake workers over real gRPC: ordering, failures, aborts, stream breaks."""

from __future__ import annotations

import contextlib

import pytest

from proto.tandem.internal.v1 import worker_pb2
from router.config import RouterConfig
from router.core import Router
from router.errors import NoInstanceError, RouterStartError
from tests.router.fakes import MODEL_ID, VOCAB, fake_workers, started_router, wait_until

pytestmark = pytest.mark.anyio

PROMPT = [VOCAB[w] for w in ("the", "cat", "sat", "on", "a", "mat")]


def params(max_tokens: int = 16) -> worker_pb2.SamplingParams:
    return worker_pb2.SamplingParams(max_tokens=max_tokens, temperature=0.0, top_p=1.0)


async def run(router: Router, prompt: list[int], max_tokens: int = 16):
    return [d async for d in router.generate(prompt, params(max_tokens))]


def tokens(deltas) -> list[int]:
    return [t for d in deltas for t in d.token_ids]


async def test_disaggregated_request_streams_every_token_once_in_order() -> None:
    async with fake_workers("prefill", "decode") as (p, d), started_router([p, d]) as router:
        deltas = await run(router, PROMPT)
        assert [x.index for x in deltas] == list(range(len(PROMPT)))
        assert tokens(deltas) == PROMPT
        assert deltas[-1].finished and deltas[-1].finish_reason == "stop"
        assert "".join(x.text for x in deltas) == " the cat sat on a mat"
        assert p.prompts == [PROMPT] and d.prompts == []
        assert p.aborted == [] and d.aborted == []  # finished normally: nothing to abort
        assert router.num_in_flight == 0


async def test_decode_tokens_that_race_ahead_of_the_first_token_wait_for_it() -> None:
    async with fake_workers("prefill", "decode") as (p, d), started_router([p, d]) as router:
        p.knobs.decode_first = True
        deltas = await run(router, PROMPT)
        assert [x.index for x in deltas] == list(range(len(PROMPT)))
        assert tokens(deltas) == PROMPT


async def test_a_first_token_that_finishes_needs_nothing_from_decode() -> None:
    async with fake_workers("prefill", "decode") as (p, d), started_router([p, d]) as router:
        deltas = await run(router, PROMPT, max_tokens=1)
        assert len(deltas) == 1 and deltas[0].finish_reason == "length"
        assert tokens(deltas) == PROMPT[:1]


async def test_handoffs_are_recorded_per_request_and_in_total() -> None:
    async with fake_workers("prefill", "decode") as (p, d), started_router([p, d]) as router:
        first = await run(router, PROMPT)
        await run(router, PROMPT[:2])
        await wait_until(lambda: router.handoffs.num_handoffs == 2)
        records = router.handoffs.recent()
        assert [r.kv_bytes for r in records] == [6000, 2000]
        assert records[0].request_id == first[0].request_id
        assert (records[0].prefill_id, records[0].decode_id) == ("prefill-0", "decode-1")
        summary = router.handoffs.summary()
        assert summary["kv_bytes_total"] == 8000 and summary["kv_bytes_per_request"] == 4000
        assert summary["seconds_per_request"] == pytest.approx(0.5)


async def test_a_failed_handoff_ends_the_request_with_a_clear_error_and_aborts_both_sides() -> None:
    async with fake_workers("prefill", "decode") as (p, d), started_router([p, d]) as router:
        p.knobs.fail_handoff = True
        deltas = await run(router, PROMPT)
        assert deltas[-1].finish_reason == "error"
        assert "could not hand the request to decode instance 'decode-1'" in deltas[-1].error
        assert "decode instance unreachable" in deltas[-1].error
        request_id = deltas[0].request_id
        await wait_until(lambda: p.aborted == [request_id] and d.aborted == [request_id])


async def test_closing_the_generator_early_aborts_on_prefill_and_decode() -> None:
    async with fake_workers("prefill", "decode") as (p, d), started_router([p, d]) as router:
        d.knobs.step_s = 0.05
        async with contextlib.aclosing(router.generate(PROMPT, params())) as deltas:
            first = await anext(deltas)
        await wait_until(lambda: p.aborted == [first.request_id] == d.aborted)
        assert router.num_in_flight == 0


async def test_colocated_request_gets_all_its_tokens_from_the_stream() -> None:
    async with fake_workers("colocated") as (c,), started_router([c]) as router:
        deltas = await run(router, PROMPT, max_tokens=4)
        assert tokens(deltas) == PROMPT[:4] and deltas[-1].finish_reason == "length"
        assert c.prompts == [PROMPT]


async def test_a_broken_token_stream_fails_its_requests_then_reconnects() -> None:
    async with fake_workers("prefill", "decode") as (p, d), started_router([p, d]) as router:
        d.knobs.step_s = 0.05
        async with contextlib.aclosing(router.generate(PROMPT, params())) as deltas:
            first = await anext(deltas)
            d.break_streams()
            rest = [x async for x in deltas]
        assert rest[-1].finish_reason == "error"
        assert "lost the token stream of decode instance 'decode-1'" in rest[-1].error
        assert "UNAVAILABLE: the worker is restarting" in rest[-1].error
        await wait_until(lambda: first.request_id in d.aborted)
        await wait_until(lambda: d.is_subscribed(router.config.router_id))
        await wait_until(lambda: router._instances["decode-1"].healthy)
        assert tokens(await run(router, PROMPT)) == PROMPT


def retried(router: Router, reason: str) -> float:
    text = router.metrics.render()[0].decode()
    (line,) = [
        x
        for x in text.splitlines()
        if x.startswith("tandem:requests_retried_total{") and f'reason="{reason}"' in x
    ]
    return float(line.rsplit(" ", 1)[1])


async def test_a_lost_decode_instance_s_requests_resume_on_another_from_their_last_token() -> None:
    async with (
        fake_workers("prefill", "decode", "decode") as (p, d1, d2),
        started_router([p, d1, d2]) as router,
    ):
        d1.knobs.step_s = d2.knobs.step_s = 0.05
        async with contextlib.aclosing(router.generate(PROMPT, params())) as deltas:
            got = [await anext(deltas), await anext(deltas), await anext(deltas)]
            d1.break_streams()  # what the router sees when a decode worker dies
            got += [x async for x in deltas]
        assert [x.index for x in got] == list(range(len(PROMPT))), "a token lost or repeated"
        assert tokens(got) == PROMPT and got[-1].finish_reason == "stop"
        # Sent again, prompt plus the tokens streamed before the loss, to the other decode
        # instance (the prefill instance recomputes them).
        assert p.prompts == [PROMPT, PROMPT]
        assert p.resumed[0] == [] and p.resumed[1] == PROMPT[: len(p.resumed[1])]
        assert 3 <= len(p.resumed[1]) <= 4
        assert retried(router, "decode_lost") == 1 and retried(router, "prefill_lost") == 0
        await wait_until(lambda: router.num_in_flight == 0)


async def test_a_dead_prefill_instance_s_requests_go_to_another() -> None:
    async with (
        fake_workers("prefill", "prefill", "decode") as (p1, p2, d),
        started_router([p1, p2, d]) as router,
    ):
        await p1.server.stop(None)
        results = [await run(router, PROMPT) for _ in range(4)]
        assert all(tokens(r) == PROMPT and r[-1].finish_reason == "stop" for r in results)
        assert len(p2.prompts) == 4 and all(r == [] for r in p2.resumed)
        # The first found it dead and was resumed; the rest were routed around it.
        assert retried(router, "prefill_lost") == 1
        assert not router._instances["prefill-0"].healthy


async def test_a_handoff_the_decode_side_reports_broken_resumes_on_another_prefill() -> None:
    async with (
        fake_workers("prefill", "prefill", "decode") as (p1, p2, d),
        started_router([p1, p2, d]) as router,
    ):
        p1.knobs.handoff_broken = True
        deltas = await run(router, PROMPT)
        assert tokens(deltas) == PROMPT and deltas[-1].finish_reason == "stop"
        assert len(p1.prompts) == 1 and len(p2.prompts) == 1
        assert retried(router, "prefill_lost") == 1


async def test_a_request_resumed_max_retries_times_then_fails_with_the_reason() -> None:
    async with (
        fake_workers("prefill", "decode", "decode") as (p, d1, d2),
        started_router([p, d1, d2], max_retries=1) as router,
    ):
        d1.knobs.step_s = d2.knobs.step_s = 0.05
        async with contextlib.aclosing(router.generate(PROMPT, params())) as deltas:
            got = [await anext(deltas), await anext(deltas)]
            d1.break_streams()
            await wait_until(lambda: len(p.prompts) == 2)
            await anext(deltas)
            d2.break_streams()
            got += [x async for x in deltas]
        assert got[-1].finish_reason == "error"
        assert "lost the token stream of decode instance 'decode-2'" in got[-1].error
        assert "(resumed 1 times)" in got[-1].error
        assert retried(router, "decode_lost") == 1


async def test_no_healthy_decode_instance_is_a_no_instance_error() -> None:
    async with fake_workers("prefill", "decode") as (p, d), started_router([p, d]) as router:
        router._instances["decode-1"].stream_open.clear()
        with pytest.raises(NoInstanceError, match="healthy instances are: prefill"):
            await run(router, PROMPT)


async def test_status_gathers_every_worker_and_the_handoffs() -> None:
    async with fake_workers("prefill", "decode") as (p, d), started_router([p, d]) as router:
        await run(router, PROMPT)
        status = await router.status()
        assert [i["instance_id"] for i in status["instances"]] == ["prefill-0", "decode-1"]
        decode = status["instances"][1]
        assert decode["reachable"] and decode["healthy"] and decode["num_free_blocks"] == 60
        assert decode["kv_bytes_sent"] == 2**40 and decode["links"][0]["bytes_sent"] == 7
        assert status["handoffs"]["num_handoffs"] == 1 and status["model"] == MODEL_ID
        await p.server.stop(None)
        status = await router.status()
        assert not status["instances"][0]["reachable"]
        assert "UNAVAILABLE" in status["instances"][0]["error"]


async def test_start_names_an_unreachable_worker() -> None:
    router = Router(["127.0.0.1:1"], config=RouterConfig(connect_timeout_s=0.2))
    with pytest.raises(RouterStartError, match=r"127\.0\.0\.1:1 .*is it running"):
        await router.start()
