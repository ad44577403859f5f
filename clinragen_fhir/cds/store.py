"""Where the CDS Hooks service remembers what it must: replay keys of JWTs (`add`) and the
cards it showed (`put`/`get`), so feedback on a card can name its patient and report. Redis in
production (every process of the service shares it); a bounded in-process store for tests and
a loopback service."""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from typing import Protocol


class Store(Protocol):
    """Replay keys (`add`: True only the first time) and shown cards (`put`/`get`)."""

    def add(self, key: str, ttl_s: int) -> bool: ...

    def put(self, key: str, value: str, ttl_s: int) -> None: ...

    def get(self, key: str) -> str | None: ...


class MemoryStore:
    """A bounded in-process Store: one process only, forgotten on restart (tests, loopback)."""

    def __init__(self, max_items: int = 100_000) -> None:
        self._items: OrderedDict[str, tuple[float, str]] = OrderedDict()
        self._lock = threading.Lock()
        self.max_items = max_items

    def _live(self, key: str, now: float) -> str | None:
        item = self._items.get(key)
        if item is None or item[0] < now:
            self._items.pop(key, None)
            return None
        return item[1]

    def _set(self, key: str, value: str, ttl_s: int, now: float) -> None:
        self._items[key] = (now + max(1, ttl_s), value)
        self._items.move_to_end(key)
        while len(self._items) > self.max_items:
            self._items.popitem(last=False)

    def add(self, key: str, ttl_s: int) -> bool:
        with self._lock:
            now = time.monotonic()
            if self._live(key, now) is not None:
                return False
            self._set(key, "1", ttl_s, now)
            return True

    def put(self, key: str, value: str, ttl_s: int) -> None:
        with self._lock:
            self._set(key, value, ttl_s, time.monotonic())

    def get(self, key: str) -> str | None:
        with self._lock:
            return self._live(key, time.monotonic())


class RedisStore:
    """Store on Redis (the stack's state database), shared by every process of the service."""

    PREFIX = "clinragen:cds:"

    def __init__(self, url: str) -> None:
        import redis

        self._redis = redis.Redis.from_url(url, decode_responses=True, socket_timeout=5,
                                           socket_connect_timeout=5)

    def add(self, key: str, ttl_s: int) -> bool:
        return bool(self._redis.set(self.PREFIX + key, "1", nx=True, ex=max(1, ttl_s)))

    def put(self, key: str, value: str, ttl_s: int) -> None:
        self._redis.set(self.PREFIX + key, value, ex=max(1, ttl_s))

    def get(self, key: str) -> str | None:
        value = self._redis.get(self.PREFIX + key)
        return value if isinstance(value, str) else None
