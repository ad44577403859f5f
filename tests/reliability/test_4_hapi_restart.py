"""4. HAPI restart mid-run: no duplicate, no lost report.

deploy/hapi/stop (TERM, clean H2 close) then deploy/hapi/start while workers are busy. With the
default retry settings (fhir.retries 3; worker.retry_backoff_s 5, retry_backoff_max_s 300,
max_retries 5) a task keeps retrying for at least ~77 s (jitter 0.5x), longer than the
restart takes here (30-65 s on the shared 2-core box).
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
    enqueue,
    log_lines,
    make_patients,
    now_instant,
    outcome_figures,
    record,
    wait_all_done,
    wait_reported,
)

pytestmark = pytest.mark.integration

N_PATIENTS = 200 if FULL else 12
DEFAULT_RETRIES = {"CLINRAGEN_WORKER__RETRY_BACKOFF_S": "5",
                   "CLINRAGEN_WORKER__RETRY_BACKOFF_MAX_S": "300",
                   # visibility must exceed the longest countdown (300 s x 1.5 jitter)
                   "CLINRAGEN_WORKER__VISIBILITY_TIMEOUT_S": "600"}


@pytest.mark.timeout(3600 if FULL else 600)
def test_hapi_restart_mid_run(hapi: Hapi, clean_redis: Redis) -> None:
    pids = make_patients(hapi.url, "hapirestart", N_PATIENTS)
    worker = Worker("hapi-restart", base_env(hapi.url, clean_redis, **DEFAULT_RETRIES))
    since = now_instant()
    try:
        worker.start()
        worker.ready()
        app = celery_app(clean_redis)
        t0 = time.monotonic()
        tasks = enqueue(app, pids)
        wait_reported(hapi.url, pids, since, max(1, N_PATIENTS // 6), "some reports",
                      every_s=0.3)
        down_at = time.monotonic()
        hapi.stop()
        stopped = time.monotonic() - down_at
        # deploy/hapi/stop only stops the server its run dir started: make sure it really went
        assert not hapi.up(), "HAPI still answers after stop (not started from this run dir?)"
        start_s = hapi.start()
        downtime = time.monotonic() - down_at
        wait_all_done(app, tasks, 1800 if FULL else 300)
        elapsed = time.monotonic() - t0
    finally:
        worker.stop()
        if not hapi.up():
            hapi.start()
    figures = outcome_figures(app, tasks, hapi.url, clean_redis)
    record("hapi_restart", {
        **figures, "downtime_s": round(downtime, 1), "stop_s": round(stopped, 1),
        "start_s": round(start_s, 1), "seconds": round(elapsed, 1),
        "client_retries_logged": len(log_lines(worker.logs, "fhir retry")),
        "task_retries_logged": len(log_lines(worker.logs, "diagnose retry")),
        "task_retry_max": max((int(x["retry"]) for x in log_lines(worker.logs,
                                                                   "diagnose retry")),
                              default=0),
        "settings": DEFAULT_RETRIES})
    assert figures["lost"] == 0 and figures["duplicated"] == 0, figures
    assert figures["reports_per_patient"] == {1: N_PATIENTS}, figures
    assert figures["dead_letters"] == [], figures
