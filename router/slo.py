"""SLO classes and their attainment over a sliding window (DistServe's goodput view).

An SLO is a TTFT and a TPOT target. Each finished request of a configured class is
judged against both; SLOWindows keeps one deque of outcomes per class, pruned by
time, and is a Prometheus collector: the tandem:slo_* gauges are computed whenever
the registry is scraped. Failed requests and requests that got no token are misses
of both targets; a request with one token meets its TPOT target.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import TypedDict

from prometheus_client.metrics_core import GaugeMetricFamily, Metric


@dataclass(frozen=True)
class SLO:
    """A class of requests' latency targets: TTFT and TPOT in seconds, judged over the
    requests that ended in the last window_s seconds."""

    ttft_s: float
    tpot_s: float
    window_s: float = 60.0

    def __post_init__(self) -> None:
        for name in ("ttft_s", "tpot_s", "window_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"SLO.{name} must be > 0 seconds, got {getattr(self, name)!r}")


class Attainment(TypedDict):
    """The requests of one SLO class that ended in its window, and the fraction of them
    that met each target (None while there are none)."""

    num_requests: int
    ttft: float | None
    tpot: float | None
    both: float | None


@dataclass(frozen=True)
class _Outcome:
    time: float
    ttft_met: bool
    tpot_met: bool


class SLOWindows:
    """One deque of outcomes per configured SLO class, oldest first, pruned by time.
    A collector: the attainment gauges are computed whenever the registry is scraped."""

    def __init__(self, slo_classes: Mapping[str, SLO], clock: Callable[[], float]) -> None:
        self._slos = dict(slo_classes)
        self._clock = clock
        self._outcomes: dict[str, deque[_Outcome]] = {name: deque() for name in self._slos}
        self._lock = threading.Lock()  # render() may run on another thread

    def record(self, slo_class: str, now: float, ttft: float | None, tpot: float | None) -> None:
        """Judge one request: ttft None means it got no token (or failed): a miss of both;
        tpot None means it got one token: TPOT is met."""
        slo = self._slos.get(slo_class)
        if slo is None:
            return
        ttft_met = ttft is not None and ttft <= slo.ttft_s
        tpot_met = ttft is not None and (tpot is None or tpot <= slo.tpot_s)
        with self._lock:
            self._outcomes[slo_class].append(_Outcome(now, ttft_met, tpot_met))
            self._prune(slo_class, now)

    def attainment(self, slo_class: str, now: float | None = None) -> Attainment:
        if slo_class not in self._slos:
            raise ValueError(
                f"unknown SLO class {slo_class!r}; the configured ones are {sorted(self._slos)}"
            )
        now = self._clock() if now is None else now
        with self._lock:
            self._prune(slo_class, now)
            outcomes = list(self._outcomes[slo_class])
        n = len(outcomes)
        if n == 0:
            return Attainment(num_requests=0, ttft=None, tpot=None, both=None)
        return Attainment(
            num_requests=n,
            ttft=sum(o.ttft_met for o in outcomes) / n,
            tpot=sum(o.tpot_met for o in outcomes) / n,
            both=sum(o.ttft_met and o.tpot_met for o in outcomes) / n,
        )

    def collect(self) -> Iterator[Metric]:
        now = self._clock()
        families = {
            key: GaugeMetricFamily(f"tandem:slo_{key}", help_, labels=["slo_class"])
            for key, help_ in (
                ("num_requests", "Requests of the SLO class that ended in its window."),
                ("ttft_attainment", "Fraction of them whose TTFT met the target."),
                ("tpot_attainment", "Fraction of them whose TPOT met the target."),
                ("attainment", "Fraction of them that met both targets."),
            )
        }
        for slo_class in self._slos:
            result = self.attainment(slo_class, now)
            families["num_requests"].add_metric([slo_class], result["num_requests"])
            for key, value in (("ttft", result["ttft"]), ("tpot", result["tpot"])):
                if value is not None:
                    families[f"{key}_attainment"].add_metric([slo_class], value)
            if result["both"] is not None:
                families["attainment"].add_metric([slo_class], result["both"])
        yield from families.values()

    def _prune(self, slo_class: str, now: float) -> None:
        outcomes = self._outcomes[slo_class]
        oldest = now - self._slos[slo_class].window_s
        while outcomes and outcomes[0].time <= oldest:
            outcomes.popleft()
