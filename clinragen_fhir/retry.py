"""The one retry policy: the FHIR client (one request), the Celery task (one patient) and the
teacher's LLM client (one completion) all decide and wait through `RetryPolicy`.

In-process retries (the client, the LLM client) run through tenacity (`RetryPolicy.call`); the
task cannot sleep in the worker (it would hold a worker slot for minutes), so it asks the same
policy for the countdown of its next delivery (`RetryPolicy.next_wait`). Both use one decision
(`retry_on`, which reads the error's own verdict: `FhirError.retryable`) and one wait:

    wait after the n-th failed try = backoff_s * 2**(n-1), times a jitter in [0.5, 1.5),
    at most max_backoff_s; a server's Retry-After is a floor (capped the same way).

A Retry-After longer than `max_backoff_s` is not waited out in-process when `defer_long_waits`
is set (the client's layer): the error goes up at once, and the task's countdown honours it, so
a server asking for two minutes does not hold a worker for two minutes, nor get asked again
after 30 seconds.

The bound on one failing call is the product of the layers' `attempts` (docs/integration.md
section 4, "Retry policy"): what the client gave up on, the task tries again later.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import tenacity

T = TypeVar("T")


def _never(exc: BaseException) -> bool:
    return False


def retry_after_of(exc: BaseException | None) -> float | None:
    """The seconds the server asked us to wait (Retry-After), carried by the error."""
    value = getattr(exc, "retry_after", None)
    return float(value) if isinstance(value, int | float) and value >= 0 else None


@dataclass(frozen=True)
class RetryPolicy:
    """`attempts` tries in all (the first included), waits as in the module docstring.

    `retry_on(error)`: whether this layer tries again after `error` (False: it is final here,
    raised at once)."""

    attempts: int
    backoff_s: float
    max_backoff_s: float
    retry_on: Callable[[BaseException], bool] = _never
    defer_long_waits: bool = False

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError("attempts must be >= 1 (the first try counts)")
        if self.backoff_s < 0 or self.max_backoff_s < 0:
            raise ValueError("backoff_s and max_backoff_s must be >= 0")

    def delay(self, failed: int, retry_after: float | None = None,
              rng: Callable[[], float] = random.random) -> float:
        """The wait after `failed` tries failed (1: after the first)."""
        wait = float(self.backoff_s * 2 ** max(0, failed - 1) * (0.5 + rng()))
        if retry_after is not None:
            wait = max(wait, retry_after)
        return float(min(self.max_backoff_s, wait))

    def retries(self, error: BaseException) -> bool:
        """Whether this layer retries `error` at all (attempts aside)."""
        if not self.retry_on(error):
            return False
        after = retry_after_of(error)
        return not (self.defer_long_waits and after is not None and after > self.max_backoff_s)

    def next_wait(self, failed: int, error: BaseException) -> float | None:
        """After `failed` tries, the last one failing with `error`: the seconds to wait before
        the next try, or None when this layer gives up (attempts spent, or a final error)."""
        if failed >= self.attempts or not self.retries(error):
            return None
        return self.delay(failed, retry_after_of(error))

    def call(self, fn: Callable[[], T], *,
             on_retry: Callable[[int, BaseException, float], None] | None = None,
             sleep: Callable[[float], None] | None = None) -> T:
        """`fn()` until it returns, raises an error this layer does not retry, or `attempts`
        tries failed (the last error is raised as it is). `on_retry(failed, error, wait)` runs
        before each wait (the retry log line)."""

        def wait(state: tenacity.RetryCallState) -> float:
            error = state.outcome.exception() if state.outcome else None
            return self.delay(state.attempt_number, retry_after_of(error))

        def before_sleep(state: tenacity.RetryCallState) -> None:
            if on_retry is not None and state.outcome is not None:
                error = state.outcome.exception()
                assert error is not None
                on_retry(state.attempt_number, error,
                         state.next_action.sleep if state.next_action else 0.0)

        retrying = tenacity.Retrying(
            stop=tenacity.stop_after_attempt(self.attempts),
            wait=wait,
            retry=tenacity.retry_if_exception(self.retries),
            before_sleep=before_sleep,
            reraise=True,
            # late-bound: a test that patches time.sleep patches this too
            sleep=sleep or (lambda s: time.sleep(s)),
        )
        return retrying(fn)
