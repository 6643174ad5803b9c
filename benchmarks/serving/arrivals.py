"""Arrival schedules: when each request is sent, relative to the start of a run."""

from __future__ import annotations

import numpy as np


def arrival_times(num: int, rate: float, burstiness: float = 1.0, seed: int = 0) -> list[float]:
    """Send times (seconds from the start) of `num` requests arriving at `rate` per
    second on average. Gaps are gamma-distributed with shape `burstiness` and mean
    1/rate: burstiness 1 is a Poisson process, below 1 burstier, above 1 more even.
    The first request goes at time 0. The same arguments give the same schedule."""
    if num < 1:
        raise ValueError(f"num must be >= 1, got {num}")
    if rate <= 0 or burstiness <= 0:
        raise ValueError("rate and burstiness must be > 0")
    rng = np.random.default_rng(seed)
    gaps = rng.gamma(shape=burstiness, scale=1.0 / (rate * burstiness), size=num - 1)
    return [0.0, *np.cumsum(gaps).tolist()]
