"""Which threads of a worker process run torch on several threads: the engine's only.

libgomp gives each thread that opens a parallel region a team of threads of its own.
Once a process holds more OpenMP threads than it has cores, every team stops spinning at
its barriers and sleeps there instead, so a step waits for the other core to wake up at
each of its several hundred barriers. A worker that built its engine on its main thread
and stepped it on the engine loop's held two teams: a decode step of 24 requests took
78-85 ms served, against 44 ms for the same step in a process of its own (2-core Xeon,
two engine threads). Built and stepped on one thread, it takes 51-54 ms.

So:
  * a worker builds its engine on the engine loop's thread (engine.loop's
    `EngineLoop.spawn`);
  * every other thread that may touch tensors (RPC handlers, KV senders) calls
    `run_torch_single_threaded` first;
  * the engine sets its thread count at every step (LLMEngine.step): torch keeps the
    count per thread, but a thread's first parallel operator in each library resets it
    to the count that any thread set last.
"""

from __future__ import annotations

import torch


def run_torch_single_threaded() -> None:
    """Torch runs the calling thread's operators on that thread alone: it never opens an
    OpenMP team."""
    torch.set_num_threads(1)
