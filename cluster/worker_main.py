"""A worker as a plain process (the local launcher): python -m cluster.worker_main SPEC_JSON

Prints `TANDEM_WORKER_READY <host:port>` once it serves, then runs until SIGTERM,
SIGINT, or its parent process exits.
"""

from __future__ import annotations

import importlib
import os
import signal
import sys
import threading
import time

from cluster.spec import ROLE_MODULES, WorkerSpec

READY = "TANDEM_WORKER_READY"


def start(spec: WorkerSpec) -> object:
    """Builds and starts the worker service for spec.role in this process."""
    module = importlib.import_module(ROLE_MODULES[spec.role])
    return module.build(spec)


def main() -> None:
    spec = WorkerSpec.from_json(sys.argv[1])
    parent = os.getppid()
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    service = start(spec)
    print(f"{READY} {service.address}", flush=True)  # type: ignore[attr-defined]
    while not stop.wait(1.0):
        if os.getppid() != parent:  # orphaned: the launcher died without stopping us
            break
    service.stop()  # type: ignore[attr-defined]
    time.sleep(0.1)


if __name__ == "__main__":
    main()
