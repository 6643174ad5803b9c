"""What the prefill -> decode KV handoff costs, and how fast a KV link moves bytes.

handoff  One prefill and one decode worker (local processes, one core and one torch
         thread each, as `tandem serve` runs them). For each prompt length, requests
         go straight to the prefill worker's Prefill RPC, one at a time, and report:
           ttft        Prefill call -> first token event
           transfer    first block sent -> commit acknowledged (overlaps the prefill)
           tail        first token sampled -> commit acknowledged: what the handoff
                       adds after the first token, reported as a % of TTFT
link     GB/s of a KVLink send/recv between two processes against a raw
         torch.distributed (gloo) send/recv of the same tensor, same run.

    python benchmarks/handoff_bench.py [--dtype bfloat16] [--lengths 128 512 1024 2048]
"""

from __future__ import annotations

import argparse
import datetime
import os
import socket
import statistics
import threading
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from bench_common import (
    RESULTS_DIR,
    load_average,
    machine_info,
    random_prompts,
    warn_if_busy,
    write_json,
)

from cluster.deployment import Deployment, DeploymentOptions
from cluster.worker_base import channel
from engine.kv.link import LinkManager, connect_store, start_store
from proto.convert import params_from_dict
from proto.tandem.internal.v1 import worker_pb2 as pb
from proto.tandem.internal.v1 import worker_pb2_grpc

# ---- handoff as a share of TTFT --------------------------------------------------------------


def measure_handoff(
    dtype: str, lengths: list[int], repeats: int, layer_groups: int
) -> list[dict[str, Any]]:
    deployment = Deployment(
        DeploymentOptions(dtype=dtype, launcher="local", kv_layer_groups=layer_groups)
    )
    deployment.start()
    try:
        prefill, decode = deployment.workers
        p_stub = worker_pb2_grpc.WorkerStub(channel(prefill.address))
        d_stub = worker_pb2_grpc.WorkerStub(channel(decode.address))
        vocab = p_stub.Info(pb.InfoRequest()).vocab_size
        finished: dict[str, threading.Event] = {}

        def drain() -> None:  # the decode side's token stream, so requests can finish
            for batch in d_stub.Subscribe(pb.SubscribeRequest(router_id="bench")):
                for delta in batch.deltas:
                    if delta.finished and delta.request_id in finished:
                        finished[delta.request_id].set()

        threading.Thread(target=drain, daemon=True).start()
        time.sleep(0.5)
        params = params_from_dict({"max_tokens": 2, "temperature": 0.0, "ignore_eos": True})
        rows = []
        for length in lengths:
            prompts = random_prompts(repeats + 1, length, vocab, seed=length)
            samples = []
            for i, prompt in enumerate(prompts):
                request_id = f"len{length}-{i}"
                finished[request_id] = threading.Event()
                start = time.perf_counter()
                ttft = None
                done = None
                for event in p_stub.Prefill(
                    pb.PrefillRequest(
                        request_id=request_id,
                        prompt_token_ids=prompt,
                        params=params,
                        decode=pb.Peer(instance_id=decode.spec.instance_id, address=decode.address),
                        router_id="bench",
                    )
                ):
                    if event.HasField("first_token"):
                        ttft = time.perf_counter() - start
                    elif event.HasField("handoff"):
                        done = event.handoff
                    else:
                        raise RuntimeError(f"handoff failed: {event.failure}")
                finished[request_id].wait(60)
                if i == 0 or ttft is None or done is None:
                    continue  # the first request warms up the link
                samples.append(
                    (ttft, done.seconds, done.tail_seconds, done.kv_bytes, done.num_chunks)
                )
            ttft_s = statistics.median(s[0] for s in samples)
            tail_s = statistics.median(s[2] for s in samples)
            row = {
                "layer_groups": layer_groups,
                "prompt_tokens": length,
                "ttft_s": ttft_s,
                "transfer_s": statistics.median(s[1] for s in samples),
                "tail_s": tail_s,
                "tail_pct_of_ttft": 100 * tail_s / ttft_s,
                "kv_bytes": samples[0][3],
                "chunks": samples[0][4],
                "load_average": load_average(),
            }
            rows.append(row)
            print(
                f"{layer_groups:2d} groups {length:6d} tokens  TTFT {ttft_s * 1e3:8.1f} ms"
                f"  transfer {row['transfer_s'] * 1e3:7.1f} ms"
                f"  tail {tail_s * 1e3:6.1f} ms = {row['tail_pct_of_ttft']:.2f}% of TTFT"
                f"  ({row['kv_bytes'] / 1e6:.1f} MB in {row['chunks']} chunks)",
                flush=True,
            )
        return rows
    finally:
        deployment.stop()


# ---- link throughput against raw torch.distributed ---------------------------------------------


def _peer(
    rank: int, store_address: str, raw_port: int, sizes: list[int], repeats: int, out: Any
) -> None:
    torch.set_num_threads(1)
    store = connect_store(store_address)
    links = LinkManager(f"bench{rank}", store)
    if rank == 0:
        link = links.connect("bench1", lambda link_id, timeout: store.set("link_id", link_id))
    else:
        store.wait(["link_id"])
        link = links.accept(store.get("link_id").decode(), "bench0", 30)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{raw_port}",
        rank=rank,
        world_size=2,
        timeout=datetime.timedelta(seconds=60),
    )
    results = {}
    for size in sizes:
        tensor = torch.zeros(size // 2, dtype=torch.bfloat16)
        for name in ("raw", "link"):
            times = []
            for i in range(repeats + 1):
                tag = sizes.index(size) * 1000 + i + 1
                dist.barrier()
                start = time.perf_counter()
                if name == "raw":
                    (dist.send if rank == 0 else dist.recv)(tensor, 1 - rank)
                elif rank == 0:
                    link.send(tensor, tag, 60)
                else:
                    link.recv(tensor, tag, 60)
                dist.barrier()
                if i:
                    times.append(time.perf_counter() - start)
            results[(size, name)] = statistics.median(times)
    if rank == 1:
        out.put(results)
    dist.destroy_process_group()


def measure_link(sizes: list[int], repeats: int) -> list[dict[str, Any]]:
    store, address = start_store()
    with socket.socket() as sock:  # a free port for the raw group's own rendezvous
        sock.bind(("127.0.0.1", 0))
        raw_port = sock.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [
        ctx.Process(target=_peer, args=(r, address, raw_port, sizes, repeats, queue))
        for r in (0, 1)
    ]
    for p in procs:
        p.start()
    results = queue.get(timeout=600)
    for p in procs:
        p.join(60)
    rows = []
    for size in sizes:
        raw, link = results[(size, "raw")], results[(size, "link")]
        row = {
            "bytes": size,
            "raw_gb_s": size / raw / 1e9,
            "link_gb_s": size / link / 1e9,
            "link_vs_raw": raw / link,
        }
        rows.append(row)
        print(
            f"{size / 1e6:8.1f} MB  raw gloo {row['raw_gb_s']:.2f} GB/s"
            f"  KV link {row['link_gb_s']:.2f} GB/s"
            f"  ({row['link_vs_raw']:.2f}x raw)",
            flush=True,
        )
    del store
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--lengths", type=int, nargs="+", default=[128, 256, 512, 1024, 2048])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--layer-groups",
        type=int,
        nargs="+",
        default=[1, 3],
        help="kv_layer_groups settings to compare (1: the final chunk's KV leaves in one piece)",
    )
    parser.add_argument("--sizes-mb", type=float, nargs="+", default=[1, 8, 32, 128])
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "handoff.json")
    args = parser.parse_args()
    os.environ.setdefault("TANDEM_NUM_THREADS", "1")
    warn_if_busy()
    print("== KV handoff vs TTFT (1 prefill + 1 decode worker, one core each)", flush=True)
    handoff = [
        row
        for groups in args.layer_groups
        for row in measure_handoff(args.dtype, args.lengths, args.repeats, groups)
    ]
    print("== KV link vs raw torch.distributed send/recv (gloo, loopback)", flush=True)
    link = measure_link([int(mb * 1e6) // 2 * 2 for mb in args.sizes_mb], args.repeats)
    write_json(
        args.out,
        {"machine": machine_info(), "dtype": args.dtype, "handoff": handoff, "link": link},
    )


if __name__ == "__main__":
    main()
