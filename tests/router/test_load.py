from __future__ import annotations

import random
from typing import Any

import pytest

from proto.tandem.internal.v1 import worker_pb2
from router.load import (
    DEFAULT_STEP_TIME_MODEL,
    InstanceLoad,
    LoadTracker,
    Role,
    StepSample,
    StepTimeModel,
)


def status(
    instance_id: str = "p0", role: str = "prefill", **fields: Any
) -> worker_pb2.InstanceStatus:
    defaults: dict[str, Any] = {"num_blocks": 200, "num_free_blocks": 150}
    return worker_pb2.InstanceStatus(instance_id=instance_id, role=role, **{**defaults, **fields})


def exact_samples(base: float, per_token: float, per_seq: float) -> list[StepSample]:
    shapes = [(512, 1), (512, 8), (300, 4), (64, 64), (17, 17), (200, 30), (1, 1), (450, 2)]
    return [StepSample(t, s, base + per_token * t + per_seq * s) for t, s in shapes]


# -- InstanceLoad ---------------------------------------------------------------------------


def test_a_load_is_read_from_a_status_reply() -> None:
    reply = status(
        "d1",
        "decode",
        num_running=5,
        num_waiting=2,
        num_reserved=1,
        num_queued_prefill_tokens=70,
        prefix_cache_queries=1000,
        prefix_cache_hits=250,
        max_num_batched_tokens=256,
        max_num_seqs=32,
    )
    load = InstanceLoad.from_status(reply, now=12.5)
    assert load == InstanceLoad(
        instance_id="d1",
        role=Role.DECODE,
        num_queued_prefill_tokens=70,
        num_running=5,
        num_waiting=3,  # the reserved request counts: its KV is arriving
        num_free_blocks=150,
        num_blocks=200,
        prefix_cache_queries=1000,
        prefix_cache_hits=250,
        updated_at=12.5,
        max_num_batched_tokens=256,
        max_num_seqs=32,
    )
    assert load.kv_usage == pytest.approx(0.25)
    assert load.prefix_cache_hit_rate == pytest.approx(0.25)
    assert InstanceLoad("x", Role.PREFILL).kv_usage == 0.0  # size unknown


def test_a_status_with_an_unknown_role_is_refused() -> None:
    with pytest.raises(ValueError, match="reports role 'worker'; a worker must be one of"):
        InstanceLoad.from_status(status(role="worker"), now=0.0)


# -- StepTimeModel ----------------------------------------------------------------------------


def test_the_fit_recovers_tokens_and_sequences_terms() -> None:
    model = StepTimeModel.fit(exact_samples(0.005, 3e-4, 2e-3))
    assert (model.base_s, model.per_token_s, model.per_seq_s) == pytest.approx(
        (0.005, 3e-4, 2e-3), rel=1e-6
    )
    assert model.num_samples == 8
    assert model.predict(1000, 10) == pytest.approx(0.005 + 0.3 + 0.02)


def test_the_fit_is_close_on_noisy_samples() -> None:
    rng = random.Random(0)
    samples = []
    for _ in range(256):
        tokens, seqs = rng.randint(1, 512), rng.randint(1, 64)
        seconds = (0.01 + 2e-4 * tokens + 1e-3 * seqs) * rng.uniform(0.95, 1.05)
        samples.append(StepSample(tokens, seqs, seconds))
    model = StepTimeModel.fit(samples)
    assert model.predict(512, 1) == pytest.approx(0.01 + 2e-4 * 512 + 1e-3, rel=0.05)
    assert model.predict(16, 64) == pytest.approx(0.01 + 2e-4 * 16 + 64e-3, rel=0.05)


def test_the_fit_drops_the_terms_the_samples_cannot_pin_down() -> None:
    # One sequence per step: no per-sequence term, the token line only.
    line = [StepSample(t, 1, 0.02 + 1e-4 * t) for t in (16, 64, 128, 512)]
    model = StepTimeModel.fit(line)
    assert (model.base_s, model.per_token_s, model.per_seq_s) == pytest.approx((0.02, 1e-4, 0))
    # Every step the same size: the fallback's slope, through the observed mean.
    same = [StepSample(100, 1, 0.05)] * 5
    fallback = StepTimeModel(base_s=0.01, per_token_s=1e-4)
    model = StepTimeModel.fit(same, fallback)
    assert model.predict(100) == pytest.approx(0.05)
    assert model.per_token_s == pytest.approx(1e-4)
    # A line with a negative intercept goes through the origin instead.
    steep = [StepSample(t, 1, 1e-3 * t - 0.01) for t in (20, 40, 60, 80)]
    model = StepTimeModel.fit(steep)
    assert model.base_s == 0 and model.per_token_s > 0 and model.predict(1) > 0


def test_too_few_or_empty_steps_keep_the_fallback() -> None:
    assert StepTimeModel.fit(exact_samples(0.005, 3e-4, 2e-3)[:3]) is DEFAULT_STEP_TIME_MODEL
    empty = [StepSample(0, 0, 0.001)] * 10
    assert StepTimeModel.fit(empty) is DEFAULT_STEP_TIME_MODEL
    mine = StepTimeModel(0.5, 0.5)
    assert StepTimeModel.fit([], fallback=mine) is mine


# -- LoadTracker ----------------------------------------------------------------------------


def test_a_load_older_than_max_age_is_unknown() -> None:
    tracker = LoadTracker(max_age_s=5.0)
    assert tracker.current("p0", now=0.0) is None and tracker.get("p0") is None
    tracker.update("p0", status(num_queued_prefill_tokens=40), now=10.0)
    current = tracker.current("p0", now=15.0)
    assert current is not None and current.num_queued_prefill_tokens == 40
    assert tracker.current("p0", now=15.01) is None
    stale = tracker.get("p0")  # still there, as reported
    assert stale is not None and stale.updated_at == 10.0
    tracker.update("p0", status(num_queued_prefill_tokens=0), now=20.0)
    assert tracker.current("p0", now=21.0) is not None
    tracker.forget("p0")
    assert tracker.get("p0") is None and tracker.step_model("p0") is None
    with pytest.raises(ValueError, match="max_age_s must be > 0"):
        LoadTracker(max_age_s=0)


def test_dispatches_count_until_a_later_status_or_their_finish() -> None:
    tracker = LoadTracker()
    tracker.update("p0", status(num_queued_prefill_tokens=100, num_waiting=1), now=0.0)
    tracker.on_dispatch("p0", "r1", 300, now=1.0)
    tracker.on_dispatch("p0", "r2", 50, now=2.0)
    load = tracker.current("p0", now=2.0)
    assert load is not None
    assert (load.num_queued_prefill_tokens, load.num_waiting) == (450, 3)
    tracker.on_finish("p0", "r2")
    tracker.on_finish("p0", "unknown")  # ignored
    load = tracker.current("p0", now=2.0)
    assert load is not None and load.num_queued_prefill_tokens == 400
    # A Status sent at 1.5 includes r1 (sent at 1.0) but not r3 (sent at 1.7).
    tracker.on_dispatch("p0", "r3", 20, now=1.7)
    tracker.update("p0", status(num_queued_prefill_tokens=300), now=1.5)
    load = tracker.current("p0", now=2.0)
    assert load is not None and load.num_queued_prefill_tokens == 320
    assert tracker.num_pending("p0") == 1
    raw = tracker.get("p0")
    assert raw is not None and raw.num_queued_prefill_tokens == 300


def test_a_dispatch_to_a_decode_instance_counts_as_a_waiting_request() -> None:
    tracker = LoadTracker()
    tracker.update("d0", status("d0", "decode", num_running=2), now=0.0)
    tracker.on_dispatch("d0", "r1", 300, now=0.5)
    load = tracker.current("d0", now=1.0)
    assert load is not None
    assert (load.num_running, load.num_waiting, load.num_queued_prefill_tokens) == (2, 1, 0)


def test_the_tracker_fits_each_instances_step_time() -> None:
    tracker = LoadTracker()
    samples = [
        worker_pb2.StepSample(
            num_batched_tokens=s.num_batched_tokens, num_seqs=s.num_seqs, seconds=s.seconds
        )
        for s in exact_samples(0.004, 5e-4, 0.0)
    ]
    tracker.update("p0", status(step_samples=samples), now=0.0)
    tracker.update("p1", status("p1"), now=0.0)
    fitted = tracker.step_model("p0")
    assert fitted is not None and fitted.predict(100) == pytest.approx(0.004 + 0.05)
    assert tracker.step_model("p1") is DEFAULT_STEP_TIME_MODEL


def test_a_reply_from_another_instance_is_refused() -> None:
    with pytest.raises(ValueError, match="names 'p1'; two workers may share an address"):
        LoadTracker().update("p0", status("p1"), now=0.0)
