"""A private redis-server on a free port, for tests that kill, pause or flush it.

server = RedisServer.start()   # answers PING before this returns
server.pause() / server.resume()   # SIGSTOP / SIGCONT: a server that never answers
server.stop()                      # killed; start_again() brings it back on its port
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field

REDIS_SERVER = "redis-server"


class RedisServerError(RuntimeError):
    pass


@dataclass
class RedisServer:
    port: int
    process: subprocess.Popen[bytes]
    directory: tempfile.TemporaryDirectory[str] = field(repr=False)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @classmethod
    def start(cls, timeout_s: float = 10.0) -> RedisServer:
        """A fresh server with no persistence, on a port no one else uses."""
        if shutil.which(REDIS_SERVER) is None:
            raise RedisServerError(f"{REDIS_SERVER} not found; install Redis (apt install redis)")
        directory = tempfile.TemporaryDirectory(prefix="tandem-redis-")
        for _ in range(3):  # the free port may be taken before redis-server binds it
            port = _free_port()
            server = cls(port, _spawn(port, directory.name), directory)
            try:
                server._wait_until_ready(timeout_s)
                return server
            except RedisServerError:
                server.stop()
        directory.cleanup()
        raise RedisServerError(f"{REDIS_SERVER} did not start; is it installed and working?")

    def start_again(self, timeout_s: float = 10.0) -> None:
        """After stop(): a new, empty server on the same port."""
        self.process = _spawn(self.port, self.directory.name)
        self._wait_until_ready(timeout_s)

    def pause(self) -> None:
        os.kill(self.process.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.kill(self.process.pid, signal.SIGCONT)

    def command(self, *args: str) -> bytes:
        """One command over a raw socket (RESP), answered within a second."""
        request = f"*{len(args)}\r\n" + "".join(f"${len(a)}\r\n{a}\r\n" for a in args)
        with socket.create_connection(("127.0.0.1", self.port), timeout=1.0) as conn:
            conn.sendall(request.encode())
            return conn.recv(65536)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()  # SIGKILL ends a paused process too
            self.process.wait(timeout=10)

    def close(self) -> None:
        self.stop()
        self.directory.cleanup()

    def _wait_until_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RedisServerError(
                    f"{REDIS_SERVER} on port {self.port} exited with {self.process.returncode}"
                )
            try:
                if self.command("PING").startswith(b"+PONG"):
                    return
            except OSError:
                pass  # not listening yet
            time.sleep(0.02)
        self.stop()
        raise RedisServerError(f"{REDIS_SERVER} on port {self.port} did not answer PING")


def _spawn(port: int, directory: str) -> subprocess.Popen[bytes]:
    args = [REDIS_SERVER, "--port", str(port), "--bind", "127.0.0.1", "--save", ""]
    args += ["--appendonly", "no", "--dir", directory]
    return subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port
