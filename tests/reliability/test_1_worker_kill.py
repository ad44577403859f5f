"""1. Worker killed: SIGKILL pool children and whole workers mid-task, at random points.

Afterwards every patient has exactly one report for its (unchanged) inputs, every task has a
final result, and nothing was dead-lettered. Short form: 5 kills over 20 patients; full form
(RELIABILITY_FULL=1): 24 kills over 200 patients.
"""

from __future__ import annotations

import os
import random
import signal
import time

import pytest

from tests.reliability.stack import (
    FULL,
    Hapi,
    Redis,
    Worker,
    base_env,
    celery_app,
    enqueue,
    log_lines,
    make_patients,
    outcome_figures,
    queue_len,
    record,
    wait_all_done,
    wait_until,
)

N_PATIENTS, N_KILLS = (200, 24) if FULL else (20, 5)
# soft < hard < visibility, all short, so a killed worker's unacknowledged task comes back soon
LIMITS = {"CLINRAGEN_WORKER__SOFT_TIME_LIMIT_S": "15", "CLINRAGEN_WORKER__TIME_LIMIT_S": "20",
          "CLINRAGEN_WORKER__VISIBILITY_TIMEOUT_S": "25"}


def _unacked(redis: Redis) -> int:
    import redis as redis_lib

    return int(redis_lib.Redis.from_url(redis.url(0)).hlen("unacked"))  # type: ignore[arg-type]


@pytest.mark.integration
@pytest.mark.timeout(3600 if FULL else 600)
def test_sigkilled_workers_lose_and_duplicate_nothing(hapi: Hapi, clean_redis: Redis) -> None:
    rng = random.Random(20260801)
    pids = make_patients(hapi.url, "kill", N_PATIENTS)
    worker = Worker("kill", base_env(hapi.url, clean_redis, **LIMITS))
    worker.start()
    worker.ready()
    app = celery_app(clean_redis)
    t0 = time.monotonic()
    tasks = enqueue(app, pids)
    kills: list[dict[str, object]] = []
    # At least one whole-worker kill; the rest mostly pool children (the common OOM case).
    kinds = ["main"] + ["main" if rng.random() < 0.25 else "child" for _ in range(N_KILLS - 1)]
    rng.shuffle(kinds)
    deadline = time.monotonic() + (1500 if FULL else 240)
    for kind in kinds:
        # only kill while a task is running (delivered, not yet acknowledged), after a random
        # part of it has run
        try:
            wait_until("a running task", lambda: _unacked(clean_redis) > 0 and worker.pool(),
                       max(1.0, deadline - time.monotonic()), 0.05)
        except TimeoutError:
            break
        time.sleep(rng.uniform(0.05, 1.5))
        in_flight = _unacked(clean_redis)
        if kind == "child" and worker.pool():
            victim = rng.choice(worker.pool())
            os.kill(victim, signal.SIGKILL)
        else:
            kind = "main"
            worker.kill_main()
            worker.start()
            worker.ready()
        kills.append({"kind": kind, "at_s": round(time.monotonic() - t0, 1),
                      "unacked_at_kill": in_flight})
    assert len(kills) == N_KILLS, f"only {len(kills)} kills happened before the work ran out"
    waited = wait_all_done(app, tasks, max(60.0, deadline - time.monotonic()))
    elapsed = time.monotonic() - t0
    worker.stop()
    figures = outcome_figures(app, tasks, hapi.url, clean_redis)
    lost_worker = sum("WorkerLostError" in p.read_text(errors="replace") for p in worker.logs)
    record("worker_kill", {
        **figures, "kills": len(kills),
        "kills_by_kind": {k: sum(1 for x in kills if x["kind"] == k) for k in ("child", "main")},
        "kill_log": kills, "worker_logs_with_WorkerLostError": lost_worker,
        "diagnose_retries": len(log_lines(worker.logs, "diagnose retry")),
        "seconds": round(elapsed, 1), "drain_seconds": round(waited, 1),
        "queue_left": queue_len(clean_redis),
        "settings": LIMITS,
    })
    assert figures["lost"] == 0, figures
    assert figures["duplicated"] == 0, figures
    assert figures["reports_per_patient"] == {1: N_PATIENTS}, figures
    assert figures["dead_letters"] == [], figures
    assert set(figures["task_outcomes"]) <= {"written", "exists"}, figures
    assert queue_len(clean_redis) == 0


@pytest.mark.reliability
def test_unacked_tasks_are_swept_every_interval() -> None:
    """kombu's default sweep of Redis's unacked set is every 10 s x throttle 10: a dead
    worker's task came back up to 100 s after its visibility timeout (measured: 101 s drain
    with a 25 s timeout). The app sets the throttle to 1."""
    from clinragen_fhir.config import Settings
    from clinragen_fhir.worker.app import make_app

    options = make_app(Settings()).conf.broker_transport_options
    assert options["unacked_restore_throttle"] == 1
