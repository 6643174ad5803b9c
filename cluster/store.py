"""The cluster's state store: a small async key-value interface, in-process or Redis.

    make_store("memory")                        the default for local runs: one process
    make_store("redis", url, prefix, timeout_s) a cluster: every process shares the keys

Keys are strings relative to the store; `RedisStore` writes each under its `prefix`
("tandem:<cluster-name>:"), so clusters (and tests) share a Redis without seeing each
other's keys. A key written with `ttl_s` vanishes that many seconds later unless it is
written again: the registry's heartbeats are built on that.

No call may hang. Every `RedisStore` call is bounded by `timeout_s`, whatever Redis does
(refuses connections, closes them, or accepts them and never answers), and fails with
`StoreUnavailable`. Each store keeps a `StoreHealth` record that the router shows in
/ready and in its metrics:

    healthy ──a call fails──▶ unhealthy (num_errors += 1, last_error) ──a call succeeds──▶ healthy
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar
from urllib.parse import urlsplit, urlunsplit

if TYPE_CHECKING:
    import redis.asyncio

T = TypeVar("T")
Value = bytes | str


class StoreUnavailable(Exception):
    """The store did not answer in time, or refused the connection."""


@dataclass
class StoreHealth:
    """How the store's calls have gone: what /ready and the metrics show."""

    healthy: bool = True  # the last call succeeded
    num_errors: int = 0
    last_error: str = ""
    last_ok_at: float | None = None  # wall-clock time of the last successful call


class StateStore(ABC):
    """Async key-value store. Every call either completes or raises `StoreUnavailable`;
    none waits longer than the store's timeout. A write that raised may still take
    effect (the server may yet read it), so writes must be safe to repeat. A `ttl_s`
    must be positive."""

    def __init__(self) -> None:
        self.health = StoreHealth()

    @abstractmethod
    async def put(self, key: str, value: Value, ttl_s: float | None = None) -> None:
        """Afterwards `get(key)` is `value` (str as UTF-8) until `ttl_s` passes, if given;
        an earlier expiry is replaced."""

    @abstractmethod
    async def add(self, key: str, value: Value, ttl_s: float | None = None) -> bool:
        """`put`, only if `key` is absent; True if it wrote. Atomic across processes."""

    @abstractmethod
    async def replace(self, key: str, value: Value, ttl_s: float | None = None) -> bool:
        """`put`, only if `key` is present; True if it wrote. Atomic across processes."""

    @abstractmethod
    async def get(self, key: str) -> bytes | None:
        """The value of `key`, or None if it is absent or expired."""

    @abstractmethod
    async def delete(self, key: str) -> None:
        """Afterwards `key` is absent; deleting an absent key is not an error."""

    @abstractmethod
    async def scan(self, prefix: str) -> dict[str, bytes]:
        """Every live key that starts with `prefix`, with its value."""

    @abstractmethod
    async def ping(self) -> None:
        """Returns if the store answers; updates `health` like any other call."""

    @abstractmethod
    async def close(self) -> None:
        """Releases connections; never raises, never hangs."""

    def _record_ok(self) -> None:
        self.health.healthy = True
        self.health.last_ok_at = time.time()

    def _record_error(self, error: Exception) -> None:
        self.health.healthy = False
        self.health.num_errors += 1
        self.health.last_error = str(error)


class MemoryStore(StateStore):
    """One process's dict with expiry times; `clock` (monotonic seconds) is for tests."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self._clock = clock
        self._items: dict[str, tuple[bytes, float | None]] = {}  # key -> (value, expires_at)

    async def put(self, key: str, value: Value, ttl_s: float | None = None) -> None:
        self._items[key] = (_as_bytes(value), self._expires_at(ttl_s))
        self._record_ok()

    async def add(self, key: str, value: Value, ttl_s: float | None = None) -> bool:
        if self._live(key) is not None:
            return False
        await self.put(key, value, ttl_s)
        return True

    async def replace(self, key: str, value: Value, ttl_s: float | None = None) -> bool:
        if self._live(key) is None:
            return False
        await self.put(key, value, ttl_s)
        return True

    async def get(self, key: str) -> bytes | None:
        self._record_ok()
        return self._live(key)

    async def delete(self, key: str) -> None:
        self._items.pop(key, None)
        self._record_ok()

    async def scan(self, prefix: str) -> dict[str, bytes]:
        self._record_ok()
        found = {key: self._live(key) for key in list(self._items) if key.startswith(prefix)}
        return {key: value for key, value in found.items() if value is not None}

    async def ping(self) -> None:
        self._record_ok()

    async def close(self) -> None:
        pass  # nothing to release; the keys live as long as the store object

    def _live(self, key: str) -> bytes | None:
        """The value of `key`, dropping it first if it has expired."""
        item = self._items.get(key)
        if item is None:
            return None
        value, expires_at = item
        if expires_at is not None and self._clock() >= expires_at:
            del self._items[key]
            return None
        return value

    def _expires_at(self, ttl_s: float | None) -> float | None:
        return None if ttl_s is None else self._clock() + _checked_ttl(ttl_s)


class RedisStore(StateStore):
    """Redis through redis.asyncio. Each call is bounded twice: socket timeouts for a
    dead network, and `asyncio.wait_for` for a server that accepts and never answers.
    A connection Redis closed is retried once, at once, on a fresh connection."""

    def __init__(self, url: str, prefix: str = "tandem:", timeout_s: float = 1.0) -> None:
        if timeout_s <= 0:
            raise ValueError(f"store timeout must be positive, got {timeout_s}")
        super().__init__()
        self.url = url
        self.prefix = prefix
        self.timeout_s = timeout_s
        self._client = _redis_client(url, timeout_s)

    async def put(self, key: str, value: Value, ttl_s: float | None = None) -> None:
        await self._call(f"SET {key}", self._client.set(self._key(key), value, px=_ms(ttl_s)))

    async def add(self, key: str, value: Value, ttl_s: float | None = None) -> bool:
        call = self._client.set(self._key(key), value, px=_ms(ttl_s), nx=True)
        return bool(await self._call(f"SET {key} NX", call))

    async def replace(self, key: str, value: Value, ttl_s: float | None = None) -> bool:
        call = self._client.set(self._key(key), value, px=_ms(ttl_s), xx=True)
        return bool(await self._call(f"SET {key} XX", call))

    async def get(self, key: str) -> bytes | None:
        value = await self._call(f"GET {key}", self._client.get(self._key(key)))
        return _as_bytes(value) if value is not None else None

    async def delete(self, key: str) -> None:
        await self._call(f"DEL {key}", self._client.delete(self._key(key)))

    async def scan(self, prefix: str) -> dict[str, bytes]:
        return await self._call(f"SCAN {prefix}*", self._scan(prefix))

    async def ping(self) -> None:
        await self._call("PING", self._client.ping())

    async def close(self) -> None:
        with contextlib.suppress(Exception):  # the connections are gone either way
            await asyncio.wait_for(self._client.aclose(), self.timeout_s)

    async def _scan(self, prefix: str) -> dict[str, bytes]:
        pattern = _glob_escape(self._key(prefix)) + "*"
        keys = [key async for key in self._client.scan_iter(match=pattern, count=1000)]
        values = await self._client.mget(keys) if keys else []
        skip = len(self.prefix)
        # A key that expired between SCAN and MGET reads as None: it is gone.
        return {k.decode()[skip:]: _as_bytes(v) for k, v in zip(keys, values) if v is not None}

    async def _call(self, command: str, call: Awaitable[T]) -> T:
        from redis.exceptions import RedisError

        try:
            result = await asyncio.wait_for(call, self.timeout_s)
        except (RedisError, OSError, asyncio.TimeoutError) as e:
            error = StoreUnavailable(
                f"Redis at {_redact(self.url)} failed {command}: {type(e).__name__}: "
                f"{str(e).rstrip('.') or f'no answer within {self.timeout_s} s'}. "
                "Check that redis-server is running and reachable at that address "
                "(redis-cli -u URL ping), or run with the in-process store."
            )
            self._record_error(error)
            raise error from e
        self._record_ok()
        return result

    def _key(self, key: str) -> str:
        return self.prefix + key


def _redis_client(url: str, timeout_s: float) -> redis.asyncio.Redis:
    import redis.asyncio
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff
    from redis.exceptions import ConnectionError

    # Redis's default retries back off for seconds; one immediate retry on a fresh
    # connection is enough to survive a server that closed its connections.
    return redis.asyncio.Redis.from_url(
        url,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        retry=Retry(NoBackoff(), 1, supported_errors=(ConnectionError,)),
    )


STORES = ("memory", "redis")


def make_store(
    kind: str = "memory",
    url: str = "redis://127.0.0.1:6379/0",
    prefix: str = "tandem:",
    timeout_s: float = 1.0,
) -> StateStore:
    """The store registered as `kind`: "memory" (url, prefix, timeout unused) or "redis"."""
    if kind == "memory":
        return MemoryStore()
    if kind == "redis":
        return RedisStore(url, prefix, timeout_s)
    raise ValueError(f"unknown state store {kind!r}; choose one of {list(STORES)}")


def _as_bytes(value: Value) -> bytes:
    return value.encode() if isinstance(value, str) else bytes(value)


def _checked_ttl(ttl_s: float) -> float:
    if ttl_s <= 0:
        raise ValueError(f"a key's ttl must be positive, got {ttl_s} s")
    return ttl_s


def _ms(ttl_s: float | None) -> int | None:
    return None if ttl_s is None else max(1, round(_checked_ttl(ttl_s) * 1000))


def _glob_escape(text: str) -> str:
    """`text` matched literally by a Redis glob pattern."""
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


def _redact(url: str) -> str:
    """`url` without its password, fit for logs and error messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = f"{parts.username or ''}:***@{parts.hostname}" + (
        f":{parts.port}" if parts.port else ""
    )
    return urlunsplit(parts._replace(netloc=netloc))
