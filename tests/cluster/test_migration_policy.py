"""The migration scheduler's plans on hand-made snapshots: balance, thresholds, draining."""

from __future__ import annotations

import pytest

from cluster.migration_policy import (
    BalancePolicy,
    DecodeInstance,
    Move,
    RunningRequest,
    make_policy,
)


def instance(name: str, used: int, demand: int = 0, draining: bool = False) -> DecodeInstance:
    return DecodeInstance(name, 100, used, demand, draining)


def test_the_most_loaded_gives_its_smallest_requests_to_the_least_loaded_until_balanced():
    instances = [instance("a", 80), instance("b", 10), instance("c", 40)]
    requests = [
        RunningRequest("big", "a", 40),
        RunningRequest("small", "a", 10),
        RunningRequest("mid", "a", 30),
        RunningRequest("other", "c", 40),
    ]
    moves = BalancePolicy(threshold=0.2).plan(instances, requests)
    # a 0.8 / b 0.1: "small" (10) then "mid" (30) go to b; then a 0.4, b 0.5, c 0.4.
    assert moves == [Move("small", "a", "b"), Move("mid", "a", "b")]


def test_no_move_within_the_threshold_or_when_a_move_would_overshoot():
    balanced = [instance("a", 50), instance("b", 35)]
    assert BalancePolicy(0.2).plan(balanced, [RunningRequest("r", "a", 5)]) == []
    lopsided = [instance("a", 60), instance("b", 20)]
    only_big = [RunningRequest("r", "a", 45)]  # 45 blocks over a 40-block gap: a wider one
    assert BalancePolicy(0.2).plan(lopsided, only_big) == []


def test_a_move_leaves_the_destination_headroom_to_grow_into():
    instances = [instance("a", 100), instance("b", 75)]  # 25 blocks free on b
    fits = [RunningRequest("r", "a", 10)]  # b keeps 15 free: more than 10% of 100
    assert BalancePolicy(0.2, headroom=0.1).plan(instances, fits) == [Move("r", "a", "b")]
    too_big = [RunningRequest("r", "a", 20)]  # b would keep 5
    assert BalancePolicy(0.2, headroom=0.1).plan(instances, too_big) == []
    assert BalancePolicy(0.2, headroom=0.0).plan(instances, too_big) == [Move("r", "a", "b")]


def test_queued_demand_counts_as_load():
    instances = [instance("a", 30, demand=50), instance("b", 30)]
    moves = BalancePolicy(0.2).plan(instances, [RunningRequest("r", "a", 10)])
    assert moves == [Move("r", "a", "b")]


def test_a_draining_instance_is_emptied_onto_instances_with_room_and_never_filled():
    instances = [instance("a", 30, draining=True), instance("b", 95), instance("c", 50)]
    requests = [RunningRequest("r1", "a", 10), RunningRequest("r2", "a", 20)]
    moves = BalancePolicy(0.2, max_moves=8).plan(instances, requests)
    assert moves == [Move("r1", "a", "c"), Move("r2", "a", "c")]  # b has no room
    assert BalancePolicy(0.2).plan([instance("a", 0), instance("d", 90, draining=True)], []) == []


def test_max_moves_bounds_a_round_and_bad_settings_are_refused():
    instances = [instance("a", 90), instance("b", 0)]
    requests = [RunningRequest(f"r{i}", "a", 5) for i in range(9)]
    assert len(BalancePolicy(0.1, max_moves=3).plan(instances, requests)) == 3
    assert make_policy("off").plan(instances, requests) == []
    with pytest.raises(ValueError, match="threshold"):
        BalancePolicy(threshold=0)
    with pytest.raises(ValueError, match="choose one of"):
        make_policy("llumnix")
