"""`tandem status`: the instances, their roles, load and health.

    tandem status --config deploy/cluster.yaml   the Redis store's registry (any router's)
    tandem status [--router http://HOST:PORT]    a router's own view (GET /admin/instances)

With a Redis store the answer comes from the store, as every router heartbeats its
instances there; an in-memory store lives inside `tandem serve`, so then the router is
asked. Exit status: 0 when every instance shown is healthy, 1 when one is not, 2 when
the store or the router cannot be read.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from typing import Any

from cluster.config import ConfigError, TandemConfig, load_config
from cluster.config_apply import api_keys, store_options

COLUMNS = ("instance", "role", "address", "tp", "healthy", "running", "waiting", "kv", "seen")


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="tandem status", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=None, metavar="FILE", help="the serving config")
    parser.add_argument("--router", default=None, help="router URL (default: from the config)")
    parser.add_argument("--json", action="store_true", help="print JSON rows")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config) if args.config else TandemConfig()
        if config.store.kind == "redis" and args.router is None:
            rows, source = asyncio.run(_from_store(config)), f"store {config.store.url}"
        else:
            url = args.router or f"http://{config.router.host}:{config.router.http_port}"
            rows, source = _from_router(url, api_keys(config)), f"router {url}"
    except (ConfigError, OSError, RuntimeError) as error:
        print(f"tandem status: {error}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print(f"{len(rows)} instances, from the {source}")
        print(_table(rows))
    return 0 if all(row["healthy"] for row in rows) else 1


async def _from_store(config: TandemConfig) -> list[dict[str, Any]]:
    from cluster.registry import Registry
    from cluster.store import make_store

    store = make_store(**store_options(config))
    try:
        registry = Registry(store, config.store.heartbeat_ttl_s)
        records = await registry.live()
        if registry.degraded:
            raise RuntimeError(f"the store does not answer: {store.health.last_error}")
    finally:
        await store.close()
    now = time.time()
    return [
        {
            "instance": r.instance_id,
            "role": r.role,
            "address": r.address,
            "tp": r.capabilities.tensor_parallel,
            "healthy": True,  # in the store: heartbeated within its ttl
            "running": r.load.get("num_running"),
            "waiting": r.load.get("num_waiting"),
            "kv": r.load.get("kv_usage"),
            "seen": now - r.last_heartbeat,
        }
        for r in records
    ]


def _from_router(url: str, keys: list[str]) -> list[dict[str, Any]]:
    request = urllib.request.Request(f"{url.rstrip('/')}/admin/instances")
    if keys:
        request.add_header("Authorization", f"Bearer {keys[0]}")
    try:
        with urllib.request.urlopen(request, timeout=10) as reply:
            body = json.load(reply)
    except (urllib.error.URLError, TimeoutError) as error:
        raise RuntimeError(f"cannot read {url}/admin/instances ({error}); is it serving?") from None
    rows = []
    for instance in body["instances"]:
        load = instance.get("load") or {}
        num_blocks = load.get("num_blocks") or 0
        kv = 1 - load["num_free_blocks"] / num_blocks if num_blocks else None
        rows.append(
            {
                "instance": instance["instance_id"],
                "role": instance["role"],
                "address": instance["address"],
                "tp": instance.get("tensor_parallel"),
                "healthy": instance["healthy"],
                "running": load.get("num_running"),
                "waiting": load.get("num_waiting"),
                "kv": kv,
                "seen": None,
            }
        )
    return rows


def _table(rows: list[dict[str, Any]]) -> str:
    def cell(column: str, value: Any) -> str:
        if value is None:
            return "-"
        if column == "kv":
            return f"{value:.0%}"
        if column == "seen":
            return f"{value:.1f}s ago"
        if column == "healthy":
            return "yes" if value else "NO"
        return str(int(value) if isinstance(value, float) else value)

    cells = [list(COLUMNS)] + [[cell(c, row[c]) for c in COLUMNS] for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(COLUMNS))]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(line, widths)) for line in cells)
