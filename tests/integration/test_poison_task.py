"""A task that kills its worker on every delivery ends in the dead-letter queue (issue 13, item 2).

A real `clinragen-fhir worker` (prefork) on a private redis-server runs this module's tasks
(`--include`): `poison` SIGKILLs its own pool child, as the OOM killer does. Celery's
`task_reject_on_worker_lost` hands it back each time; the delivery count stops it after
`max_deliveries` runs with a dead letter that says why, while `fine` runs as ever beside it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import redis

from clinragen_fhir.config import Settings
from clinragen_fhir.worker.app import app, make_app
from clinragen_fhir.worker.state import DELIVERIES_KEY, WorkerState
from clinragen_fhir.worker.tasks import DeadLetteringTask, load_runtime
from tests.unit.test_delivery_limit import private_redis

ROOT = Path(__file__).resolve().parents[2]
RUNS_KEY = "test:poison-runs"
MAX_DELIVERIES = 3


@app.task(bind=True, base=DeadLetteringTask,  # type: ignore[untyped-decorator]
          name="clinragen.test.poison")
def poison(self: Any, marker: str) -> None:
    """Count the run, then die the way an out-of-memory worker does."""
    redis.Redis.from_url(load_runtime()[0].state_url).incr(RUNS_KEY)
    os.kill(os.getpid(), signal.SIGKILL)


@app.task(bind=True, base=DeadLetteringTask,  # type: ignore[untyped-decorator]
          name="clinragen.test.fine")
def fine(self: Any, marker: str) -> str:
    return f"ok {marker}"


def _wait(what: str, check: Any, timeout_s: float) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if value := check():
            return value
        time.sleep(0.2)
    raise TimeoutError(f"timed out after {timeout_s:.0f} s waiting for {what}")


@pytest.mark.integration
@pytest.mark.timeout(120)
def test_a_task_that_kills_its_worker_every_time_is_dead_lettered(tmp_path: Path) -> None:
    with private_redis() as url:
        base = url.rsplit("/", 1)[0]
        broker, backend, state_url = f"{base}/0", f"{base}/1", f"{base}/2"
        env = {k: v for k, v in os.environ.items() if not k.startswith("CLINRAGEN_")}
        env.update({"CLINRAGEN_BROKER_URL": broker, "CLINRAGEN_RESULT_BACKEND": backend,
                    "CLINRAGEN_STATE_URL": state_url, "PYTHONUNBUFFERED": "1",
                    "CLINRAGEN_WORKER__MAX_DELIVERIES": str(MAX_DELIVERIES)})
        log = tmp_path / "worker.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "clinragen_fhir.cli", "worker", "-n", "poison@%h",
                 "--concurrency", "2", "--without-gossip", "--without-mingle",
                 "--include", "tests.integration.test_poison_task"],
                env=env, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True)
        try:
            _wait("the worker", lambda: proc.poll() is not None or
                  "ready." in log.read_text(errors="replace"), 60)
            assert proc.poll() is None, log.read_text()[-3000:]
            client = make_app(Settings(broker_url=broker, result_backend=backend,
                                       state_url=state_url))
            bad = client.send_task("clinragen.test.poison", args=("bad",), queue="clinragen")
            good = client.send_task("clinragen.test.fine", args=("good",), queue="clinragen")
            assert good.get(timeout=60) == "ok good"  # a normal task is unaffected
            [letter] = _wait("the dead letter", WorkerState(state_url).dead_letters, 60)
            assert letter.task == "clinragen.test.poison" and letter.args == ["bad"]
            assert letter.error == (
                f"DeliveryLimitExceeded: delivered {MAX_DELIVERIES + 1} times without "
                f"finishing (max_deliveries = {MAX_DELIVERIES}): its worker died on every run "
                "(out of memory, or killed); dead-lettered, not run again")
            r = redis.Redis.from_url(broker)
            _wait("the queue to drain", lambda: r.llen("clinragen") + r.hlen("unacked") == 0,
                  10)
            time.sleep(2)  # no further delivery comes
            state = redis.Redis.from_url(state_url)
            assert int(state.get(RUNS_KEY) or 0) == MAX_DELIVERIES
            assert not state.keys(f"{DELIVERIES_KEY}*")
            assert client.AsyncResult(bad.id).state == "FAILURE"
            assert log.read_text(errors="replace").count("WorkerLostError") >= MAX_DELIVERIES
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
