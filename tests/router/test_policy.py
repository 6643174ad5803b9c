from __future__ import annotations

import pytest

from router.errors import NoInstanceError
from router.policy import Candidate, Role, RoundRobinPolicy, Route, make_policy

P0, P1 = Candidate("p0", Role.PREFILL), Candidate("p1", Role.PREFILL)
D0, D1, D2 = (Candidate(f"d{i}", Role.DECODE) for i in range(3))
C0 = Candidate("c0", Role.COLOCATED)


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
    assert policy.choose(10, [P0, D0, C0]) == Route(decode_id="d0", prefill_id="p0")


def test_no_route_names_what_is_missing() -> None:
    with pytest.raises(NoInstanceError, match="healthy instances are: prefill"):
        RoundRobinPolicy().choose(10, [P0, P1])
    with pytest.raises(NoInstanceError, match="healthy instances are: none"):
        RoundRobinPolicy().choose(10, [])


def test_policies_are_made_by_name() -> None:
    assert isinstance(make_policy("round_robin"), RoundRobinPolicy)
    with pytest.raises(ValueError, match="known: round_robin"):
        make_policy("fastest")
