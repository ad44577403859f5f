"""Small durable worker state in Redis: seen-keys, the polling cursor, the dead-letter queue,
delivery counts and report locks.

Seen-keys are claimed before the work they guard (`RedisSeen`): the webhook receiver and the
polling task both claim a patient's de-duplication key, queue its task, then keep the key, and
give it back when queueing fails, so a broker outage loses no change (issue 13, item 1).

The dead-letter queue holds the tasks that cannot succeed (retries exhausted, a permanent
error, or a worker that died on every delivery), with the reason, so an operator can inspect and
re-queue them. It is kept in Redis, not in logs, because it must name the patient to be
re-queued.
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from dataclasses import asdict, dataclass
from typing import Any, Literal, Protocol, runtime_checkable

import redis

from clinragen_fhir.identity import RULE_BASELINE

DLQ_KEY = "clinragen:dlq"
CURSOR_KEY = "clinragen:poll-cursor"
BACKFILL_KEY = "clinragen:backfill:"  # + run key: the set of patients done in that backfill
BACKFILL_TTL_S = 30 * 24 * 3600
DELIVERIES_KEY = "clinragen:deliveries:"  # + task id + ":" + retry number: starts of one message
LOCK_KEY = "clinragen:lock:report:"  # + report key: the run writing that report
CLAIM_TTL_S = 120  # a "pending" claim outlives one publish (Celery retries it for ~1 s)

Claim = Literal["new", "pending", "done"]

# Take the lock when it is free, or when `owner` holds it already: a task redelivered after its
# worker died mid-write (same task id) takes its own stale lock back instead of waiting it out.
_ACQUIRE = """
local v = redis.call('GET', KEYS[1])
if v == false or v == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
return 0
"""
# Delete only our own lock: one that expired and was taken by another run stays theirs.
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


# -- the receivers' seen-keys: what the webhook needs of a store (RedisSeen is one) ---------
class SeenStore(Protocol):
    """Remembers keys for a while; `add` is True only the first time (atomic)."""

    def add(self, key: str, ttl_s: int) -> bool: ...


@runtime_checkable
class EventLog(Protocol):
    """Remembers each subscription's last event (number, instant), so a gap in the numbers (a
    delivery the server gave up on while we were down) is noticed, and a poll resumes there."""

    def record_event(self, subscription: str, number: int, at: str) -> tuple[int, str] | None: ...

    def mark_seen(self, at: str) -> None: ...


@runtime_checkable
class ClaimStore(Protocol):
    """A store whose keys are claimed before the work they guard, then kept or given back, so
    a failure between the two leaves no key that would drop the sender's retry."""

    def claim(self, key: str, ttl_s: int) -> Claim: ...

    def keep(self, key: str, ttl_s: int) -> None: ...

    def release(self, key: str) -> None: ...


class AddOnly:
    """A plain SeenStore as a ClaimStore: the claim is final (nothing to keep or give back)."""

    def __init__(self, seen: SeenStore) -> None:
        self.seen = seen

    def claim(self, key: str, ttl_s: int) -> Claim:
        return "new" if self.seen.add(key, ttl_s) else "done"

    def keep(self, key: str, ttl_s: int) -> None:
        return None

    def release(self, key: str) -> None:
        return None


class ReportLocked(Exception):
    """Another run holds the lock of this report key (it is writing the same report)."""


@dataclass
class DeadLetter:
    id: str
    task: str
    args: list[Any]
    error: str
    failed_at: float
    retries: int


EVENTS_KEY = "clinragen:events:"  # + subscription reference: its last event number and time
LAST_EVENT_KEY = "clinragen:events:last-at"  # when the newest accepted notification happened
EVENTS_TTL_S = 90 * 24 * 3600
# Keep the higher event number (or a restart's 1) and answer the previous number and time.
_RECORD_EVENT = """
local prev = redis.call('HMGET', KEYS[1], 'number', 'at')
local n = tonumber(ARGV[1])
if (not prev[1]) or n > tonumber(prev[1]) or n <= 1 then
  redis.call('HSET', KEYS[1], 'number', ARGV[1], 'at', ARGV[2])
end
redis.call('EXPIRE', KEYS[1], ARGV[3])
return prev
"""


class RedisSeen:
    """Seen-keys that are claimed, then kept or given back (SET NX EX), under WorkerState's
    `clinragen:seen:` prefix: the webhook's ClaimStore, and the polling task's patient keys.

    `claim` sets a short-lived "pending" value and answers "new" (the caller does the work),
    "pending" (another caller is doing it right now) or "done" (kept: done within the TTL)."""

    PREFIX = "clinragen:seen:"

    def __init__(self, url: str) -> None:
        self._redis = redis.Redis.from_url(url, decode_responses=True, socket_timeout=5,
                                           socket_connect_timeout=5)

    def add(self, key: str, ttl_s: int) -> bool:
        return bool(self._redis.set(self.PREFIX + key, "1", nx=True, ex=max(1, ttl_s)))

    def claim(self, key: str, ttl_s: int) -> Claim:
        if self._redis.set(self.PREFIX + key, "pending", nx=True, ex=max(1, ttl_s)):
            return "new"
        return "pending" if self._redis.get(self.PREFIX + key) == "pending" else "done"

    def keep(self, key: str, ttl_s: int) -> None:
        self._redis.set(self.PREFIX + key, "1", ex=max(1, ttl_s))

    def release(self, key: str) -> None:
        self._redis.delete(self.PREFIX + key)

    # -- the last event seen: what a poll after an outage resumes from (issue 14, item 6) --
    def record_event(self, subscription: str, number: int, at: str) -> tuple[int, str] | None:
        """Store `number` (the highest seen, or 1 after the server restarted its count) and the
        instant `at` of subscription's event; answer the previous (number, at), if any."""
        prev = self._redis.eval(  # type: ignore[no-untyped-call]
            _RECORD_EVENT, 1, EVENTS_KEY + subscription, number, at, EVENTS_TTL_S)
        if not prev or prev[0] is None:
            return None
        return int(prev[0]), str(prev[1] or "")

    def mark_seen(self, at: str) -> None:
        """The instant of the newest notification accepted (any kind, numbered or not)."""
        self._redis.set(LAST_EVENT_KEY, at, ex=EVENTS_TTL_S)

    def last_seen(self) -> str | None:
        value = self._redis.get(LAST_EVENT_KEY)
        return str(value) if value else None


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

    # -- delivery counts -----------------------------------------------------------------------
    def count_delivery(self, task_id: str, retries: int, ttl_s: int) -> int:
        """Count one more start of this task message and return the count so far.

        A retry is a new message (its retry number goes up), so only redeliveries of one message
        (a worker lost mid-task) add up; the TTL outlives the longest gap between them."""
        key = f"{DELIVERIES_KEY}{task_id}:{retries}"
        pipe = self._redis.pipeline()
        pipe.incr(key)
        pipe.expire(key, ttl_s)
        count, _ = pipe.execute()
        return int(count)

    def forget_delivery(self, task_id: str, retries: int) -> None:
        """The message was handled (succeeded, failed or retried): its count is done with."""
        self._redis.delete(f"{DELIVERIES_KEY}{task_id}:{retries}")

    # -- report locks ------------------------------------------------------------------------
    def acquire_report(self, key: str, owner: str, ttl_s: float, wait_s: float) -> bool:
        """Take the lock of one report key for `owner` (SET NX with a TTL), waiting up to
        `wait_s` for another run to let go; False if it still holds it."""
        deadline = time.monotonic() + wait_s
        while True:
            if self._redis.eval(  # type: ignore[no-untyped-call]
                    _ACQUIRE, 1, LOCK_KEY + key, owner, int(ttl_s * 1000)):
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.05)

    def release_report(self, key: str, owner: str) -> bool:
        """Release the lock if `owner` still holds it (compare-and-delete); False if it had
        expired (the run outlived the TTL) and may be another run's now."""
        return bool(self._redis.eval(  # type: ignore[no-untyped-call]
            _RELEASE, 1, LOCK_KEY + key, owner))

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


def backfill_key(base_url: str, query: str, model: str = RULE_BASELINE) -> str:
    """The checkpoint a `diagnose-all` run resumes from: one per server, query and model (a
    backfill finished by the rule baseline is not one finished by a trained model). `model`:
    `identity.model_identity`, the same hash the reports and the audit carry."""
    suffix = "" if model == RULE_BASELINE else f"|{model}"
    return hashlib.sha256(f"{base_url.rstrip('/')}|{query}{suffix}".encode()).hexdigest()[:24]
