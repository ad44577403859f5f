"""The reliability suite's own services: HAPI on 8091, Redis on 6391, real worker processes.

Everything here is private to the suite (own ports, own data directories under
`.run/reliability/`), so it can kill and restart services while other jobs use the shared HAPI on
8080 and Redis on 6379. Loopback only; every wait is bounded.

Over 400 lines because every scenario drives the same services and workers: one module, so
they all start, stop and measure them alike.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx

from tests.observations import a1c

ROOT = Path(__file__).resolve().parents[2]
RUN = ROOT / ".run" / "reliability"
LOGS = RUN / "logs"
RESULTS = RUN / "results"
FULL = os.environ.get("RELIABILITY_FULL", "") not in ("", "0")
HAPI_PORT = int(os.environ.get("RELIABILITY_HAPI_PORT", "8091"))
REDIS_PORT = int(os.environ.get("RELIABILITY_REDIS_PORT", "6391"))
HAPI_URL = f"http://127.0.0.1:{HAPI_PORT}/fhir"
AMQP_PORT = int(os.environ.get("RELIABILITY_AMQP_PORT", "5673"))
SYSTEM = "urn:clinragen-fhir:report"
# Secrets the suite hands to the processes it runs; tests/reliability/test_security.py greps
# every log line for them.
LOG_ID_KEY = "reliability-log-key-" + uuid.uuid4().hex[:12]
BEARER_TOKEN = "reliability-bearer-" + uuid.uuid4().hex
WEBHOOK_SECRET = "reliability-webhook-" + uuid.uuid4().hex[:16]
SECRETS = (LOG_ID_KEY, BEARER_TOKEN, WEBHOOK_SECRET)
PATIENT_IDS: set[str] = set()  # every patient id the suite created (for the log grep)


def wait_until(what: str, check: Callable[[], Any], timeout_s: float,
               every_s: float = 0.5) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(every_s)
    raise TimeoutError(f"timed out after {timeout_s:.0f} s waiting for {what}")


def wait_reported(url: str, pids: list[str], since: str, at_least: int, what: str,
                  timeout_s: float = 300, every_s: float = 0.5) -> None:
    """Until `at_least` of the patients have a report written since `since` (a fault is
    injected once part of the run is done)."""
    wait_until(what, lambda: sum(1 for c in reports_by_patient(url, pids, since).values() if c)
               >= at_least, timeout_s, every_s)


def record(scenario: str, data: dict[str, Any], to: Path | None = None) -> None:
    """Write a scenario's figures to .run/reliability/results/<scenario>.json for the report
    (full form), or to results-short/ (short form: a `make test` after a full run must not
    replace the full form's figures, as it did once)."""
    where = to or (RESULTS if FULL else RESULTS.with_name("results-short"))
    where.mkdir(parents=True, exist_ok=True)
    out = {"scenario": scenario, "form": "full" if FULL else "short",
           "recorded_at": datetime.now(UTC).isoformat(timespec="seconds"), **data}
    (where / f"{scenario}.json").write_text(json.dumps(out, indent=2, default=str))


# -- HAPI ----------------------------------------------------------------------------------------
class Hapi:
    """deploy/hapi/start|stop with this suite's port and directories."""

    def __init__(self, port: int = HAPI_PORT) -> None:
        self.port = port
        self.dir = ROOT / ".run" / "hapi-reliability"
        self.url = f"http://127.0.0.1:{port}/fhir"
        self.env = {**os.environ, "HAPI_PORT": str(port), "HAPI_DATA_DIR": str(self.dir),
                    "HAPI_RUN_DIR": str(self.dir), "HAPI_SUBSCRIPTIONS": "false",
                    "HAPI_JAVA_OPTS": os.environ.get("RELIABILITY_HAPI_JAVA_OPTS",
                                                     "-Xms256m -Xmx1536m")}

    def up(self) -> bool:
        try:
            return httpx.get(f"{self.url}/metadata", timeout=5).status_code == 200
        except httpx.HTTPError:
            return False

    def start(self) -> float:
        t0 = time.monotonic()
        self.dir.mkdir(parents=True, exist_ok=True)
        subprocess.run([str(ROOT / "deploy/hapi/start")], env=self.env, check=True,
                       capture_output=True, timeout=400)
        return time.monotonic() - t0

    def stop(self) -> None:
        subprocess.run([str(ROOT / "deploy/hapi/stop")], env=self.env, check=True,
                       capture_output=True, timeout=120)

    def wipe(self) -> None:
        for p in self.dir.glob("h2*"):
            p.unlink()


# -- Redis ---------------------------------------------------------------------------------------
class Redis:
    """A private redis-server with the persistence deploy/redis/start documents (AOF, everysec)."""

    def __init__(self, port: int = REDIS_PORT, fsync: str = "everysec") -> None:
        self.port, self.fsync = port, fsync
        # its own AOF directory per port (a second suite on other ports must not share it)
        self.dir = RUN / ("redis" if port == 6391 else f"redis-{port}")

    def url(self, db: int) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def ping(self) -> bool:
        return subprocess.run(["redis-cli", "-p", str(self.port), "ping"], capture_output=True,
                              text=True, timeout=10).stdout.strip() == "PONG"

    def start(self) -> None:
        if self.ping():
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        subprocess.run(["redis-server", "--bind", "127.0.0.1", "--port", str(self.port),
                        "--daemonize", "yes", "--dir", str(self.dir), "--appendonly", "yes",
                        "--appendfsync", self.fsync, "--pidfile", str(self.dir / "redis.pid"),
                        "--logfile", str(self.dir / "redis.log"), "--save", ""],
                       check=True, timeout=30)
        wait_until("redis", self.ping, 20, 0.1)

    def pid(self) -> int:
        return int((self.dir / "redis.pid").read_text())

    def stop(self, hard: bool = False) -> None:
        """SHUTDOWN (fsyncs the AOF) or, with `hard`, SIGKILL (loses up to 1 s on everysec)."""
        if hard:
            pid = self.pid()
            os.kill(pid, signal.SIGKILL)
            wait_until("redis to die", lambda: not Path(f"/proc/{pid}").exists(), 20, 0.1)
            (self.dir / "redis.pid").unlink(missing_ok=True)
        else:
            subprocess.run(["redis-cli", "-p", str(self.port), "shutdown"], capture_output=True,
                           timeout=30)
        wait_until("redis to stop", lambda: not self.ping(), 20, 0.1)

    def flush(self) -> None:
        subprocess.run(["redis-cli", "-p", str(self.port), "flushall"], check=True,
                       capture_output=True, timeout=30)


# -- RabbitMQ ------------------------------------------------------------------------------------
RABBITMQ_BIN = Path(os.environ.get("RELIABILITY_RABBITMQ_BIN", "/usr/lib/rabbitmq/bin"))


class RabbitMQ:
    """A private RabbitMQ node from the Debian package's own scripts (deploy/rabbitmq/start
    installs them), next to the shared node on 5672 and without touching it: its own node
    name, AMQP port (5673), distribution port (25673), EPMD (4373), Erlang cookie (HOME), data
    and logs under .run/reliability/rabbitmq; loopback only; no plugins. The default user
    `guest` works from loopback only."""

    def __init__(self, port: int = AMQP_PORT) -> None:
        self.port = port
        self.dir = RUN / "rabbitmq"
        self.node = f"clinragen-rel-{port}@localhost"
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith(("RABBITMQ_", "ERL_"))},
            "HOME": str(self.dir / "home"), "RABBITMQ_NODENAME": self.node,
            "RABBITMQ_USE_LONGNAME": "false",
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1", "RABBITMQ_NODE_PORT": str(port),
            "RABBITMQ_DIST_PORT": str(port + 20000),
            "ERL_EPMD_PORT": str(port - 1300), "ERL_EPMD_ADDRESS": "127.0.0.1",
            "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": "-kernel inet_dist_use_interface {127,0,0,1}",
            "RABBITMQ_MNESIA_BASE": str(self.dir / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.dir / "log"),
            "RABBITMQ_PID_FILE": str(self.dir / "rabbit.pid"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.dir / "enabled_plugins"),
            "RABBITMQ_CONFIG_FILE": str(self.dir / "rabbitmq.conf"),
            "RABBITMQ_CONF_ENV_FILE": str(self.dir / "rabbitmq-env.conf"),
        }

    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}//"

    def answers(self) -> bool:
        import socket

        try:
            socket.create_connection(("127.0.0.1", self.port), timeout=2).close()
            return True
        except OSError:
            return False

    def ctl(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(RABBITMQ_BIN / "rabbitmqctl"), "-n", self.node, *args],
                              env=self.env, capture_output=True, text=True, timeout=timeout)

    def start(self, timeout_s: float = 120) -> float:
        t0 = time.monotonic()
        if not (RABBITMQ_BIN / "rabbitmq-server").exists():
            raise RuntimeError(f"no {RABBITMQ_BIN}/rabbitmq-server: run deploy/rabbitmq/start "
                               "(it installs Debian's rabbitmq-server)")
        if self.answers():  # ours, kept by RELIABILITY_KEEP=1? reuse it; anything else: fail
            if self.ctl("status").returncode == 0:
                return 0.0
            raise RuntimeError(f"something else answers on 127.0.0.1:{self.port}")
        home = self.dir / "home"
        for d in (home, self.dir / "mnesia", self.dir / "log"):
            d.mkdir(parents=True, exist_ok=True)
        cookie = home / ".erlang.cookie"
        if not cookie.exists():
            cookie.write_text(uuid.uuid4().hex.upper())
            cookie.chmod(0o400)
        (self.dir / "enabled_plugins").write_text("[].\n")
        (self.dir / "rabbitmq.conf").write_text(
            f"listeners.tcp.default = 127.0.0.1:{self.port}\nloopback_users.guest = true\n")
        (self.dir / "rabbitmq-env.conf").write_text("")
        self.starts += 1
        with open(self.dir / "log" / f"server-{self.starts}.out", "wb") as log:
            self.proc = subprocess.Popen([str(RABBITMQ_BIN / "rabbitmq-server")], env=self.env,
                                         stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)

        def up() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"rabbitmq-server exited {self.proc.returncode}; see "
                                   f"{self.dir / 'log'}")
            return self.answers()
        wait_until("rabbitmq", up, timeout_s, 0.3)
        return time.monotonic() - t0

    def pid(self) -> int:
        return int((self.dir / "rabbit.pid").read_text().strip())

    def stop(self, hard: bool = False) -> None:
        """`rabbitmqctl stop` (graceful: queues and message store closed cleanly) or, with
        `hard`, SIGKILL of the Erlang VM (beam.smp), as a crash or an OOM kill would."""
        if hard:
            pid = self.pid()
            os.kill(pid, signal.SIGKILL)
            wait_until("rabbitmq to die", lambda: not Path(f"/proc/{pid}").exists(), 20, 0.1)
        else:
            self.ctl("stop", timeout=120)
        if self.proc is not None:
            self.proc.wait(60)
        wait_until("rabbitmq to stop", lambda: not self.answers(), 30, 0.2)

    def shutdown(self) -> None:
        """Stop the node if it runs, and its private EPMD."""
        if self.answers():
            self.stop()
        subprocess.run(["epmd", "-port", self.env["ERL_EPMD_PORT"], "-kill"],
                       env=self.env, capture_output=True, timeout=30)

    def queue(self, name: str = "clinragen") -> dict[str, Any]:
        """durable, queue type, ready and unacknowledged messages of a queue (rabbitmqctl)."""
        out = self.ctl("list_queues", "-q", "--no-table-headers", "name", "durable", "type",
                       "messages_ready", "messages_unacknowledged").stdout
        for line in out.splitlines():
            parts = line.split()
            if parts and parts[0] == name:
                return {"durable": parts[1] == "true", "type": parts[2],
                        "ready": int(parts[3]), "unacked": int(parts[4])}
        return {}

    def purge(self, name: str = "clinragen") -> None:
        self.ctl("purge_queue", name)


# -- workers -------------------------------------------------------------------------------------
def children(pid: int) -> list[int]:
    """Direct children of a process (Celery's prefork pool), from /proc."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def rss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def base_env(fhir_url: str, redis: Redis, **extra: str) -> dict[str, str]:
    """The environment of every process the suite runs: its own stores, its own secrets."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLINRAGEN_")}
    env.update({
        "CLINRAGEN_FHIR__BASE_URL": fhir_url,
        # The token goes to HAPI (which ignores it) on every request: the log grep proves it
        # never reaches a log line.
        "CLINRAGEN_FHIR__AUTH": "bearer", "CLINRAGEN_FHIR__TOKEN_ENV": "RELIABILITY_TOKEN",
        # with a file's trailing newline: stripped when read, so httpx never quotes it in an
        # "Illegal header value" error (issue 13; tests/unit/test_log_grep.py)
        "RELIABILITY_TOKEN": BEARER_TOKEN + "\n",
        "CLINRAGEN_BROKER_URL": redis.url(0), "CLINRAGEN_RESULT_BACKEND": redis.url(1),
        "CLINRAGEN_STATE_URL": redis.url(2), "CLINRAGEN_LOG_ID_KEY": LOG_ID_KEY,
        "CLINRAGEN_WORKER__SOFT_TIME_LIMIT_S": "40", "CLINRAGEN_WORKER__TIME_LIMIT_S": "50",
        "CLINRAGEN_WORKER__VISIBILITY_TIMEOUT_S": "60",
        "CLINRAGEN_WORKER__RETRY_BACKOFF_S": "1", "CLINRAGEN_WORKER__RETRY_BACKOFF_MAX_S": "8",
        "CLINRAGEN_FHIR__TIMEOUT_S": "10",
        "PYTHONUNBUFFERED": "1",
    })
    env.update(extra)
    return env


@dataclass
class Worker:
    """One `clinragen-fhir worker` process (prefork), its log captured under .run/reliability."""

    name: str
    env: dict[str, str]
    concurrency: int = 2
    proc: subprocess.Popen[bytes] | None = None
    starts: int = 0
    logs: list[Path] = field(default_factory=list)

    def start(self) -> None:
        LOGS.mkdir(parents=True, exist_ok=True)
        self.starts += 1
        path = LOGS / f"worker-{self.name}-{self.starts}.log"
        self.logs.append(path)
        with open(path, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "clinragen_fhir.cli", "worker", "-n",
                 f"{self.name}-{self.starts}@%h", "--concurrency", str(self.concurrency),
                 "--without-gossip", "--without-mingle"],
                env=self.env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                start_new_session=True)

    def ready(self, timeout_s: float = 90) -> None:
        """The pool children are up (the worker consumes once its children exist)."""
        def up() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"worker exited: {self.logs[-1].read_text()[-3000:]}")
            return len(children(self.proc.pid)) >= self.concurrency and \
                "ready." in self.logs[-1].read_text(errors="replace")
        wait_until(f"worker {self.name}", up, timeout_s, 0.3)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def pool(self) -> list[int]:
        return children(self.pid) if self.proc and self.proc.poll() is None else []

    def kill_main(self) -> None:
        """SIGKILL the main process and its pool (the whole process group, as an OOM or a
        node loss would): unacknowledged tasks stay with Redis until the visibility timeout."""
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(30)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(30)


# -- patients ------------------------------------------------------------------------------------
def make_patients(url: str, prefix: str, n: int, per_bundle: int = 50) -> list[str]:
    """`n` small patients (three HbA1c readings, diabetic range), PUT by id in transactions."""
    run = uuid.uuid4().hex[:8]
    pids = [f"rel-{prefix}-{run}-{i:04d}" for i in range(n)]
    PATIENT_IDS.update(pids)
    with httpx.Client(timeout=300) as http:
        for start in range(0, n, per_bundle):
            entries: list[dict[str, Any]] = []
            for i, pid in enumerate(pids[start:start + per_bundle], start):
                entries.append({"resource": {"resourceType": "Patient", "id": pid,
                                             "gender": "female" if i % 2 else "male",
                                             "birthDate": f"19{50 + i % 40}-04-12"},
                                "request": {"method": "PUT", "url": f"Patient/{pid}"}})
                for j, (value, days) in enumerate(((6.9 + i % 5 / 10, 400), (7.4, 200),
                                                   (8.1, 20))):
                    oid = f"{pid}-a1c-{j}"
                    entries.append({"resource": a1c(pid, value, days, oid),
                                    "request": {"method": "PUT", "url": f"Observation/{oid}"}})
            r = http.post(url, json={"resourceType": "Bundle", "type": "transaction",
                                     "entry": entries},
                          headers={"Content-Type": "application/fhir+json"})
            r.raise_for_status()
    return pids


def reports_by_patient(url: str, pids: Iterable[str], since: str | None = None) -> Counter[str]:
    """How many of our DiagnosticReports (identifier system ours) each patient has; `since`
    (an instant) limits the search to reports written from then on."""
    counts: Counter[str] = Counter({p: 0 for p in pids})
    wanted = set(counts)
    with httpx.Client(timeout=120) as http:
        next_url: str | None = f"{url}/DiagnosticReport"
        params: dict[str, Any] | None = {"identifier": f"{SYSTEM}|", "_count": 500,
                                         "_elements": "subject,identifier"}
        if since:
            params["_lastUpdated"] = f"ge{since}"
        pages = 0
        while next_url and pages < 1000:
            r = http.get(next_url, params=params)
            r.raise_for_status()
            bundle = r.json()
            for e in bundle.get("entry", []) or []:
                ref = str(e["resource"].get("subject", {}).get("reference", ""))
                pid = ref.removeprefix("Patient/")
                if pid in wanted:
                    counts[pid] += 1
            next_url = next((lk["url"] for lk in bundle.get("link", [])
                             if lk.get("relation") == "next"), None)
            params, pages = None, pages + 1
    return counts


def celery_app(redis: Redis, broker_url: str | None = None) -> Any:
    """A Celery client on the suite's broker (never the module-level app: other tests point
    that at the shared Redis); `broker_url` for another broker (the private RabbitMQ)."""
    from clinragen_fhir.config import Settings
    from clinragen_fhir.worker.app import make_app

    return make_app(Settings(broker_url=broker_url or redis.url(0),
                             result_backend=redis.url(1), state_url=redis.url(2)))


def enqueue(app: Any, pids: Iterable[str]) -> dict[str, str]:
    """One diagnose task per patient; returns task id by patient."""
    return {pid: app.send_task("clinragen.diagnose", args=(pid,), queue="clinragen").id
            for pid in pids}


def task_states(app: Any, tasks: dict[str, str]) -> dict[str, tuple[str, Any]]:
    """(state, result) of each patient's task from the result backend."""
    out = {}
    for pid, tid in tasks.items():
        res = app.AsyncResult(tid)
        out[pid] = (res.state, res.result if res.state == "SUCCESS" else repr(res.result))
    return out


def dead_letters(redis: Redis) -> list[dict[str, Any]]:
    from clinragen_fhir.worker.state import WorkerState

    return [d.__dict__ for d in WorkerState(redis.url(2)).dead_letters()]


def queue_len(redis: Redis) -> int:
    import redis as redis_lib

    r = redis_lib.Redis.from_url(redis.url(0))
    return int(r.llen("clinragen")) + int(r.hlen("unacked"))  # type: ignore[arg-type]


def log_lines(paths: Iterable[Path], msg: str) -> list[dict[str, Any]]:
    """JSON log lines whose msg is `msg` (worker logs mix JSON and Celery's own text)."""
    out = []
    for path in paths:
        for line in path.read_text(errors="replace").splitlines():
            if line.startswith("{") and f'"msg": "{msg}"' in line:
                try:
                    out.append(json.loads(line))
                except ValueError:
                    continue
    return out


def wait_all_done(app: Any, tasks: dict[str, str], timeout_s: float,
                  while_waiting: Callable[[], None] | None = None) -> float:
    """Wait until every task has a final state (SUCCESS or FAILURE); seconds waited.

    Raises TimeoutError naming how many are still pending (those would be lost tasks)."""
    t0 = time.monotonic()
    pending = dict(tasks)
    deadline = t0 + timeout_s
    while pending and time.monotonic() < deadline:
        for pid, tid in list(pending.items()):
            if app.AsyncResult(tid).state in ("SUCCESS", "FAILURE"):
                del pending[pid]
        if while_waiting is not None:
            while_waiting()
        if pending:
            time.sleep(1)
    if pending:
        raise TimeoutError(f"{len(pending)} of {len(tasks)} tasks not finished after "
                           f"{timeout_s:.0f} s")
    return time.monotonic() - t0


def outcome_figures(app: Any, tasks: dict[str, str], hapi_url: str,
                    redis: Redis) -> dict[str, Any]:
    """Lost / duplicated / failed counts, from the FHIR server, the result backend and the DLQ.

    lost: a patient with no report and no dead letter (its task vanished).
    duplicated: a patient with more than one of our reports (all inputs are unchanged, so
    exactly one report per patient is the only right answer)."""
    states = task_states(app, tasks)
    counts = reports_by_patient(hapi_url, tasks)
    letters = dead_letters(redis)
    lost, duplicated = lost_and_duplicated(list(tasks), counts, letters)
    statuses = Counter(str(r.get("status")) if isinstance(r, dict) else s
                       for s, r in states.values())
    return {
        "patients": len(tasks),
        "reports_per_patient": dict(Counter(counts.values())),
        "lost": len(lost),
        "duplicated": len(duplicated),
        "task_outcomes": dict(statuses),
        "dead_letters": [{"patient_is_ours": str(d["args"][0]) in tasks,
                          "error": d["error"], "retries": d["retries"]} for d in letters],
    }


def lost_and_duplicated(pids: Iterable[str], counts: Counter[str],
                        letters: list[dict[str, Any]]) -> tuple[list[str], list[str]]:
    """lost: a patient with no report and no dead letter (its task vanished); duplicated: a
    patient with more than one of our reports."""
    lettered = {str(d["args"][0]) for d in letters if d.get("args")}
    pids = list(pids)
    return ([p for p in pids if counts[p] == 0 and p not in lettered],
            [p for p in pids if counts[p] > 1])


def now_instant() -> str:
    return (datetime.now(UTC) - timedelta(seconds=2)).strftime("%Y-%m-%dT%H:%M:%SZ")


def wait_reports(url: str, pids: list[str], redis: Redis, since: str,
                 timeout_s: float) -> tuple[float, Counter[str]]:
    """Wait until every patient has a report or a dead letter (the FHIR server is the truth:
    a result backend on a restarted Redis may itself lose results). Bounded by `timeout_s`."""
    t0 = time.monotonic()
    counts: Counter[str] = Counter()
    while time.monotonic() - t0 < timeout_s:
        counts = reports_by_patient(url, pids, since)
        lettered = {str(d["args"][0]) for d in dead_letters(redis) if d.get("args")}
        if all(counts[p] or p in lettered for p in pids):
            break
        time.sleep(3)
    return time.monotonic() - t0, counts
