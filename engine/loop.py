"""An engine on its own thread: steps while there is work, runs calls between steps.

Workers serve RPCs on many threads, but an LLMEngine is single-threaded. Every RPC
that touches the engine goes through `call` (or `submit`), which runs it on the
loop thread between two steps; the loop hands each step's outputs to `on_outputs`
and then runs `after_step` (where a prefill worker ships the KV blocks the step
finished).

    while running:
        run every queued call
        if the engine has work: outputs = engine.step(); on_outputs(outputs); after_step()
        else: sleep until a call arrives

A worker builds its engine on the loop's thread (`EngineLoop.spawn`): the engine's
construction and its steps then share one OpenMP team (engine/threads.py says why that
matters).

Each step that ran a batch leaves a StepSample (tokens, requests, seconds) in a ring of
the last `max_step_samples`; workers report them in Status so a router can fit how
long a step of n tokens takes on this instance.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, TypeVar

from engine.engine import LLMEngine
from engine.outputs import RequestOutput
from engine.parallel import TensorParallelError
from engine.scheduler import SchedulerOutput

logger = logging.getLogger(__name__)

T = TypeVar("T")

DEFAULT_MAX_STEP_SAMPLES = 256
EXIT_GROUP_BROKEN = 70  # the process's exit status when its tensor-parallel group broke


@dataclass(frozen=True)
class StepSample:
    """One engine step that ran a batch. Field names match worker.proto's StepSample."""

    num_batched_tokens: int
    num_seqs: int  # requests with tokens in the step
    num_prefill_tokens: int  # of num_batched_tokens, those that are not decode tokens
    seconds: float
    end_time: float  # time.time() when the step ended


def _ignore_outputs(outputs: list[RequestOutput]) -> None:
    pass


class EngineLoop:
    def __init__(
        self,
        engine: LLMEngine,
        on_outputs: Callable[[list[RequestOutput]], None] = _ignore_outputs,
        after_step: Callable[[], None] | None = None,
        max_step_samples: int = DEFAULT_MAX_STEP_SAMPLES,
    ) -> None:
        self.engine = engine
        self._on_outputs = on_outputs
        self._after_step = after_step
        self._calls: queue.Queue[tuple[Callable[[], Any], Future[Any]] | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)
        self._running = False
        self._stepping = False  # start() has been called: the loop steps the engine
        self.num_steps = 0
        self.busy_seconds = 0.0
        self._samples: deque[StepSample] = deque(maxlen=max_step_samples)
        self._samples_lock = threading.Lock()  # appended on the loop thread, read by RPCs

    @classmethod
    def spawn(
        cls, make_engine: Callable[[], LLMEngine], max_step_samples: int = DEFAULT_MAX_STEP_SAMPLES
    ) -> EngineLoop:
        """Starts a loop's thread and builds its engine there with make_engine(), so that
        the engine's construction and its steps share one OpenMP team. The loop runs calls
        but no steps until `attach` and `start`. Raises what make_engine raised."""
        loop = cls(None, max_step_samples=max_step_samples)  # type: ignore[arg-type]
        loop._running = True
        loop._thread.start()
        try:
            loop.engine = loop.call(make_engine, timeout=None)
        except BaseException:
            loop._end_thread()
            raise
        return loop

    def attach(
        self,
        on_outputs: Callable[[list[RequestOutput]], None],
        after_step: Callable[[], None] | None = None,
    ) -> EngineLoop:
        """Sets where each step's outputs go (before `start`); returns the loop."""
        self._on_outputs = on_outputs
        self._after_step = after_step
        return self

    def start(self) -> None:
        self._stepping = True
        if self._thread.is_alive():
            self.submit(lambda: None)  # wakes a spawned loop waiting for calls
        else:
            self._running = True
            self._thread.start()

    def stop(self) -> None:
        self._end_thread()
        self.engine.close()

    def _end_thread(self) -> None:
        self._running = False
        self._calls.put(None)
        self._thread.join(timeout=10)

    def submit(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> Future[T]:
        """Runs fn(*args, **kwargs) on the loop thread before the next step."""
        future: Future[T] = Future()
        self._calls.put((lambda: fn(*args, **kwargs), future))
        return future

    def call(
        self, fn: Callable[..., T], *args: Any, timeout: float | None = 30.0, **kwargs: Any
    ) -> T:
        """submit() and wait: returns fn's result or raises its exception."""
        return self.submit(fn, *args, **kwargs).result(timeout)

    def step_samples(self) -> list[StepSample]:
        """The most recent steps that ran a batch, oldest first. Safe from any thread."""
        with self._samples_lock:
            return list(self._samples)

    def _run(self) -> None:
        while self._running:
            self._run_calls(block=not self._stepping or not self.engine.has_pending_steps())
            if not self._stepping:
                continue
            try:
                self.engine.check_group()
            except TensorParallelError:
                self._give_up()
            if not self._running or not self.engine.has_pending_steps():
                continue
            begin = time.perf_counter()
            try:
                outputs = self.engine.step()
            except TensorParallelError:
                self._give_up()
            except Exception:  # a bug, not a request's fault: keep serving the rest
                logger.exception("engine step failed")
                continue
            seconds = time.perf_counter() - begin
            self.num_steps += 1
            self.busy_seconds += seconds
            self._record(self.engine.last_batch, seconds)
            self._notify(self._on_outputs, outputs)
            if self._after_step is not None:
                self._notify(self._after_step)

    def _record(self, batch: SchedulerOutput, seconds: float) -> None:
        if batch.is_empty:  # only aborts were reported: no model work to time
            return
        sample = StepSample(
            num_batched_tokens=batch.num_batched_tokens,
            num_seqs=len(batch.scheduled),
            num_prefill_tokens=self._num_prefill_tokens(batch),
            seconds=seconds,
            end_time=time.time(),
        )
        with self._samples_lock:
            self._samples.append(sample)

    def _num_prefill_tokens(self, batch: SchedulerOutput) -> int:
        """Tokens of the step that are not decode tokens (one token past the prompt). A
        request that finished in the step is gone: its single token counts as a decode."""
        num = 0
        for item in batch.scheduled:
            request = self.engine.requests.get(item.request_id)
            prompt_len = request.num_prompt_tokens if request is not None else 0
            if len(item.token_ids) > 1 or item.start_pos < prompt_len:
                num += len(item.token_ids)
        return num

    @staticmethod
    def _give_up() -> None:
        """A rank of the model is gone: this process cannot step again. It exits, so the
        router recovers its requests elsewhere and Ray starts the instance anew."""
        logger.critical("the tensor-parallel group broke; the worker exits", exc_info=True)
        os._exit(EXIT_GROUP_BROKEN)

    def _run_calls(self, block: bool) -> None:
        try:
            item = self._calls.get(timeout=0.5) if block else self._calls.get_nowait()
        except queue.Empty:
            return
        while item is not None:
            fn, future = item
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn())
                except BaseException as exc:
                    future.set_exception(exc)
            try:
                item = self._calls.get_nowait()
            except queue.Empty:
                return

    @staticmethod
    def _notify(fn: Callable[..., None], *args: Any) -> None:
        try:
            fn(*args)
        except Exception:
            logger.exception("engine loop callback failed")
