"""Which thread builds and steps an engine, and with how many torch threads.

A worker's engine must be built and stepped on one thread, with its own thread count
however other threads set theirs (engine/threads.py): else the process holds a second
OpenMP team, or a step runs on one core.
"""

from __future__ import annotations

import threading
from concurrent import futures

import pytest
import torch

from cluster.worker_base import WorkerServicer, channel, start_server
from engine.config import EngineConfig
from engine.engine import LLMEngine
from engine.loop import EngineLoop
from engine.outputs import RequestOutput
from engine.sampling_params import SamplingParams
from engine.threads import run_torch_single_threaded
from proto.tandem.internal.v1 import worker_pb2 as pb
from proto.tandem.internal.v1 import worker_pb2_grpc

PARAMS = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)


def _config(model_path) -> EngineConfig:
    return EngineConfig(model=str(model_path), dtype="float32", num_blocks=32, num_threads=2)


class _Recorder:
    """Builds the engine, then notes the thread and torch's thread count of every layer
    the engine computes (its layer_listener runs inside the step)."""

    def __init__(self, model_path) -> None:
        self.model_path = model_path
        self.build_thread: int | None = None
        self.step_threads: set[int] = set()
        self.step_thread_counts: set[int] = set()
        self.finished = threading.Event()

    def make_engine(self) -> LLMEngine:
        self.build_thread = threading.get_ident()
        engine = LLMEngine(_config(self.model_path))
        engine.layer_listener = self.on_layer
        return engine

    def on_layer(self, batch: object, layer: int) -> None:
        self.step_threads.add(threading.get_ident())
        self.step_thread_counts.add(torch.get_num_threads())

    def on_outputs(self, outputs: list[RequestOutput]) -> None:
        if any(o.finished for o in outputs):
            self.finished.set()


def test_spawned_loop_builds_and_steps_on_its_thread_with_the_engines_thread_count(model_path):
    recorder = _Recorder(model_path)
    loop = EngineLoop.spawn(recorder.make_engine)
    try:
        assert recorder.build_thread == loop._thread.ident != threading.get_ident()
        # An RPC handler's thread sets one thread before the first step: torch's count
        # resets from the last one set, yet the engine's steps keep the engine's.
        with futures.ThreadPoolExecutor(1, initializer=run_torch_single_threaded) as pool:
            assert pool.submit(torch.get_num_threads).result() == 1
        loop.call(loop.engine.add_request, [1, 2, 3, 4, 5], PARAMS)
        assert not recorder.step_threads, "a spawned loop steps only once started"
        loop.attach(recorder.on_outputs).start()
        assert recorder.finished.wait(60)
        assert recorder.step_threads == {recorder.build_thread}
        assert recorder.step_thread_counts == {loop.engine.num_threads} == {2}
    finally:
        loop.stop()


def test_a_failed_build_raises_and_leaves_no_loop_thread(tmp_path):
    before = {t.ident for t in threading.enumerate()}

    def make_engine() -> LLMEngine:
        return LLMEngine(EngineConfig(model=str(tmp_path / "no-such-model")))

    with pytest.raises(Exception, match="no-such-model"):
        EngineLoop.spawn(make_engine)
    assert {t.ident for t in threading.enumerate() if t.name == "engine-loop"} <= before


class _CountingServicer(WorkerServicer):
    """Answers Info with torch's thread count on the handler's thread (in max_model_len)."""

    def Info(self, request, context):
        return pb.InstanceInfo(instance_id="counting", max_model_len=torch.get_num_threads())


def test_worker_rpc_handlers_run_torch_on_one_thread():
    servicer = _CountingServicer("counting")
    port = start_server(servicer, "127.0.0.1", 0)
    try:
        stub = worker_pb2_grpc.WorkerStub(channel(f"127.0.0.1:{port}"))
        counts = {stub.Info(pb.InfoRequest(), timeout=10).max_model_len for _ in range(8)}
        assert counts == {1}
    finally:
        servicer._server.stop(0)
