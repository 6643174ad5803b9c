from __future__ import annotations

from typing import Any

import pytest

from proto.tandem.internal.v1 import worker_pb2
from router.errors import NoInstanceError
from router.load import InstanceLoad, LoadTracker, StepTimeModel
from router.policy import (
    Candidate,
    LeastLoadedPolicy,
    PrefixAwarePolicy,
    Role,
    RoundRobinPolicy,
    Route,
    RouteRequest,
    SloAwarePolicy,
    make_policy,
    prefix_hashes,
)

P0, P1 = Candidate("p0", Role.PREFILL), Candidate("p1", Role.PREFILL)
D0, D1, D2 = (Candidate(f"d{i}", Role.DECODE) for i in range(3))
C0 = Candidate("c0", Role.COLOCATED)


def loaded(
    instance_id: str,
    role: Role,
    num_in_flight: int = 0,
    step_model: StepTimeModel | None = None,
    kv_usage: float = 0.0,
    **fields: Any,
) -> Candidate:
    """A candidate with a known load: 100 blocks, a 512-token budget, 64 sequences."""
    load = InstanceLoad(
        instance_id,
        role,
        num_blocks=100,
        num_free_blocks=round(100 * (1 - kv_usage)),
        max_num_batched_tokens=512,
        max_num_seqs=64,
        **fields,
    )
    return Candidate(instance_id, role, num_in_flight, load, step_model)


def prompt(*pieces: tuple[int, int]) -> RouteRequest:
    """A prompt made of (first token id, count) runs of consecutive ids."""
    return RouteRequest([t for start, n in pieces for t in range(start, start + n)])


# -- round robin and the common contract ----------------------------------------------------


def test_round_robin_turns_through_each_pool_on_its_own() -> None:
    policy = RoundRobinPolicy()
    routes = [policy.choose(10, [P0, P1, D0, D1, D2]) for _ in range(4)]
    assert routes == [
        Route(decode_id="d0", prefill_id="p0"),
        Route(decode_id="d1", prefill_id="p1"),
        Route(decode_id="d2", prefill_id="p0"),
        Route(decode_id="d0", prefill_id="p1"),
    ]
    assert all(r.disaggregated for r in routes)


def test_colocated_instances_serve_when_there_is_no_prefill_decode_pair() -> None:
    policy = RoundRobinPolicy()
    assert policy.choose(10, [P0, C0]) == Route(decode_id="c0")
    assert policy.choose(RouteRequest([1, 2]), [P0, D0, C0]) == Route("d0", "p0")


@pytest.mark.parametrize("name", ["round_robin", "least_loaded", "prefix_aware", "slo_aware"])
def test_no_route_names_what_is_missing(name: str) -> None:
    with pytest.raises(NoInstanceError, match="healthy instances are: prefill"):
        make_policy(name).choose(RouteRequest([1, 2, 3]), [P0, P1])
    with pytest.raises(NoInstanceError, match="healthy instances are: decode"):
        make_policy(name).choose(10, [loaded("d0", Role.DECODE)])
    with pytest.raises(NoInstanceError, match="healthy instances are: none"):
        make_policy(name).choose(10, [])


def test_policies_are_made_by_name_with_their_options() -> None:
    assert isinstance(make_policy("round_robin"), RoundRobinPolicy)
    assert make_policy("prefix_aware", block_size=4).block_size == 4  # type: ignore[attr-defined]
    assert make_policy("slo_aware", chunk_tokens=256).chunk_tokens == 256  # type: ignore[attr-defined]
    with pytest.raises(ValueError, match="known: least_loaded, prefix_aware, round_robin, slo"):
        make_policy("fastest")
    with pytest.raises(ValueError, match="no option chunk_size; its options are: chunk_tokens"):
        make_policy("slo_aware", chunk_size=256)
    with pytest.raises(ValueError, match="overload_factor must be >= 1"):
        make_policy("prefix_aware", overload_factor=0.5)


def test_a_route_request_has_token_ids_or_a_length() -> None:
    assert RouteRequest([5, 6, 7]).num_prompt_tokens == 3
    assert RouteRequest(num_tokens=40).num_prompt_tokens == 40
    with pytest.raises(ValueError, match="exactly one"):
        RouteRequest()
    with pytest.raises(ValueError, match="exactly one"):
        RouteRequest([1], num_tokens=1)


# -- least loaded -------------------------------------------------------------------------


def test_least_loaded_prefill_follows_the_queued_prompt_tokens() -> None:
    policy = LeastLoadedPolicy()
    d = loaded("d0", Role.DECODE)
    busy_p0 = [loaded("p0", Role.PREFILL, num_queued_prefill_tokens=900), d]
    busy_p0.insert(1, loaded("p1", Role.PREFILL, num_queued_prefill_tokens=50))
    assert policy.choose(10, busy_p0).prefill_id == "p1"
    busy_p1 = [loaded("p0", Role.PREFILL, num_queued_prefill_tokens=50), d]
    busy_p1.insert(1, loaded("p1", Role.PREFILL, num_queued_prefill_tokens=900))
    assert policy.choose(10, busy_p1).prefill_id == "p0"


def test_least_loaded_decode_weighs_kv_usage_and_running_requests() -> None:
    policy = LeastLoadedPolicy()
    p = loaded("p0", Role.PREFILL)
    full_kv = loaded("d0", Role.DECODE, kv_usage=0.8)
    light = loaded("d1", Role.DECODE, kv_usage=0.2)
    assert policy.choose(10, [p, full_kv, light]).decode_id == "d1"  # 0.8 vs 0.2
    crowded = loaded("d1", Role.DECODE, kv_usage=0.2, num_running=48)
    assert policy.choose(10, [p, full_kv, crowded]).decode_id == "d0"  # 0.8 vs 0.2 + 48/64


def test_least_loaded_colocated_combines_decode_load_and_prompt_backlog() -> None:
    policy = LeastLoadedPolicy(prefill_weight=0.1)
    backlog = loaded("c0", Role.COLOCATED, kv_usage=0.1, num_queued_prefill_tokens=5120)
    busy_kv = loaded("c1", Role.COLOCATED, kv_usage=0.5)
    assert policy.choose(10, [backlog, busy_kv]) == Route("c1")  # 0.1 + 0.1 * 10 vs 0.5
    drained = loaded("c0", Role.COLOCATED, kv_usage=0.1, num_queued_prefill_tokens=512)
    assert policy.choose(10, [drained, busy_kv]) == Route("c0")  # 0.1 + 0.1 * 1 vs 0.5


def test_least_loaded_without_loads_counts_the_requests_in_flight() -> None:
    policy = LeastLoadedPolicy()
    idle_by_load = loaded("p0", Role.PREFILL, num_in_flight=3)
    unknown = Candidate("p1", Role.PREFILL, num_in_flight=1)
    d = Candidate("d0", Role.DECODE)
    assert policy.choose(10, [idle_by_load, unknown, d]).prefill_id == "p1"
    assert policy.choose(10, [idle_by_load, Candidate("p1", Role.PREFILL, 5), d]).prefill_id == "p0"
    # Equal loads: the fewer in flight.
    even = [loaded("p0", Role.PREFILL, 2), loaded("p1", Role.PREFILL, 1), d]
    assert policy.choose(10, even).prefill_id == "p1"


def test_least_loaded_spreads_a_burst_between_two_polls() -> None:
    """Both instances reported idle; the tracker's pending dispatches spread the burst."""
    tracker = LoadTracker(max_age_s=5)
    for instance_id, role in (("p0", "prefill"), ("p1", "prefill"), ("d0", "decode")):
        tracker.update(instance_id, _status(instance_id, role), now=0.0)
    policy = LeastLoadedPolicy()
    chosen = []
    for n in range(4):
        candidates = [
            Candidate(instance_id, Role(role), 0, tracker.current(instance_id, now=1.0))
            for instance_id, role in (("p0", "prefill"), ("p1", "prefill"), ("d0", "decode"))
        ]
        route = policy.choose(RouteRequest(list(range(100 + n))), candidates)
        assert route.prefill_id is not None
        tracker.on_dispatch(route.prefill_id, f"r{n}", 100 + n, now=1.0)
        chosen.append(route.prefill_id)
    assert chosen == ["p0", "p1", "p0", "p1"]


def _status(instance_id: str, role: str) -> worker_pb2.InstanceStatus:
    return worker_pb2.InstanceStatus(
        instance_id=instance_id, role=role, num_blocks=100, num_free_blocks=100
    )


# -- prefix aware ---------------------------------------------------------------------------


def test_prefix_hashes_match_the_engines_prefix_cache() -> None:
    from engine.kv.cache_manager import hash_block

    token_ids = list(range(1000, 1050))
    expected, parent = [], None
    for i in range(3):  # (50 - 1) // 16 full blocks; the last token is never cached
        parent = hash_block(parent, token_ids[i * 16 : (i + 1) * 16])
        expected.append(parent)
    assert prefix_hashes(token_ids, 16) == expected
    assert prefix_hashes(token_ids[:16], 16) == []  # its last token leaves the block short


def test_prefix_aware_keeps_a_shared_prefix_on_one_instance() -> None:
    policy = PrefixAwarePolicy(overload_factor=2.0)
    d = loaded("d0", Role.DECODE)
    idle = [loaded("p0", Role.PREFILL), loaded("p1", Role.PREFILL), d]
    assert policy.choose(prompt((0, 64)), idle).prefill_id == "p0"
    # p0 is now busier, but 48 of the 64 tokens are cached there: 100 + 16 <= 2 * 64.
    busier_p0 = [
        loaded("p0", Role.PREFILL, num_queued_prefill_tokens=100),
        loaded("p1", Role.PREFILL),
        d,
    ]
    follow_up = prompt((0, 48), (500, 16))
    assert policy.num_matched_tokens(follow_up, "p0") == 48
    assert policy.num_matched_tokens(follow_up, "p1") == 0
    assert policy.choose(follow_up, busier_p0).prefill_id == "p0"
    assert LeastLoadedPolicy().choose(follow_up, busier_p0).prefill_id == "p1"
    # Without a match, the least loaded instance.
    assert policy.choose(prompt((9000, 64)), busier_p0).prefill_id == "p1"


def test_prefix_aware_leaves_an_overloaded_match_for_the_least_loaded() -> None:
    d = loaded("d0", Role.DECODE)

    def holding_on_p1(overload_factor: float) -> PrefixAwarePolicy:
        policy = PrefixAwarePolicy(overload_factor=overload_factor)
        policy.choose(prompt((0, 64)), [loaded("p1", Role.PREFILL), d])
        return policy

    def p1_queued(num_tokens: int) -> list[Candidate]:
        p1 = loaded("p1", Role.PREFILL, num_queued_prefill_tokens=num_tokens)
        return [loaded("p0", Role.PREFILL), p1, d]

    # Tokens to compute before the first token: 60 + (64 - 48) on p1, 64 on p0.
    assert holding_on_p1(2.0).choose(prompt((0, 64)), p1_queued(60)).prefill_id == "p1"
    assert holding_on_p1(1.1).choose(prompt((0, 64)), p1_queued(60)).prefill_id == "p0"
    assert holding_on_p1(2.0).choose(prompt((0, 64)), p1_queued(1000)).prefill_id == "p0"


def test_prefix_aware_prefers_the_longest_then_the_latest_match() -> None:
    policy = PrefixAwarePolicy(overload_factor=100.0)
    d = loaded("d0", Role.DECODE)

    def only(instance_id: str) -> list[Candidate]:
        return [loaded(instance_id, Role.PREFILL), d]

    policy.choose(prompt((0, 32), (100, 33)), only("p0"))  # 4 blocks on p0
    policy.choose(prompt((0, 32), (200, 33)), only("p1"))  # 2 shared blocks, now on p1 too
    # p1 is the least loaded: every choice of p0 below is the prefix's doing.
    both = [loaded("p0", Role.PREFILL, num_queued_prefill_tokens=10), loaded("p1", Role.PREFILL), d]
    assert policy.choose(prompt((0, 32), (100, 40)), both).prefill_id == "p0"  # 4 > 2 blocks
    # Only the shared 32 tokens match; p0 received them last (the request just above).
    assert policy.choose(prompt((0, 32), (300, 40)), both).prefill_id == "p0"
    assert policy.choose(prompt((0, 32), (200, 40)), both).prefill_id == "p1"
    assert policy.choose(prompt((0, 32), (400, 40)), both).prefill_id == "p1"


def test_prefix_aware_without_token_ids_is_least_loaded() -> None:
    policy = PrefixAwarePolicy()
    d = loaded("d0", Role.DECODE)
    policy.choose(prompt((0, 64)), [loaded("p0", Role.PREFILL), d])
    candidates = [
        loaded("p0", Role.PREFILL, num_queued_prefill_tokens=10),
        loaded("p1", Role.PREFILL),
        d,
    ]
    assert policy.choose(64, candidates).prefill_id == "p1"
    assert policy.choose(prompt((0, 64)), candidates).prefill_id == "p0"


def test_prefix_aware_on_colocated_instances_with_a_small_block_size() -> None:
    policy = PrefixAwarePolicy(block_size=4)
    assert policy.choose(prompt((0, 9)), [loaded("c0", Role.COLOCATED)]) == Route("c0")
    assert policy.num_matched_tokens(prompt((0, 9)), "c0") == 8
    busier = [loaded("c0", Role.COLOCATED, kv_usage=0.3), loaded("c1", Role.COLOCATED)]
    assert policy.choose(prompt((0, 9)), busier) == Route("c0")
    assert policy.choose(prompt((50, 9)), busier) == Route("c1")


def test_prefix_aware_forgets_the_least_recent_blocks() -> None:
    policy = PrefixAwarePolicy(max_blocks_per_instance=4)
    d = loaded("d0", Role.DECODE)
    policy.choose(prompt((0, 33)), [loaded("p0", Role.PREFILL), d])  # 2 blocks
    policy.choose(prompt((100, 49)), [loaded("p0", Role.PREFILL), d])  # 3 more: 1 evicted
    assert policy.num_matched_tokens(prompt((100, 49)), "p0") == 48
    assert policy.num_matched_tokens(prompt((0, 33)), "p0") == 32  # block 1 still there
    assert policy.num_matched_tokens(prompt((0, 17)), "p0") == 0  # block 0 evicted


# -- SLO aware ------------------------------------------------------------------------------

MODEL = StepTimeModel(base_s=0.01, per_token_s=0.001)


def test_slo_aware_predicts_ttft_from_queue_budget_and_step_time() -> None:
    policy = SloAwarePolicy()
    request = RouteRequest(num_tokens=24)
    queued = loaded("p0", Role.PREFILL, step_model=MODEL, num_queued_prefill_tokens=1000)
    # 1024 tokens = 2 full steps of 512 tokens.
    assert policy.predict_ttft(request, queued) == pytest.approx(2 * (0.01 + 0.512))
    idle = loaded("p0", Role.PREFILL, step_model=MODEL)
    assert policy.predict_ttft(request, idle) == pytest.approx(0.01 + 0.024)
    # Chunks of 256 tokens (an option): 4 full steps.
    assert SloAwarePolicy(chunk_tokens=256).predict_ttft(request, queued) == pytest.approx(
        4 * (0.01 + 0.256)
    )
    # A colocated instance's 256 running requests take half of each step's budget.
    busy = loaded("c0", Role.COLOCATED, step_model=MODEL, num_running=256)
    request = RouteRequest(num_tokens=300)
    assert policy.predict_ttft(request, busy) == pytest.approx(0.522 + (0.01 + 0.044 + 0.256))
    assert policy.predict_ttft(request, Candidate("p9", Role.PREFILL)) is None


def test_slo_aware_picks_the_lowest_predicted_ttft() -> None:
    policy = SloAwarePolicy()
    slow_model = StepTimeModel(base_s=0.01, per_token_s=0.01)
    d = loaded("d0", Role.DECODE)
    request = RouteRequest(num_tokens=100)
    idle_but_slow = loaded("p0", Role.PREFILL, step_model=slow_model)  # 1.01 s
    fast_but_queued = loaded(
        "p1", Role.PREFILL, step_model=MODEL, num_queued_prefill_tokens=600
    )  # 0.522 + 0.198 s
    route = policy.choose(request, [idle_but_slow, fast_but_queued, d])
    assert route == Route("d0", "p1")
    assert route.predicted_ttft_s == pytest.approx(0.72)
    assert (
        LeastLoadedPolicy().choose(request, [idle_but_slow, fast_but_queued, d]).prefill_id == "p0"
    )
    long_queue = loaded("p1", Role.PREFILL, step_model=MODEL, num_queued_prefill_tokens=2000)
    route = policy.choose(request, [idle_but_slow, long_queue, d])
    assert route.prefill_id == "p0" and route.predicted_ttft_s == pytest.approx(1.01)


def test_slo_aware_uses_the_fallback_model_and_in_flight_counts_when_it_must() -> None:
    policy = SloAwarePolicy(fallback_step_model=MODEL)
    request = RouteRequest(num_tokens=100)
    assert policy.predict_ttft(request, loaded("p0", Role.PREFILL)) == pytest.approx(0.11)
    d = loaded("d0", Role.DECODE)
    unknown = [loaded("p0", Role.PREFILL, 2), Candidate("p1", Role.PREFILL, 1), d]
    route = policy.choose(request, unknown)
    assert route.prefill_id == "p1" and route.predicted_ttft_s is None
