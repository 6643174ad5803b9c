"""A worker as a plain process (the local launcher): python -m cluster.worker_main SPEC_JSON

Prints `TANDEM_WORKER_READY <host:port>` once it serves, then runs until SIGTERM,
SIGINT, or its parent process exits.

`start` is also what a Ray actor calls, the first time and again when Ray restarts it.
Every worker writes the address it serves on into the deployment's store; a restarted
one serves on that same address again, where the router keeps looking for it.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
import os
import signal
import sys
import threading
import time

from cluster.spec import ROLE_MODULES, WorkerSpec

logger = logging.getLogger(__name__)

READY = "TANDEM_WORKER_READY"
LOOPBACK = "127.0.0.1"


def address_key(instance_id: str) -> str:
    """The store key holding the address `instance_id` serves on."""
    return f"tandem/worker-address/{instance_id}"


def start(
    spec: WorkerSpec,
    node_address: str = LOOPBACK,
    restarted: bool = False,
    shards: object = None,
) -> object:
    """Builds and starts the worker service for spec.role in this process. A spec without
    a host listens on `node_address`. A `restarted` worker asks for its old address.
    `shards` starts the other ranks of a tensor-parallel instance (default: child
    processes; cluster.launcher's RayShards in a Ray actor)."""
    # The store client comes from the engine's KV links: torch is in every worker process.
    from engine.kv.link import connect_store

    if spec.host is None:
        spec = dataclasses.replace(spec, host=node_address)
    store = connect_store(spec.store_address)
    key = address_key(spec.instance_id)
    before = store.get(key).decode() if restarted and store.check([key]) else ""
    host, _, port = before.rpartition(":")
    module = importlib.import_module(ROLE_MODULES[spec.role])
    service = None
    if host == spec.host and spec.port == 0:
        try:
            service = module.build(dataclasses.replace(spec, port=int(port)), shards)
        except OSError as e:  # another process took the port meanwhile
            logger.warning("%s cannot listen on %s again: %s", spec.instance_id, before, e)
    if service is None:
        service = module.build(spec, shards)
    address: str = service.address
    store.set(key, address)
    if restarted and address != before:
        logger.warning(
            "%s restarted on %s, not on %s where the router looks for it: it gets no "
            "requests", spec.instance_id, address, before or "(unknown)",
        )  # fmt: skip
    return service


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
