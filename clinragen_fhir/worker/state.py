"""Small durable worker state in Redis: seen-keys, the polling cursor, the dead-letter queue.

The dead-letter queue holds the tasks that cannot succeed (retries exhausted or a permanent
error), with the reason, so an operator can inspect and re-queue them. It is kept in Redis, not
in logs, because it must name the patient to be re-queued.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import asdict, dataclass
from typing import Any

import redis

DLQ_KEY = "clinragen:dlq"
CURSOR_KEY = "clinragen:poll-cursor"
BACKFILL_KEY = "clinragen:backfill:"  # + run key: the set of patients done in that backfill
BACKFILL_TTL_S = 30 * 24 * 3600


@dataclass
class DeadLetter:
    id: str
    task: str
    args: list[Any]
    error: str
    failed_at: float
    retries: int


class WorkerState:
    def __init__(self, url: str) -> None:
        self._redis = redis.Redis.from_url(url, decode_responses=True)

    def add(self, key: str, ttl_s: int) -> bool:
        """True only the first time `key` is seen within `ttl_s` (atomic SET NX EX)."""
        return bool(self._redis.set(f"clinragen:seen:{key}", "1", nx=True, ex=ttl_s))

    # -- dead letters ------------------------------------------------------------------------
    def dead_letter(self, task: str, args: list[Any], error: str, retries: int) -> DeadLetter:
        letter = DeadLetter(uuid.uuid4().hex[:12], task, args, error[:500], time.time(), retries)
        self._redis.hset(DLQ_KEY, letter.id, json.dumps(asdict(letter)))
        return letter

    def dead_letters(self) -> list[DeadLetter]:
        raw = self._redis.hgetall(DLQ_KEY)
        letters = [DeadLetter(**json.loads(v)) for v in raw.values()]
        return sorted(letters, key=lambda d: d.failed_at)

    def take(self, letter_id: str) -> DeadLetter | None:
        """Remove and return one dead letter (to re-queue it)."""
        raw = self._redis.hget(DLQ_KEY, letter_id)
        if raw is None or not self._redis.hdel(DLQ_KEY, letter_id):
            return None
        return DeadLetter(**json.loads(raw))

    # -- polling cursor ------------------------------------------------------------------------
    def cursor(self, endpoint: str) -> str | None:
        value = self._redis.hget(CURSOR_KEY, endpoint)
        return str(value) if value else None

    def set_cursor(self, endpoint: str, value: str) -> None:
        self._redis.hset(CURSOR_KEY, endpoint, value)

    # -- backfill checkpoints ----------------------------------------------------------------
    def backfill_done(self, run: str) -> set[str]:
        """Patients a `diagnose-all` run has finished (report written, present or skipped)."""
        return {str(m) for m in self._redis.smembers(BACKFILL_KEY + run)}

    def mark_done(self, run: str, patient_id: str) -> None:
        key = BACKFILL_KEY + run
        self._redis.sadd(key, patient_id)
        self._redis.expire(key, BACKFILL_TTL_S)

    def reset_backfill(self, run: str) -> None:
        self._redis.delete(BACKFILL_KEY + run)
