"""The soft time limit stops a task stuck on a slow FHIR server; it is dead-lettered, and
`clinragen-fhir dlq list/requeue` shows it and puts it back on the queue.

A real worker process (prefork: time limits need it) with a 2 s soft / 6 s hard limit, reading
from a local HTTP server that answers after 20 s. Its own Redis databases (7, 8, 9).
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import redis

from clinragen_fhir.config import Settings
from clinragen_fhir.worker.app import make_app
from clinragen_fhir.worker.state import WorkerState
from tests.integration.conftest import ROOT, worker_env
from tests.integration.hospital import cli

pytestmark = pytest.mark.integration
BROKER, BACKEND, STATE = (f"redis://127.0.0.1:6379/{n}" for n in (7, 8, 9))


class Slow(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        time.sleep(20)
        self.send_response(503)
        self.end_headers()

    do_POST = do_GET  # the worker's reads are one batch Bundle, POSTed to the base

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture()
def slow_fhir() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), Slow)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/fhir"
    server.shutdown()


def test_soft_time_limit_ends_a_stuck_task_and_dead_letters_it(slow_fhir: str) -> None:
    for url in (BROKER, BACKEND, STATE):
        redis.Redis.from_url(url).flushdb()
    env = worker_env(CLINRAGEN_BROKER_URL=BROKER, CLINRAGEN_RESULT_BACKEND=BACKEND,
                     CLINRAGEN_STATE_URL=STATE, CLINRAGEN_FHIR__BASE_URL=slow_fhir,
                     CLINRAGEN_FHIR__TIMEOUT_S="60", CLINRAGEN_FHIR__RETRIES="0",
                     CLINRAGEN_WORKER__SOFT_TIME_LIMIT_S="2", CLINRAGEN_WORKER__TIME_LIMIT_S="6",
                     CLINRAGEN_WORKER__VISIBILITY_TIMEOUT_S="60")
    log_path = ROOT / ".run" / "test-worker-limits.log"
    log_path.parent.mkdir(exist_ok=True)
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "clinragen_fhir.cli", "worker", "-n",
                                 "limits@%h", "--concurrency", "1"], env=env, stdout=log,
                                stderr=subprocess.STDOUT)
        try:
            app = make_app(Settings(broker_url=BROKER, result_backend=BACKEND))
            deadline = time.monotonic() + 60
            while not app.control.inspect(timeout=1).ping():
                assert proc.poll() is None and time.monotonic() < deadline, \
                    log_path.read_text()[-2000:]
            started = time.monotonic()
            result = app.send_task("clinragen.diagnose", args=["stuck-patient"])
            with pytest.raises(Exception) as failure:
                result.get(timeout=60)
            elapsed = time.monotonic() - started
            time.sleep(8)  # past the hard limit: a finished task must not be timed out again
        finally:
            proc.terminate()
            proc.wait(30)
    assert type(failure.value).__name__ == "SoftTimeLimitExceeded", repr(failure.value)
    assert elapsed < 6, elapsed  # the soft limit (2 s) fired, well before the server answered
    letters = WorkerState(STATE).dead_letters()
    assert [(d.task, d.args) for d in letters] == [("clinragen.diagnose", ["stuck-patient"])]
    assert "SoftTimeLimitExceeded" in letters[0].error
    assert "stuck-patient" not in log_path.read_text()  # ids are hashed in the logs
    # The operator's view: list, then re-queue (no worker runs now, so it waits in the queue).
    listed = cli("dlq", "list", CLINRAGEN_STATE_URL=STATE)
    assert letters[0].id in listed.stdout and "SoftTimeLimitExceeded" in listed.stdout
    assert "1 dead letters" in listed.stdout and "stuck-patient" not in listed.stdout
    requeued = cli("dlq", "requeue", "--all", CLINRAGEN_STATE_URL=STATE,
                   CLINRAGEN_BROKER_URL=BROKER, CLINRAGEN_RESULT_BACKEND=BACKEND)
    assert f"{letters[0].id}: re-queued" in requeued.stdout, requeued.stderr
    assert WorkerState(STATE).dead_letters() == []
    assert redis.Redis.from_url(BROKER).llen("clinragen") == 1
