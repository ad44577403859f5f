"""3. Broker restart: Redis (the broker, result backend and state store) restarts mid-run.

Redis runs as deploy/redis/start runs it: `appendonly yes`, `appendfsync everysec`. A graceful
restart (SHUTDOWN: the AOF is fsynced) must lose nothing. A hard kill (SIGKILL) can lose the
last second of writes with everysec; the full form measures that case too, and with
`appendfsync always`. Lost = a patient with neither a report nor a dead letter once the queue
has drained (bounded wait).
"""

from __future__ import annotations

import time

import pytest

from tests.reliability.stack import (
    FULL,
    Hapi,
    Redis,
    Worker,
    base_env,
    celery_app,
    dead_letters,
    enqueue,
    make_patients,
    now_instant,
    queue_len,
    record,
    reports_by_patient,
    wait_reports,
    wait_until,
)

pytestmark = pytest.mark.integration

N_PATIENTS = 200 if FULL else 20
CASES = [("shutdown", "everysec")] + ([("kill", "everysec"), ("kill", "always")] if FULL else [])


@pytest.mark.timeout(3600 if FULL else 600)
@pytest.mark.parametrize("how,fsync", CASES, ids=[f"{h}-{f}" for h, f in CASES])
def test_redis_restart_mid_run_loses_no_task(hapi: Hapi, redis_server: Redis, how: str,
                                             fsync: str) -> None:
    redis_server.stop()
    redis = Redis(redis_server.port, fsync=fsync)
    redis.start()
    redis.flush()
    pids = make_patients(hapi.url, f"broker{how}{fsync}", N_PATIENTS)
    worker = Worker(f"broker-{how}-{fsync}", base_env(hapi.url, redis))
    since = now_instant()
    try:
        worker.start()
        worker.ready()
        app = celery_app(redis)
        t0 = time.monotonic()
        enqueue(app, pids)
        # restart once about a quarter of the patients have their report
        wait_until("a quarter done", lambda: sum(
            1 for c in reports_by_patient(hapi.url, pids, since).values() if c)
            >= N_PATIENTS // 4, 300, 0.5)
        queued_before = queue_len(redis)
        down_at = time.monotonic()
        redis.stop(hard=(how == "kill"))
        time.sleep(2)
        redis.start()
        downtime = time.monotonic() - down_at
        queued_after = queue_len(redis)
        _waited, counts = wait_reports(hapi.url, pids, redis, since, 900 if FULL else 150)
        elapsed = time.monotonic() - t0
    finally:
        worker.stop()
    letters = dead_letters(redis)
    lettered = {str(d["args"][0]) for d in letters}
    lost = [p for p in pids if counts[p] == 0 and p not in lettered]
    duplicated = [p for p in pids if counts[p] > 1]
    record(f"broker_restart_{how}_{fsync}", {
        "patients": N_PATIENTS, "restart": how, "appendfsync": fsync,
        "queued_or_unacked_before": queued_before, "queued_or_unacked_after": queued_after,
        "downtime_s": round(downtime, 1), "lost": len(lost), "duplicated": len(duplicated),
        "dead_letters": [d["error"][:200] for d in letters],
        "seconds": round(elapsed, 1), "worker_restarted": False})
    redis.stop()
    redis_server.start()  # back to the suite's default settings
    assert not duplicated
    if how == "shutdown" or fsync == "always":
        assert not lost, f"{len(lost)} tasks lost"
        assert not letters, letters
