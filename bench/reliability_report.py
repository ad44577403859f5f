"""Render docs/reliability.md from the suite's results (.run/reliability/results/*.json).

    make reliability-report          # full suite + load bench + this renderer
    .venv/bin/python bench/reliability_report.py   # re-render from the last run's results

Every number in the document comes from a results file written by tests/reliability or
bench/load.py; a scenario without results says so instead of showing a stale figure. The
renderer refuses (exit 1, writing nothing) when the last run's junit.xml is missing or has
failures or errors, or when a results file was recorded before that run started: a figure
from an earlier run must never be shown as this run's.

Over 400 lines because most of it is the page's own prose (each scenario's set-up, the findings
and their fixes), kept beside the code that fills in its figures.
"""

from __future__ import annotations

import itertools
import json
import sys
import xml.etree.ElementTree as ET
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / ".run" / "reliability" / "results"
JUNIT = ROOT / ".run" / "reliability" / "junit.xml"
OUT = ROOT / "docs" / "reliability.md"
SUITE = "RELIABILITY_FULL=1 .venv/bin/pytest -m reliability"


class Refused(Exception):
    """The results are not one complete, passing run's: nothing is rendered."""


def _instant(text: str, what: str) -> datetime:
    try:
        when = datetime.fromisoformat(text)
    except (TypeError, ValueError):
        raise Refused(f"{what}: no readable time ({text!r})") from None
    return when if when.tzinfo else when.astimezone()  # a naive time is the local time


def _suite(junit: Path) -> ET.Element:
    if not junit.is_file():
        raise Refused(f"no junit results ({junit}): run `make reliability-report`")
    root = ET.parse(junit).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    if suite is None:
        raise Refused(f"{junit} has no testsuite")
    return suite


def run_started(junit: Path | None = None) -> datetime:
    """When the last suite run started (junit.xml's testsuite timestamp), refusing a run with
    failures or errors."""
    junit = junit or JUNIT
    suite = _suite(junit)
    failed = int(suite.get("failures", 0)) + int(suite.get("errors", 0))
    if failed:
        raise Refused(f"{junit}: {suite.get('failures')} failures, {suite.get('errors')} "
                      "errors: the suite did not pass, so its figures are not rendered")
    if not int(suite.get("tests", 0)):
        raise Refused(f"{junit}: no tests ran")
    return _instant(str(suite.get("timestamp")), f"{junit} testsuite timestamp")


def check_fresh(started: datetime, results: Path | None = None) -> list[str]:
    """The results files that are not from the run that started at `started` (recorded
    before it, or with no time at all); `recorded_at` has whole seconds, so the start is too."""
    results = results or RESULTS
    start = started.replace(microsecond=0) - timedelta(seconds=1)
    stale = []
    for path in sorted(results.glob("*.json")):
        try:
            recorded = _instant(json.loads(path.read_text()).get("recorded_at"), path.name)
        except (Refused, ValueError, AttributeError):
            stale.append(f"{path.name} (no recorded_at)")
            continue
        if recorded < start:
            stale.append(f"{path.name} (recorded {recorded.isoformat()}, the run started "
                         f"{started.isoformat(timespec='seconds')})")
    return stale


def load(name: str) -> dict[str, Any] | None:
    path = RESULTS / f"{name}.json"
    if not path.is_file():
        return None
    data: dict[str, Any] = json.loads(path.read_text())
    if STARTED is not None and \
            _instant(data.get("recorded_at"), path.name) < STARTED - timedelta(seconds=1):
        raise Refused(f"{path.name} is older than the run (started {STARTED.isoformat()})")
    return data


STARTED: datetime | None = None  # the rendered run's start, once main() has checked it


def missing(what: str, command: str) -> str:
    return f"_No results for {what}: run `{command}`._\n"


def table(rows: list[tuple[str, Any]]) -> str:
    out = ["| | |", "|---|---|"]
    out += [f"| {k} | {v} |" for k, v in rows]
    return "\n".join(out) + "\n"


def stamp(r: dict[str, Any]) -> str:
    return f"({r.get('form', '?')} form, recorded {r.get('recorded_at', '?')})"


def junit_summary() -> str:
    suite = _suite(JUNIT)
    rows = []
    for case in suite.iter("testcase"):
        state = "passed"
        for tag in ("failure", "error", "skipped"):
            if case.find(tag) is not None:
                state = {"failure": "**FAILED**", "error": "**ERROR**", "skipped": "skipped"}[tag]
        rows.append(f"| `{case.get('classname', '').rsplit('.', 1)[-1]}::"
                    f"{case.get('name')}` | {state} | {float(case.get('time', 0)):.1f} s |")
    head = (f"{suite.get('tests')} tests, {suite.get('failures')} failures, "
            f"{suite.get('errors')} errors, {suite.get('skipped')} skipped, "
            f"{float(suite.get('time', 0)):.0f} s\n\n")
    return head + "| test | result | time |\n|---|---|---|\n" + "\n".join(rows) + "\n"


def section_kill() -> str:
    r = load("worker_kill")
    out = ["## 1. Worker killed (SIGKILL mid-task)\n",
           f"Command: `{SUITE} tests/reliability/test_1_worker_kill.py`\n",
           "A worker (prefork, 2 children) works through the patients while the test SIGKILLs, "
           "only while Redis holds an unacknowledged delivery (a task running, or a killed "
           "worker's task waiting to come back) and after a random 0.05-1.5 s: a pool child "
           "(billiard reports `WorkerLostError`; with "
           "`reject_on_worker_lost` the task goes straight back to the queue), or the whole "
           "worker, main process and pool (the task stays in Redis's unacked set and comes back "
           "after the visibility timeout; the worker is restarted). Seeded (`random.Random("
           "20260801)`).\n"]
    if not r:
        return "\n".join(out) + missing("worker kills", SUITE)
    out.append(stamp(r) + "\n")
    out.append(table([
        ("patients", r["patients"]),
        ("kills", f"{r['kills']} (pool child {r['kills_by_kind']['child']}, whole worker "
                  f"{r['kills_by_kind']['main']})"),
        ("**lost**", f"**{r['lost']}**"), ("**duplicated**", f"**{r['duplicated']}**"),
        ("reports per patient", r["reports_per_patient"]),
        ("task outcomes", r["task_outcomes"]), ("dead letters", len(r["dead_letters"])),
        ("run time", f"{r['seconds']} s (drain after the last kill {r['drain_seconds']} s)"),
        ("settings", ", ".join(f"`{k}={v}`" for k, v in r["settings"].items())),
    ]))
    out.append(
        "**Found and fixed:** kombu sweeps Redis's unacked set only every "
        "`unacked_restore_interval` x `unacked_restore_throttle` = 10 s x 10 by default, so a "
        "whole-worker kill's task came back up to 100 s *after* its visibility timeout "
        "(found as a 101 s drain with a 25 s timeout, before the fix; this run's drain is in "
        "the table). `worker/app.py` now sets "
        "`unacked_restore_throttle = 1` (one ZRANGE every 10 s); "
        "`test_unacked_tasks_are_swept_every_interval` pins it.\n")
    return "\n".join(out)


def section_faults() -> str:
    r = load("fhir_faults")
    out = ["## 2. FHIR server faults (fault-injecting proxy)\n",
           f"Command: `{SUITE} tests/reliability/test_2_fhir_faults.py`\n",
           "`tests/reliability/proxy.py`: an asyncio HTTP/1.1 proxy on 127.0.0.1 in front of "
           "HAPI. At 20% of requests (seeded) it answers 500, 503 with `Retry-After: 1`, 503 "
           "without, 429 with `Retry-After: 1`, resets the connection (RST), delays the "
           "answer 0.5-3 s, delays it 12 s (past the 10 s client timeout; the request still "
           "reaches HAPI afterwards), or forwards a POST and then answers 500 although HAPI "
           "committed it. Two extra patients do not exist (404): they are what truly cannot "
           "succeed.\n"]
    if r:
        p = r["proxy"]
        out.append(stamp(r) + "\n")
        out.append(table([
            ("patients", f"{r['patients'] - r['impossible_patients']} + "
                         f"{r['impossible_patients']} that do not exist"),
            ("requests through the proxy", p["requests"]),
            ("faults injected", f"{sum(p['faults'].values())} ({p['fault_share']:.1%}): " +
             ", ".join(f"{k} {v}" for k, v in sorted(p["faults"].items()))),
            ("**lost**", f"**{r['lost']}**"), ("**duplicated**", f"**{r['duplicated']}**"),
            ("reports per patient", r["reports_per_patient"]),
            ("client retries (fhir.retries = 3)",
             f"{r['client_retries_logged']}, highest attempt {r['client_retry_max_attempt']}"),
            ("task retries (worker.max_retries = 5)",
             f"{r['task_retries_logged']}, highest {r['task_retry_max']}"),
            ("dead-letter queue", "; ".join(f"`{d['error'][:110]}` (retries {d['retries']})"
                                            for d in r["dead_letters"]) or "empty"),
            ("bearer token on every request", f"{p['requests_with_bearer']}/{p['requests']}"),
            ("run time", f"{r['seconds']} s"),
        ]))
    else:
        out.append(missing("FHIR faults", SUITE))
    pc = [load("post_commit_client"), load("post_commit_task")]
    out.append(
        "**Committed but answered 500**, deterministically "
        "(`test_committed_but_answered_500_does_not_duplicate`): the proxy forwards the "
        "report transaction, HAPI commits it, the client hears 500. The repeat is the "
        "client's own retry (`fhir.retries = 3`) or, with `retries = 0`, the task's next "
        "attempt. The report is a conditional create on its identifier (`ifNoneExist`) and "
        "the repeat finds it: " + ", ".join(
            f"{'client retry' if i == 0 else 'task retry'}: second attempt "
            f"`{x['second_attempt']}`, reports {x['reports']}, successful write AuditEvents "
            f"{x.get('write_audit_events', '?')}" for i, x in enumerate(pc) if x) + ".\n")
    out.append(
        "**Found and fixed:** the write AuditEvent that goes in the same transaction as the "
        "report was a plain POST, so the client's retry of a committed transaction recorded "
        "a second one (measured: 2 write events, 1 report). R4 AuditEvent has no identifier "
        "to make a conditional create on; the event is now `PUT AuditEvent/<id>` with a "
        "client-assigned id derived from the report identifier and the event's own time "
        "(`report.audit.attempt_event_id`): the verbatim retry finds it (HAPI writes not even "
        "a new version of identical content), while a later, real second write of the same "
        "report (deleted in between) is a new attempt with its own event. With `retries = 0` "
        "the task additionally records the 500 it saw as a failed write attempt (outcome 8): "
        "a different event, asserted as such. Tests: "
        "`tests/unit/test_audit_idempotent.py` (a fake server; fails before the fix), the HAPI "
        "check in `test_committed_but_answered_500_does_not_duplicate`.\n")
    out.append(
        "**Found and fixed:** HAPI's 404 text echoes the id (`HAPI-2001: Resource "
        "Patient/<id> is not known`) and went verbatim into the task's error log line and "
        "Celery's traceback line. `fhir/client.py` (with `fhir/urls.py`) now redacts every "
        "`Type/id` and every id or search value the request carried from server error texts "
        "(`tests/unit/test_redact_errors.py`). The dead-letter entry still names the patient "
        "in its `args` (it must, to be re-queued).\n")
    return "\n".join(out)


def section_broker() -> str:
    out = ["## 3. Broker restart (Redis and RabbitMQ)\n",
           f"Command: `{SUITE} tests/reliability/test_3_broker_restart.py`\n",
           "### Redis\n",
           "Redis holds the queue (db 0), results (db 1) and the dead-letter queue (db 2). It "
           "is restarted once a quarter of the messages have left the queue (judged from the "
           "queue), with the worker left running (it reconnects). Lost = no report and no "
           "dead letter after the bounded drain. The short form runs the graceful case; the "
           "full form adds SIGKILL with `appendfsync everysec` and with `always`. Every case "
           "asserts that the queue (ready + unacked) was non-empty when Redis went down, "
           "and SHUTDOWN and SIGKILL with `always` assert 0 lost and no dead letters; "
           "SIGKILL with `everysec` is measured only.\n"]
    rows = []
    for how in ("shutdown", "kill"):
        for fsync in ("everysec", "always"):
            r = load(f"broker_restart_{how}_{fsync}")
            if r:
                rows.append(f"| {'SHUTDOWN' if how == 'shutdown' else 'SIGKILL'} | "
                            f"`appendonly yes`, `appendfsync {fsync}` | {r['patients']} | "
                            f"{r.get('queued_or_unacked_at_restart', '?')} / "
                            f"{r['queued_or_unacked_after']} "
                            f"| {r['downtime_s']} s | **{r['lost']}** | **{r['duplicated']}** | "
                            f"{len(r['dead_letters'])} | {r['form']} |")
    if rows:
        out.append("| restart | persistence | patients | queued+unacked at restart / after | "
                   "down | lost | duplicated | dead letters | form |\n"
                   "|---|---|---|---|---|---|---|---|---|\n" + "\n".join(rows) + "\n")
    else:
        out.append(missing("broker restarts", SUITE))
    out.append(
        "**Settings that make it 0:** `appendonly yes` (deploy/redis/start), a graceful "
        "restart (`redis-cli shutdown` or SIGTERM: Redis fsyncs the AOF before exiting), "
        "`acks_late` + `reject_on_worker_lost` (a task is removed from Redis's unacked set "
        "only when it ends) and a visibility timeout longer than the hard time limit and the "
        "longest countdown. With `appendfsync everysec` a *crash* of Redis can lose the last "
        "second of writes (a task published or moved to unacked in that second); "
        "`appendfsync always` closes that window at the cost of an fsync per write.\n")
    out.append("### RabbitMQ\n")
    out.append(
        "A private RabbitMQ node (Debian's `rabbitmq-server` 3.10, the package "
        "`deploy/rabbitmq/start` installs, run from `/usr/lib/rabbitmq/bin` by "
        "`tests/reliability/stack.py::RabbitMQ`): node `clinragen-rel-5673@localhost`, AMQP on "
        "`127.0.0.1:5673`, distribution port 25673 on loopback, its own EPMD on "
        "`127.0.0.1:4373`, its own Erlang cookie (`HOME`), data and logs under "
        "`.run/reliability/rabbitmq`, no plugins; the shared node on 5672 is not touched. It "
        "is the broker only: results and the dead-letter queue stay on the suite's Redis, as "
        "a site with RabbitMQ runs it. The node is stopped once a quarter of the messages "
        "have left the queue, with the worker left running (it reconnects by itself), and "
        "started again after 2 s. The worker reaches HAPI through the suite's loopback proxy "
        "with every request delayed 0.4-0.6 s, so the run lasts long enough to be restarted "
        "mid-run (a CI run once drained all 20 messages between two `rabbitmqctl` polls). "
        "Short form: `rabbitmqctl stop`; full form: also SIGKILL "
        "of the Erlang VM (`beam.smp`), as a crash or an OOM kill would.\n")
    rows = []
    rabbit: dict[str, dict[str, Any]] = {}
    for how in ("stop", "kill"):
        r = load(f"broker_restart_rabbitmq_{how}")
        if r:
            rabbit[how] = r
            b, a = r["queue_before"], r["queue_after_restart"]
            rows.append(
                f"| {'`rabbitmqctl stop`' if how == 'stop' else 'SIGKILL beam.smp'} | "
                f"{r['patients']} | {b.get('ready')} + {b.get('unacked')} / "
                f"{a.get('ready')} + {a.get('unacked')} | {r['downtime_s']} s | "
                f"**{r['lost']}** | **{r['duplicated']}** | {r['reports_per_patient']} | "
                f"{len(r['dead_letters'])} | {r['form']} |")
    if rows:
        out.append("| restart | patients | queue ready + unacked, before / after restart | "
                   "down (stop + start) | lost | duplicated | reports per patient | "
                   "dead letters | form |\n|---|---|---|---|---|---|---|---|---|\n"
                   + "\n".join(rows) + "\n")
    else:
        out.append(missing("RabbitMQ restarts", SUITE + " -k rabbitmq"))
    out.append(
        "**Settings that make it 0 (RabbitMQ):** the `clinragen` queue **durable** (a "
        "classic queue; survives the restart) and messages **persistent** (`delivery_mode` 2, "
        "`task_default_delivery_mode = \"persistent\"`; written to the message store), both "
        "Celery's defaults and pinned in `worker/app.py`; **publisher confirms** "
        "(`broker_transport_options = {\"confirm_publish\": true}`, set by `worker/app.py` for "
        "every `amqp://` broker: `send_task` returns only once RabbitMQ has the message, so a "
        "message the broker had not taken over before it died is retried or an error at the "
        "sender, never a silent loss); **acks_late** + `reject_on_worker_lost` (the deliveries "
        "unacknowledged when the connection dropped, the tasks then running, go back to the "
        "queue: they run again and find their report, `exists`). "
        + _queue_kept(rabbit) + " Quorum queues (replicated, for a cluster) were not used or "
        "measured; on one node they add nothing over a durable classic queue with "
        "persistent messages and confirms.\n")
    return "\n".join(out)


def _queue_kept(results: dict[str, dict[str, Any]]) -> str:
    """What the queue counts before and after each RabbitMQ restart show, from the results."""
    if not results:
        return ""
    pairs = {how: (r["queue_before"].get("ready", 0) + r["queue_before"].get("unacked", 0),
                   r["queue_after_restart"].get("ready", 0)
                   + r["queue_after_restart"].get("unacked", 0)) for how, r in results.items()}
    shown = ", ".join(f"{how}: {b} before, {a} after" for how, (b, a) in pairs.items())
    if all(a >= b for b, a in pairs.values()):
        return (f"The queue held at least as many messages after the restart as before it "
                f"({shown}): nothing in the queue was lost, even by SIGKILL, because every "
                "message had been confirmed (so on disk) seconds before.")
    return (f"The queue held fewer messages after the restart than before it ({shown}): "
            "messages were lost from the queue.")


def section_hapi() -> str:
    r = load("hapi_restart")
    out = ["## 4. HAPI restart mid-run\n",
           f"Command: `{SUITE} tests/reliability/test_4_hapi_restart.py`\n",
           "`deploy/hapi/stop` (TERM, clean H2 close) and `deploy/hapi/start` while the worker "
           "is busy, with the default retry settings (`fhir.retries = 3`; "
           "`worker.retry_backoff_s = 5`, `retry_backoff_max_s = 300`, `max_retries = 5`: a "
           "task keeps trying for at least ~77 s with the 0.5x jitter floor, ~155 s nominal). "
           "An outage longer than that dead-letters the task (`clinragen-fhir dlq requeue "
           "--all` after the server is back).\n"]
    if not r:
        return "\n".join(out) + missing("HAPI restart", SUITE)
    out.append(stamp(r) + "\n")
    out.append(table([
        ("patients", r["patients"]),
        ("HAPI down", f"{r['downtime_s']} s (stop {r['stop_s']} s, start {r['start_s']} s)"),
        ("**lost**", f"**{r['lost']}**"), ("**duplicated**", f"**{r['duplicated']}**"),
        ("reports per patient", r["reports_per_patient"]),
        ("client retries / task retries", f"{r['client_retries_logged']} / "
                                          f"{r['task_retries_logged']} (highest task retry "
                                          f"{r['task_retry_max']} of 5)"),
        ("dead letters", len(r["dead_letters"])), ("run time", f"{r['seconds']} s"),
    ]))
    return "\n".join(out)


def section_bad_input() -> str:
    f, e = load("fuzz"), load("bad_input_explicit")
    out = ["## 5. Bad input\n",
           f"Command: `{SUITE} tests/reliability/test_5_bad_input.py` (no server needed)\n",
           "Hypothesis, with a fresh seed per run (printed as `fuzz seed N`, recorded below; "
           "`RELIABILITY_FUZZ_SEED=N` replays the run), generates Observations "
           "(plausible ones with known and unknown LOINC codes, units, NaN/Infinity/huge "
           "values, partial/garbage/future dates, components, reference ranges; and arbitrary "
           "JSON), DocumentReferences (binary and non-UTF-8 data, bad base64, unknown "
           "charsets, non-text types, URL-only), search answers served page by page (usable "
           "`next` links on the client's own base, HAPI's `_getpages` form and `_page` "
           "searches; hostile ones: another origin, a cycle back to the first page; "
           "arbitrary JSON links; non-Bundles) "
           "and webhook notifications (R4 resources, R4 backport `Parameters`, R5 "
           "`SubscriptionStatus`, arbitrary JSON). They go through the worker's own code: "
           "`encoding.labs.build_lab_frame`, `encoding.notes.extract_notes`, the rule "
           "predictor, `report.build.build_transaction`, the whole `pipeline.diagnose_patient` "
           "over a FHIR client whose transport serves the fuzzed answers, and the webhook ASGI "
           "app. Properties: nothing raises but a `FhirError`; every input is used or skipped "
           "with a non-empty reason; what would be POSTed is strict JSON; over usable links "
           "every page is read exactly once and every resource on them is counted in the read "
           "AuditEvent, a hostile link ends the task and another origin is never contacted; "
           "the receiver never answers 5xx, and an accepted notification queues exactly the "
           "tasks it says, its patient's among them, or says why none. A case that breaks a "
           "property is a crash: counted, kept with its input, and the test fails on that "
           "list.\n"]
    if f:
        out.append(stamp(f) + "\n")
        rows = [(k, v) for k, v in f["cases"].items()] + [
            ("**total cases**", f"**{f['total_cases']}**"),
            ("**crashes**", f"**{f['crashes']}**" + (
                f" ({f.get('crashes_by_property')}; failing cases in fuzz.json)"
                if f["crashes"] else "")),
            ("seed", f"`{f.get('replay', 'not recorded (derandomised run)')}`")]
        if f.get("paging"):
            rows.append(("search answers by paging", ", ".join(
                f"{k} {v}" for k, v in sorted(f["paging"].items()))))
        if f.get("notification_outcomes"):
            rows.append(("notification outcomes", ", ".join(
                f"{k} {v}" for k, v in sorted(f["notification_outcomes"].items()))))
        out.append(table(rows))
    else:
        out.append(missing("fuzzing", SUITE))
    if e:
        rows = [f"| {k.replace('_', ' ')} | {v['seconds']} s (< {v['bound_seconds']}) | "
                f"{v['peak_mib']} MiB (< {v['bound_mib']}) |" for k, v in e["cases"].items()]
        out.append("Explicit cases, each with asserted bounds (wall time; peak Python "
                   "allocation by `tracemalloc`, which also slows the code ~2x):\n\n"
                   "| case | time | peak memory |\n|---|---|---|\n" + "\n".join(rows) + "\n")
        out.append("Skip reasons recorded: " + "; ".join(
            f"`{k}`: {v}" for k, v in e["reasons"].items()) + "\n")
    out.append(
        "**Found and fixed by the fuzzing:** (a) the webhook answered 500 to authenticated "
        "Bundles whose `entry`, `parameter` or `notificationEvent` were not lists of objects "
        "(`patients_in` is now total); (b) a search page whose `entry`/`link` were not lists of "
        "objects crashed the task with `AttributeError`/`TypeError` (now a `FhirError` naming "
        "it); (c) readings beyond `MAX_READINGS` (20,000) were dropped without a `Skip` "
        "(each dropped Observation now has `older than the newest 20000 readings`). Regression "
        "tests: `tests/unit/test_malformed_input_fixes.py`.\n")
    return "\n".join(out)


def section_load() -> str:
    r = load("load")
    out = ["## 6. Load\n", "Command: `.venv/bin/python bench/load.py --patients N` "
           "(default 1,000; `make reliability-report LOAD_PATIENTS=N`)\n"]
    if not r:
        return "\n".join(out) + missing("load", ".venv/bin/python bench/load.py")
    command = r.get("command") or (
        f".venv/bin/python bench/load.py --patients {r['patients']} --population "
        f"{r['population']} --seed {r['seed']} --concurrency {r['worker_processes']} "
        f"--rounds {r.get('rounds', 1)}" + ("" if "settings" in r else " --suite-timeouts"))
    out.append(f"This run: `{command}`" + (
        f", then `{r['check_command']}` for lost / duplicated / dead letters"
        if r.get("check_command") else "") + "\n")
    out.append(f"(recorded {r['recorded_at']}; {r['machine']})\n")
    out.append(table([
        ("patients (clinosim US cohort)", f"{r['patients']} (population {r['population']}, "
                                          f"seed {r['seed']})"),
        ("resources loaded into HAPI", f"{r['resources_loaded']} in {r['load_seconds']} s "
         f"({r.get('load_resources_per_s', '?')}/s; Patient, Observation, DocumentReference "
         "by `clinragen_fhir.fhir.loader`, one patient compartment per transaction unit, "
         f"{r.get('load_references_removed', '?')} references to types not loaded removed, "
         f"**{r.get('load_error_count', '?')} load errors**)"),
        ("worker processes", r["worker_processes"]),
        ("rounds", f"{r.get('rounds', 1)} ({r.get('tasks', r['patients'])} tasks"
         + ("; a task whose report exists already, from an earlier round or an earlier run, "
            "does the same reads, encoding and prediction and skips the write: see outcomes)"
            if r.get("rounds", 1) > 1 else ")")),
        ("outcomes", f"{r['outcomes']} (`written`: a new report; `exists`: the report was "
                     "there already; `skipped`: no usable labs or notes; `FAILURE`: "
                     "dead-lettered)"),
        ("**lost / duplicated**", f"**{r.get('lost', '?')} / {r.get('duplicated', '?')}** "
                                  f"(reports per patient {r.get('reports_per_patient', '?')})"),
        ("dead letters", ("; ".join(f"{n} x `{e}`" for e, n in
                                    (r.get("dead_letters") or {}).items()) or "none")
         + (f" ({r['dead_lettered_with_report']} of them have their report: the transaction "
            "committed after the client had given up)" if r.get("dead_lettered_with_report")
            else "") + (f"; {r['check_note']}" if r.get("check_note") else "")),
        ("worker settings", ", ".join(f"`{k}={v}`" for k, v in r["settings"].items())
         if isinstance(r.get("settings"), dict) and r["settings"] else r.get(
             "settings", "the reliability suite's (soft/hard time limit 40/50 s, visibility "
             "timeout 60 s, FHIR timeout 10 s, retry backoff 1-8 s)")),
        ("wall time (all rounds)", f"{r['seconds']} s"),
        ("**throughput**", f"**{r['throughput_patients_per_min']} patients/min**"),
        ("**per patient, round 1 (task time) p50 / p95**",
         f"**{r.get('task_p50_s_round1', '?')} s / {r.get('task_p95_s_round1', '?')} s**"),
        ("per patient, all rounds p50 / p95", f"{r['task_p50_s']} s / "
                                              f"{r['task_p95_s']} s (mean "
                                              f"{r['task_mean_s']} s)"),
        ("**FHIR calls per patient**", f"**{r['fhir_calls_per_patient']}** "
                                       f"({r['fhir_calls']} in all)"),
        ("**worker RSS** (2 children, summed)", "first quarter "
                                                f"{r['rss_children_first_quarter_mib']}"
                                                " MiB, last quarter "
                                                f"{r['rss_children_last_quarter_mib']} MiB "
                                                f"(**{r['rss_growth_pct']:+}%**); main "
                                                f"{r['rss_main_mib_last']} MiB"),
    ]))
    by_round = r.get("rss_children_mib_by_round") or []
    if len(by_round) > 1:
        samples0 = r.get("rss_samples") or []
        at_start = (f", from {sum(samples0[0]['children_mib']):.0f} MiB for both at the first "
                    "sample"
                    if samples0 and samples0[0].get("children_mib") else "")
        out.append("Children's RSS at the end of each round (MiB; round 1 includes the "
                   f"one-off load of the knowledge graph and libraries{at_start}): "
                   + "; ".join(
                       f"round {i + 1}: {' + '.join(str(c) for c in rr)}"
                       for i, rr in enumerate(by_round)) + ". Growth per round after the "
                   "first: " + "; ".join(
                       " / ".join(f"{b - a:+.1f}" for a, b in zip(prev, cur, strict=False))
                       for prev, cur in itertools.pairwise(by_round)) +
                   " MiB per child. The first-vs-last-quarter figure above includes the "
                   "warm-up.\n")
    samples = r.get("rss_samples") or []
    if len(samples) >= 8:
        q = samples[len(samples) // 4]
        first, last = sum(q["children_mib"]), sum(samples[-1]["children_mib"])
        out.append(f"After the warm-up (the sample at {q['t_s']:.0f} s, a quarter into the "
                   f"run) the two children together went from {first:.0f} to {last:.0f} MiB "
                   f"by the end ({last - first:+.0f} MiB, {100 * (last - first) / first:+.1f}%"
                   f", over {samples[-1]['t_s'] - q['t_s']:.0f} s); the main process stayed "
                   f"at {r['rss_main_mib_last']} MiB.\n")
    if samples:
        out.append("RSS over time (children, MiB): " + ", ".join(
            f"{s['t_s']:.0f} s: {'+'.join(str(c) for c in s['children_mib'])}"
            for s in samples[:: max(1, len(samples) // 12)]) + "\n")
    return "\n".join(out)


def section_security() -> str:
    w, g = load("security_webhook"), load("log_grep")
    out = ["## 7. Security\n",
           f"Command: `{SUITE} tests/reliability/test_7_security.py "
           "tests/reliability/test_9_no_ids_in_logs.py` (the grep needs the whole suite's "
           "logs: run the suite, not that file alone)\n"]
    if w:
        out.append("Against a running receiver (`clinragen-fhir webhook`, uvicorn, on "
                   "loopback) " + stamp(w) + ":\n")
        out.append(table([(k.replace("_", " "), v) for k, v in w["answers"].items()] +
                         [("tasks queued after all of the above", w["queued_after_all"])]))
    else:
        out.append(missing("webhook security", SUITE))
    out.append("An authentic notification (HAPI-style `PUT /notify/Observation/<id>`) ends "
               "as a report written by a real worker "
               "(`test_authentic_notification_ends_as_a_report`).\n")
    if g:
        out.append(
            f"**Log grep** {stamp(g)}: {g['lines']} log lines from {g['files']} worker and "
            f"receiver processes searched for {g['patient_ids_searched']} patient ids and "
            f"{g['secrets_searched']} secrets (bearer token sent to HAPI on every request, "
            f"webhook secret, log-hash key): **{g['hits']} hits**. "
            f"The logs do name patients, by keyed hash: {g['patients_seen_as_keyed_hash']} of "
            f"the first {min(200, g['patient_ids_searched'])} ids (sorted) appear as "
            "`hash_id(id)`.\n")
    out.append(
        "**TLS and plain http:** the real CLI configured with `http://192.0.2.10/fhir` "
        "refuses before connecting (`test_plain_http_to_a_remote_host_is_refused_before_any_"
        "connection`); `allow_insecure_http = true` allows it; an https endpoint gets a "
        "verifying SSL context (`CERT_REQUIRED`, hostname check). Unit tests: "
        "`tests/unit/test_fhir_client.py::test_plain_http_to_remote_host_refused_unless_allowed`"
        ", `::test_tls_verification_is_on_by_default`, "
        "`tests/unit/test_auth.py::test_mutual_tls_and_verification_on_by_default`, "
        "`tests/unit/test_webhook.py` (header secret, HMAC, stale, forged, duplicates, "
        "sizes).\n")
    out.append(
        "**Dependency audit:** the runtime's dependencies are locked, pinned and hashed, in "
        "`requirements/runtime.lock` (`make lock`: pyproject's runtime dependencies without "
        "extras, plus `requirements/image.in`; no torch, onnxruntime CPU only; "
        "`tests/unit/test_runtime_lock.py`). The image installs from it alone (`pip install "
        "--require-hashes -r requirements/runtime.lock`, then the package with `--no-deps "
        "--no-build-isolation`), and `make install` holds the dev venv's runtime packages at "
        "its versions. `make audit-deps` runs `pip-audit --vulnerability-service pypi "
        "--strict --require-hashes -r requirements/runtime.lock`, so it audits exactly what "
        "ships, unchanged on any machine. `--strict` makes a package the service cannot "
        "answer for fail the "
        "step (without it pip-audit says \"No known vulnerabilities found\" and exits 0 when "
        "it could ask about nothing). It is **not** in `make test`, and on the machine these "
        "figures come from it **fails**, because no vulnerability source is reachable from "
        "here. What was tried (2026-11-26), each with `pycrypto==2.6.1`, a pin with known "
        "advisories, and with the real lock file:\n\n"
        "* `pip-audit -s pypi`: PyPI's per-version JSON "
        "(`https://pypi.org/pypi/<name>/<version>/json`, where the `vulnerabilities` key "
        "lives) answers **404** through this machine's PyPI access: \"Dependency not found "
        "on PyPI and could not be audited\" (`make audit-deps` on the lock, now "
        f"{locked_packages()} packages: on 2026-12-02 it exited 1 at the first, `amqp`).\n"
        "* `pip-audit -s osv`: `api.osv.dev` does not resolve. `pip-audit -s esms` (2.10's "
        "third service): `advisories.ecosyste.ms` does not resolve. `--osv-url` needs an "
        "OSV server, and there is no OSV database to serve.\n"
        "* PyPI's per-project JSON (`https://pypi.org/pypi/<name>/json`) **does** answer, "
        "with real advisories (`pycrypto`: PYSEC-2017-94, PYSEC-2018-97 and their GHSA "
        "aliases), but they are those of the project's **latest** release only, so it can "
        "audit a pin only when the pin is the latest version; pip-audit cannot be pointed at "
        "it, and a partial audit that passes silently for older pins would be worse than a "
        "failing step. Not built.\n"
        "* A vulnerability database shipped as a PyPI package: `safety` 3.x fetches its "
        "database from its vendor's service (an account); nothing on PyPI ships the OSV or "
        "PyPA advisory database for offline use that could be found in the package list "
        "here.\n\n"
        "So the step needs a CI runner that reaches pypi.org's JSON API or api.osv.dev; "
        "`make audit-deps` stays as it is and fails loudly until then.\n")
    return "\n".join(out)


def locked_packages(lock: Path | None = None) -> int:
    """How many packages requirements/runtime.lock pins."""
    lock = lock or ROOT / "requirements" / "runtime.lock"
    return sum(1 for line in lock.read_text().splitlines()
               if line[:1].isalnum() and "==" in line) if lock.is_file() else 0


HEADER = """# Reliability and security, measured

Faults, bad input, load and security checks against the real stack: HAPI FHIR, Redis, real
`clinragen-fhir worker` processes. Everything runs on loopback, and every loop is bounded in
count and time. This page is generated by `bench/reliability_report.py` from the results files
the suite (full form) and the load bench write (`.run/reliability/results/*.json`; a short-form
run writes to `results-short/` and never replaces them). Do not edit it by hand.
To regenerate every figure, run:

```bash
make reliability-report           # full suite + bench/load.py + this page
make reliability                  # full suite only (RELIABILITY_FULL=1)
.venv/bin/pytest -m reliability tests/reliability   # short form (also part of `make test`)
make audit-deps                   # pip-audit on the locked dependencies
```

The suite starts its **own** services so it can kill and restart them while other jobs use
the shared ones: HAPI on `127.0.0.1:8091` (`HAPI_DATA_DIR`/`HAPI_RUN_DIR` =
`.run/hapi-reliability`), Redis on `127.0.0.1:6391` (`appendonly yes`, `appendfsync
everysec`, `.run/reliability/redis`) and a RabbitMQ node on `127.0.0.1:5673` (own node name,
EPMD, cookie and data under `.run/reliability/rabbitmq`; section 3). It stops them at the end
unless `RELIABILITY_KEEP=1`. One run
at a time per machine: the session takes an exclusive `flock` on
`/tmp/clinragen-reliability-8091-6391.lock` and waits for it for up to 30 min
(`RELIABILITY_LOCK_WAIT_S`). This was learned the hard way: a CI checkout's `make test` ran
the short form during a full run here, and its broker-restart scenario shut down the Redis the
full run was using. The HAPI-restart scenario also asserts that HAPI really went down:
`deploy/hapi/stop` only stops a server started from the same `HAPI_RUN_DIR`.
Worker settings in the scenarios: soft/hard time limit 40/50 s, visibility timeout 60 s, retry
backoff 1-8 s, FHIR timeout 10 s, `auth = bearer` (HAPI ignores the token; the log grep
looks for it). Scenario 1 uses 15/20/25 s and scenario 4 the default backoff. Logs of every
process: `.run/reliability/logs/`.

Short form (in `make test`, `.venv/bin/pytest -q -m reliability tests/reliability`): 20
patients per fault scenario, 5 kills, 12 patients for the HAPI restart, a graceful RabbitMQ
stop, ~1,050 fuzz cases, a 25,000-point series; it aims at ~3 min, its measured time is below.
Full form: 200 patients per scenario, 24 kills, SIGKILL restarts of Redis and of RabbitMQ as
well, ~10,500 fuzz cases, a 50,000-point series.

"""

def section_short_form(results: Path | None = None) -> str:
    """The short form's time, from the last short run's results files (results-short/): the
    scenarios' own seconds, and the HAPI restart's, of which HAPI's start-up."""
    results = results or RESULTS.with_name("results-short")
    runs = {}
    for path in sorted(results.glob("*.json")) if results.is_dir() else []:
        try:
            runs[path.stem] = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
    timed = {k: float(v["seconds"]) for k, v in runs.items()
             if isinstance(v.get("seconds"), int | float)}
    if not timed:
        return missing("the short form", ".venv/bin/pytest -q -m reliability tests/reliability")
    days = sorted({str(v.get("recorded_at", ""))[:10] for v in runs.values()} - {""})
    line = (f"Short form, measured ({', '.join(days) or 'date not recorded'}): the timed "
            f"scenarios took {sum(timed.values()):.0f} s of their own ("
            + ", ".join(f"{k} {s:.0f} s" for k, s in sorted(timed.items(), key=lambda x: -x[1]))
            + ")")
    hapi = runs.get("hapi_restart", {})
    if isinstance(hapi.get("start_s"), int | float):
        line += f"; HAPI's own start-up in the restart scenario {hapi['start_s']:.0f} s"
    return line + ". Starting HAPI and the RabbitMQ node for the suite, when they are not up, "\
        "comes on top.\n"


def render() -> str:
    """The page, from the last run's results; Refused unless they are one passing run's."""
    global STARTED
    started = run_started()
    stale = check_fresh(started)
    if stale:
        raise Refused(f"{len(stale)} results files are not from the run in {JUNIT.name}: "
                      + "; ".join(stale) + ". Rerun the scenarios they come from (the whole "
                      "suite: `make reliability-report`), or delete a file no scenario writes "
                      "any more")
    STARTED = started
    try:
        parts = [HEADER, section_short_form(), "## Test results\n", junit_summary(),
                 section_kill(),
                 section_faults(), section_broker(), section_hapi(), section_bad_input(),
                 section_load(), section_security(), FOOTER, SECURITY_REVIEW]
    finally:
        STARTED = None
    return "\n".join(parts)


def main() -> None:
    """Write docs/reliability.md, or exit 1 naming why the results cannot be rendered."""
    try:
        page = render()
    except Refused as exc:
        print(f"bench/reliability_report.py: {OUT.relative_to(ROOT)} not written: {exc}",
              file=sys.stderr)
        raise SystemExit(1) from None
    OUT.write_text(page)
    print(f"wrote {OUT.relative_to(ROOT)}")


FOOTER = """## Not covered, and why

* **HAPI killed hard** (SIGKILL, not TERM). H2 recovery after a crash is HAPI's and H2's
  business. The worker side is the same as in scenario 4.
* **RabbitMQ quorum queues and clusters.** One node, a durable classic queue. The effect of
  publisher confirms alone was not isolated: every message had been published seconds before
  the restart, so the run without confirms would very likely also show 0; confirms matter
  for a message published in the last moments before a crash.
* **A publish while the broker is down** (the webhook receiving a notification during a
  RabbitMQ or Redis outage) is not measured: with confirms the sender retries (Celery's
  publish retry policy) or fails, and the receiver answers 5xx so the FHIR server retries.
* **The 1,000-patient load with the production time limits.** The run above used the fault
  suite's short limits (soft 40 s, FHIR timeout 10 s, as bench/load.py then always did): the 5
  largest patients (1,247-2,751 Observations each; the median is 72) had report transactions
  that HAPI took longer than 10 s to answer on the loaded machine, so the client timed out, its
  3 retries found the same, and the soft limit dead-lettered the task, while HAPI did commit
  the first transaction (each has exactly one report: 0 lost, 0 duplicated). bench/load.py
  now uses the config defaults (300 s, 30 s; `--suite-timeouts` for the old ones); a rerun
  (~30 min: 12 min to load, 17 to diagnose) did not fit in the session that made the change.
* **Loading a whole clinosim cohort (all resource types).** The loader now loads
  clinosim's cross-type reference cycles (tests/integration/test_load_ndjson.py on HAPI), but
  clinosim itself writes some invalid references: `DiagnosticReport.media.link` ->
  `ImagingStudy` (HAPI: `HAPI-0931 ... Resource type 'ImagingStudy' is not valid for this
  path`, HTTP 422; 155 of 1,291 DiagnosticReports in a 600-population cohort). The loader
  refuses to rewrite data it does not strip for a reason; such a patient's compartment is
  reported as an error and the other patients of its transaction are loaded (it retries unit
  by unit). The load bench reads only Patient, Observation and DocumentReference, which is
  all the worker reads.
"""


# not figures of a run: what issue 13 found, the fix and its unit test
SECURITY_REVIEW = r"""## Security review fixes (issue 13)

What the review found, the fix, and the unit test that fails before the fix and passes after
(fake transports, no servers), per item.
* **1. A notification lost when the broker is down.** Found: The receiver set the event and
  patient de-duplication keys before queueing; with the broker down it answered 500, the FHIR
  server's retry got 200 "duplicate" and the notification was gone (a real Redis broker stopped
  mid-run: 5 of 10 patients never queued). A publish to a stopped Redis also waited ~19 s (the
  result backend's subscribe retries). Fix: Claim, queue, then keep (`webhook.py::make_app`,
  `RedisSeen`): keys are claimed with a short-lived "pending" value (120 s), kept for 24 h only
  once the task is on the queue, and released when the store or the publish fails; the answer is
  then 503 with `Retry-After` (a `transient` OperationOutcome on HAPI's `PUT` route), and a
  retry meeting a claim that could not be released also gets 503, never "duplicate"; patients
  already queued by a partly failed notification stay marked, so the retry queues only the rest.
  The publish passes `ignore_result` (nobody reads a webhook task's result), so it fails in
  about a second. Test:
  `tests/integration/test_webhook_broker_down.py::test_broker_stopped_mid_run_loses_no_notification`
  (real Redis broker stopped after 5 notifications: 5 answered 503, all 10 retried, each patient
  exactly one task on the queue),
  `::test_one_redis_for_broker_and_state_stopped_mid_run_loses_no_notification`,
  `tests/unit/test_webhook_hardening.py::test_broker_down_answers_503_and_the_retry_is_queued`,
  `::test_store_down_answers_503_not_500`,
  `::test_partial_queue_failure_queues_each_patient_exactly_once`,
  `::test_claims_left_by_a_failed_release_answer_503_until_they_expire`,
  `::test_hapi_put_delivery_gets_a_transient_503_outcome`
* **2. One bad record (reads).** Found: Responses were read whole and httpx inflated gzip without
  a cap (a 0.29 MiB gzip body became 300 MiB, 900 MiB peak); a `next` link cycle gave 10,000
  requests for the same page (the page limit was a fixed 10,000); every search was held whole
  before the reading cap applied; DocumentReferences were bounded neither in total nor by date.
  Fix: Every answer is streamed (`fhir/bodies.py::read_capped`): bytes on the wire are counted
  (and a declared Content-Length checked) against `max_wire_bytes`, gzip/deflate are inflated by
  our own zlib inflater 64 KiB at a time against `max_response_bytes` (both 64 MiB; only
  `gzip, deflate` are offered), and passing either is a final `FhirTooLarge`. A search is a
  generator read page by page: a `next` link to a page already read (URLs normalised: host
  case, query order) is a final error, and `max_pages` (default 1,000) and `max_search_bytes`
  (256 MiB decoded over all pages) are settings, each a final `FhirTooLarge`. Notes are kept
  newest first up to 1,000,000 characters in all (`MAX_NOTES_TOTAL_CHARS`), each older one a
  recorded skip, pruned as they stream; `extract_notes(since=...)` skips notes before the
  lookback window; the lab frame prunes to the newest readings as observations stream.
  `pipeline.gather_inputs` still lists each search before encoding it (not changed here), so
  `max_search_bytes` is what bounds its memory per search today. Test:
  `tests/unit/test_bounded_reads.py::test_gzip_bomb_is_a_final_error_without_inflating_it`
  (300 MiB bomb; tracemalloc peak under cap + 8 MiB, one request),
  `::test_wire_cap_counts_compressed_bytes`, `::test_next_link_cycle_stops_at_the_repeat`
  (2 requests), `::test_10000_page_search_stops_at_the_page_limit` (25 requests; 1,000 by
  default), `::test_search_byte_budget_and_page_by_page_streaming`,
  `::test_huge_notes_set_is_bounded_newest_first` (3,000 notes, 120 M characters),
  `::test_worker_path_bounds_notes`
* **2. One bad record (worker lost).** Found: `task_reject_on_worker_lost` hands the task of a
  worker that died back to the queue with no limit and no count, so one record that runs a
  worker out of memory was redelivered forever, killing a worker on every delivery. Fix:
  `worker/tasks.py::DeadLetteringTask.before_start` counts each start of a message in Redis
  (`clinragen:deliveries:<task id>:<retry number>`: a retry is a new message, so only
  redeliveries add up; TTL max(1 day, 2 x visibility timeout), dropped when the run ends in any
  way but a dead worker); past `worker.max_deliveries` (default 5) the task fails before it runs
  and is dead-lettered with the reason `DeliveryLimitExceeded: delivered N times without
  finishing (max_deliveries = M): its worker died on every run (out of memory, or killed);
  dead-lettered, not run again`, and its message is acknowledged. With the state store down the
  task runs uncounted (as before) rather than not at all. (Celery 5.7's
  `task_retry_on_worker_lost` was not used: it bounds pool-child losses only, and the pin allows
  5.4.) Test:
  `tests/integration/test_poison_task.py::test_a_task_that_kills_its_worker_every_time_is_dead_lettered`
  (a real prefork worker on a private redis-server; the task SIGKILLs its own pool child: it
  runs exactly 3 times with `max_deliveries = 3`, then one dead letter with that reason, the
  queue drains, and a normal task beside it succeeds; ~30 s),
  `tests/unit/test_delivery_limit.py::test_a_task_that_dies_on_every_delivery_is_dead_lettered_with_the_reason`,
  `::test_a_normal_task_is_unaffected_and_leaves_no_count`,
  `::test_retries_are_new_messages_not_redeliveries`, `::test_a_task_that_died_once_runs_again`,
  `::test_the_state_store_down_runs_the_task_uncounted`
* **3. Tokens in logs.** Found: A bearer token read from an env var or file with a trailing
  newline was echoed in httpx's "Illegal header value" error; that error is retryable, so the
  retry line, the task log and the dead letter held the token. Transport errors' texts went into
  `FhirUnavailable`. A relative `next` link was logged raw (patient id and page token in its
  query), and page-2 error texts echoing them were not redacted. Fix: Tokens (and secrets) from
  env or file are stripped; a token that cannot be a header value is refused when read, without
  quoting it (also the token endpoint's `access_token`). A transport exception is named by its
  type only (plus OpenSSL's reason code, e.g. `CERTIFICATE_VERIFY_FAILED`); log lines and dead
  letters carry our own errors' redacted text, any other exception by type. Request URLs are
  logged with the path redacted and every query value hashed; the values of a `next` link's
  query are redacted in server texts. Test: `tests/unit/test_log_grep.py` (the `diagnose` task
  run eagerly: logs, Celery retry reasons, dead letters and the traceback grepped for the token,
  the patient id and the page token):
  `::test_page_two_errors_are_redacted_and_a_trailing_newline_is_stripped[*]`,
  `::test_a_failing_transport_is_named_by_type_only`,
  `::test_a_token_that_cannot_be_a_header_is_refused_without_quoting_it`
* **4. Plain http.** Found: Refused only for `base_url`. Fix: The same rule (plain http only to
  loopback unless `allow_insecure_http`) for `token_url` (the endpoint's `allow_insecure_http`),
  the teacher's `base_url` (`LLMConfig.allow_insecure_http`) and `subscribe --endpoint`
  (`--allow-insecure-http`). Test:
  `tests/unit/test_insecure_http.py::test_plain_http_token_url_is_refused_unless_allowed`,
  `::test_plain_http_teacher_base_url_is_refused_unless_allowed`,
  `::test_plain_http_subscribe_endpoint_is_refused_unless_allowed`
* **5. Webhook hardening.** Found: Any string after `Patient/` was queued as a patient id (`..`,
  `p1?_format=xml`, 65+ characters), becoming a path on the FHIR server; a notification could
  name any number of patients; a signed timestamp `nan` passed the window check (every
  comparison with NaN is false), and a replay re-spaced or with one byte appended (header
  secret) had a new body digest and was accepted again once the patient debounce ended; the
  Backport `notification-event` parts and id-only `fullUrl` entries were ignored, so id-only and
  `focus` payloads named no patient; a status without a subscription or event number had the key
  `#`, so every such notification after the first was a "duplicate". Fix: Patient ids must be
  FHIR ids (`[A-Za-z0-9\-.]{1,64}`, no `..`, no query or fragment) in a plain relative or
  absolute reference, the rest refused and counted (`"reason": "invalid patient id"`); at most
  `webhook.max_patients` (100) patients per notification, else 413; the HMAC timestamp
  must be whole seconds, the signature covers timestamp and every body byte, `dedupe_ttl_s` must
  cover twice the 300 s window, and `webhook.require_hmac = true` refuses the header secret
  (HMAC documented as preferred, the header mode kept for HAPI); the body-digest key is over
  canonical JSON; `focus`, `additional-context`/`additionalContext` and id-only `fullUrl`s name
  the patient (a non-Patient focus through its resource in the Bundle); a status lacking a
  subscription or event number falls back to the body digest. TLS/mTLS and the secret's
  visibility in `Subscription.channel.header` are documented. Test:
  `tests/unit/test_webhook_hardening.py::test_invalid_patient_ids_are_refused[*]`,
  `::test_invalid_patient_resource_id_is_refused`,
  `::test_valid_ids_in_relative_absolute_and_versioned_references`,
  `::test_patients_per_notification_are_capped`,
  `::test_one_byte_appended_to_a_signed_body_is_refused`,
  `::test_replay_with_a_byte_more_is_still_a_duplicate_after_the_debounce`,
  `::test_a_timestamp_that_is_not_whole_seconds_is_refused`,
  `::test_require_hmac_refuses_the_header_secret`,
  `::test_replay_window_must_fit_in_the_dedupe_ttl`,
  `::test_backport_id_only_patient_focus_names_the_patient`,
  `::test_backport_id_only_observation_focus_with_patient_context`,
  `::test_backport_full_resource_focus_is_followed_to_its_subject`,
  `::test_id_only_entries_name_patients_by_full_url`,
  `::test_r5_additional_context_names_the_patient`,
  `::test_status_without_subscription_or_event_number_falls_back_to_the_body[*]`
* **6. Concurrent writers.** Found: One report per input rested on the server making the
  conditional create (`ifNoneExist`) atomic; HAPI 6.6+ does, some servers do not
  (microsoft/fhir-server#1382), and backfill, webhook and CLI runs for one patient can overlap:
  both find no report, both create. Fix: `pipeline.diagnose_patient(lock=...)` holds a lock of
  the report key from the look-up of an existing report to the transaction; the worker's lock
  (`worker/tasks.py::report_lock`, `worker/state.py::WorkerState.acquire_report`) is a Redis
  key set only if absent (or already this task's: the same task redelivered after its worker
  died takes its own stale lock back) with a TTL of the hard time limit + 60 s, released by a
  compare-and-delete Lua script only while still owned. A run that finds the lock held waits up
  to 10 s (a tenth of the soft limit at most), then raises `ReportLocked` and retries later
  with the usual backoff: no failure, no second report. With the state store down the report is
  written unlocked (the server's conditional create still guards) rather than lost. `diagnose
  --local` (CLI, in process) passes no lock yet. Test:
  `tests/unit/test_report_lock.py::test_two_concurrent_tasks_for_one_patient_write_one_report`
  (two `diagnose` tasks in threads against a fake server whose conditional create checks,
  sleeps 0.3 s, then creates; a private redis-server), and its control
  `::test_without_the_lock_the_fake_server_duplicates` (the same run with the lock removed
  writes two), `::test_a_lock_held_elsewhere_makes_the_task_retry_not_fail`,
  `::test_the_state_store_down_still_writes_the_report`,
  `::test_the_lock_is_owned_expires_and_is_taken_back_by_its_owner`
* **7. Token endpoint blips.** Found: Every `TokenError` was final: a token endpoint restart
  dead-lettered every task meanwhile. Fix: The retry decision is on the error
  (`fhir/errors.py::TokenError`): no answer, timeouts, 408, 429 (with Retry-After) and 5xx are
  retryable, other refusals and malformed answers final; the FHIR client retries a retryable
  token error like its own blips, then the task's retry takes over. Test:
  `tests/unit/test_token_retry.py::test_blips_are_retryable[*]`,
  `::test_refusals_and_bad_answers_are_final[*]`,
  `::test_the_fhir_client_retries_a_token_blip_then_succeeds`,
  `::test_a_token_outage_longer_than_the_client_retries_is_left_to_the_task`
* **8. Regex cost.** Found: `_NUMBER` backtracked into digit runs (quadratic: 100k digits before
  `_` did not finish); every number also searched the whole text before it; 20,000 distinct
  displays became 20,000 lexicon names. Fix: `_NUMBER`'s number is an atomic group (same
  matches, checked against the old pattern on 200,000 random strings); the criterion check looks
  back 64 characters past blanks; names longer than 120 characters and more than 8 displays per
  LOINC code are not lexicon names; at most 20,000 characters (cut at a blank) and 200 claims
  are checked per rationale or line. Test:
  `tests/unit/test_faithfulness_cost.py::test_number_pattern_is_linear_on_a_100k_digit_run[*]`,
  `::test_a_100k_digit_display_is_checked_quickly`,
  `::test_a_100k_char_rationale_is_bounded[*]`,
  `::test_twenty_thousand_distinct_displays_are_bounded` (each under 2 s, with a deadline;
  `tests/unit/test_faithfulness.py` unchanged and passing)
* **9. Broker TLS.** Found: With `rediss://` kombu connected with `CERT_NONE` (and Celery
  refused a `rediss://` result backend for want of `ssl_cert_reqs`); with `amqps://` the
  certificate was verified but not the host name; anyone on the path could pose as the broker,
  read every task (patient ids) and queue their own. The shipped compose and k8s configs ran
  Redis with no password. Fix: `worker.app.broker_tls` sets `broker_use_ssl` (and
  `redis_backend_use_ssl` for a `rediss://` backend) to `CERT_REQUIRED` with the host name
  checked (`ssl_check_hostname` for redis-py, `server_hostname` from the URL for py-amqp), CA
  from `broker_ca_file` or the system; `check-config` connects with the same options. Compose's
  Redis has `--requirepass` from `deploy/compose/.env`, which every Redis URL carries
  (`${...:?}`: no start without it); k8s takes the Redis URLs and KEDA's password (a
  `TriggerAuthentication`) from the Secret; a placeholder password in a broker, backend or state
  URL is refused at start. Test:
  `tests/unit/test_broker_tls.py::test_rediss_broker_and_backend_require_a_verified_certificate_and_host_name`,
  `::test_amqps_broker_checks_the_host_name` (both down to the `SSLConnection` and `SSLSocket`
  the installed redis-py and py-amqp build),
  `::test_kombu_alone_does_not_check_what_it_connects_to`,
  `::test_compose_redis_requires_the_password_every_url_carries`,
  `::test_k8s_redis_urls_and_keda_come_with_the_password_from_the_secret`,
  `::test_the_shipped_redis_password_placeholders_are_refused`
* **10. Scopes.** Found: The default SMART scope (`system/*.rs system/DiagnosticReport.c
  system/Provenance.cu`) lacked the writes every task makes, the application Device (a
  conditional create) and the AuditEvents (POST and PUT by id), and granted reads of every type;
  on a scope-enforcing server every task was refused and dead-lettered. Fix: The default is made
  from one table, `fhir.auth.WORKER_ACCESS`: `system/Patient.r system/Observation.s
  system/DocumentReference.s system/DiagnosticReport.cs system/Device.cs system/Provenance.cu
  system/AuditEvent.cu` (a conditional create also needs `s`: the server searches for the
  condition in the client's name; a PUT by client id needs `c` and `u`). `check-config` fetches a
  token, reads its `scope` (the requested one when the answer leaves it out, RFC 6749 5.1; SMART
  v1 `.read`/`.write` understood) and names each missing scope; also any the configured `scope`
  lacks. Test: `tests/unit/test_scopes.py::test_the_default_scope_is_exactly_what_the_worker_does`
  (a real `diagnose_patient` run and the poll task's searches recorded on a fake server, mapped to
  SMART letters: exactly the table), `::test_the_old_default_missed_the_device_and_audit_writes`,
  `::test_check_config_names_the_scopes_a_token_lacks` (an `httpx.MockTransport` token endpoint
  granting the old default), `::test_check_config_is_quiet_about_a_full_grant_and_a_short_request`
* **11. Secrets that fail open.** Found: The log-id hash key defaulted to a public constant; the
  example configs' placeholder secrets were accepted; unknown config keys were ignored (`auht =
  "smart-backend"` left auth off). Fix: `Settings.check_site_secrets()` (worker, CLI, webhook
  receiver at start): with any service off loopback `CLINRAGEN_LOG_ID_KEY` must be set (>= 16
  characters); a placeholder (`change-me-...`, `replace-with-...`, a PEM whose body is
  `REPLACE`) is refused as log key, webhook secret, token, client secret or private key. Unknown
  keys, in the TOML or as `CLINRAGEN_<SECTION>__<KEY>`, are a `FhirConfigError` naming them
  (never their values). Test:
  `tests/unit/test_config_secrets.py::test_off_loopback_the_log_id_key_is_required`,
  `::test_the_cli_and_the_worker_refuse_to_start_without_a_site_key`,
  `::test_every_placeholder_in_the_example_configs_is_refused` (read from
  deploy/compose/site.env, and a PEM whose body is `REPLACE`),
  `::test_unknown_config_keys_are_named`, `::test_the_shipped_configs_have_only_known_keys`
* **12. Servers without versionId.** Found: The report key used `versionId`, or "" when missing,
  so a changed input kept its key and never got a new report. Fix: An input's version in the key
  is `versionId`, else `meta.lastUpdated`, else a sha256 of its content
  (`report.build.input_stamp`); keys where servers send `versionId` are unchanged, and
  `_history` references still use `versionId` only. Test:
  `tests/unit/test_report_key_versions.py::test_an_edited_input_without_version_id_gives_a_new_report_key`,
  `::test_version_id_keeps_the_key_it_always_had`,
  `::test_input_stamp_prefers_version_id_then_last_updated_then_content`
* **13. Loader and `--types`.** Found: `load --types Patient,Observation,DocumentReference` left
  out a Synthea transaction Bundle's Encounters but kept the `urn:uuid:` references to them (and
  the conditional references to the support bundles' Practitioners and Organizations, also left
  out); HAPI refused every bundle with HAPI-0541 (reproduced on a fresh Synthea 3.3.0 patient:
  the whole bundle refused). Fix: As on the NDJSON path, an entry left out takes every reference
  to it along (`fhir.loader.prepare_bundle`): by fullUrl or `Type/id` in its own bundle, and,
  for support bundle entries, by their conditional reference (`url?ifNoneExist`); emptied
  elements go too, and the count is in `LoadReport.stripped`. On HAPI the same patient then
  loaded (52 Observations, 17 notes, 103 references removed). Test:
  `tests/unit/test_loader_bundle_refs.py::test_types_left_out_take_their_references_with_them`
  (a trimmed real Synthea 3.3.0 bundle, `tests/fixtures/synthea-bundle/`, on a fake server that
  resolves references as HAPI does),
  `::test_without_types_or_with_everything_kept_nothing_is_removed`,
  `::test_a_support_type_that_is_loaded_keeps_its_references`; on HAPI:
  `tests/integration/test_load_bundle_types.py::test_synthea_bundle_loads_into_hapi_with_types`
* **14. Honest fuzzing.** Found: The fuzzing ran derandomised (the same cases every run, and no
  seed to report), and the results file wrote `"crashes": 0` as a literal whatever happened.
  Search Bundles got `link` as arbitrary JSON, so a `next` link the client would follow
  (absolute, on its own base, a page it can ask for) never came up, and page 2 onwards was never
  read. The notification property checked only the status code: a receiver that answered 202 and
  queued nothing (or queued the wrong patient) passed. Fix: Each run draws a fresh seed, prints
  it (`fuzz seed N (replay: RELIABILITY_FUZZ_SEED=N)`) and records it in `fuzz.json`;
  `RELIABILITY_FUZZ_SEED=N` replays the run. A case that breaks a property (an exception other
  than `FhirError`, or a failed assertion) is a crash: it is counted, kept with its input (the
  first 20 go in `fuzz.json`), and each property test fails on its own computed list, with the
  seed in the message. Search answers are served page by page: the `next` links are HAPI's
  `?_getpages=` form or `_page=` searches on the client's base. Over usable links every page
  must be read exactly once, and every resource on them must be counted in the read AuditEvent.
  Hostile chains (a `next` to another origin, a cycle back to page 1) must end the task with a
  `FhirError`, and another origin is never contacted. Some chains still get arbitrary JSON
  links. For an accepted notification, `accepted` must equal the tasks actually queued, only
  patients the notification names may be queued, the strategy's Observation (subject
  `Patient/p1`) must queue `p1`, and an answer that queued nothing must give a reason
  (`duplicate`, `names no patient`, ...) or `patients: 0`. A refusal must carry an `error` and
  queue nothing. The renderer shows the seed, the paging mix and the notification outcomes.
  Test:
  `tests/reliability/test_5_bad_input.py::test_fuzzed_search_bundles_through_diagnose_patient`,
  `::test_fuzzed_notifications`, `::test_fuzzed_observations`, `::test_fuzzed_documents`,
  `::test_zz_fuzz_case_counts`
* **15. Honest broker and report figures.** Found: The Redis restart scenario never checked that
  Redis held any task when it went down, so a restart after the queue drained passed as "0
  lost". `make reliability-report` ran the suite with a `-` prefix: a failing or erroring suite
  still went on to render `docs/reliability.md`. The renderer read whatever lay in
  `.run/reliability/results/`, so a scenario that failed or did not run showed the previous
  run's figures as this run's. Fix: The Redis case measures the queue (ready + unacked) at the
  moment of the SHUTDOWN or SIGKILL, records it (`queued_or_unacked_at_restart`, rendered in the
  table), and asserts it is above 0 in every case. SHUTDOWN and SIGKILL with `appendfsync
  always` (full form) assert 0 lost and no dead letters, naming the lost patients; SIGKILL with
  `everysec` is measured. The Makefile keeps the suite's exit status: on failure the services
  are still stopped, the target fails with `reliability-report: FAILED (exit N)`, and the
  renderer is not run. The renderer (`bench/reliability_report.py`) refuses, with exit 1 and
  nothing written, when `junit.xml` is missing, has failures or errors, or ran no test, and when
  any results file has no `recorded_at` or was recorded before the junit run started. The
  refusal lists the stale files. Test:
  `tests/unit/test_reliability_report.py::test_results_older_than_the_run_are_refused`,
  `::test_a_failed_run_is_not_rendered`, `::test_no_junit_results_is_refused`,
  `::test_a_results_file_without_a_time_is_refused`,
  `::test_one_passing_runs_fresh_results_are_rendered`,
  `::test_make_reliability_report_fails_with_the_suite`;
  `tests/reliability/test_3_broker_restart.py::test_redis_restart_mid_run_loses_no_task` (the
  SIGKILL cases run in the full form only)
* **16. Locked dependencies.** Found: Nothing was locked. The image ran `pip install . flower`,
  resolving whatever was newest at build time with no hash checked, and `pip` fetched the build
  backend unpinned. `make audit-deps` audited a `pip freeze` of the dev venv (torch, CUDA,
  training and dev tools) rather than what ships. Fix: `requirements/runtime.lock` holds the
  runtime's dependencies, pinned with sha256 hashes for every file of each pin. That is
  pyproject's `[project.dependencies]` without extras, plus `requirements/image.in`: flower, and
  setuptools and wheel for the build. It has 64 packages; no torch, no CUDA, onnxruntime CPU
  only. It is compiled by `make lock` (uv from a throwaway venv, for Python 3.11 on Linux, at
  the dev venv's versions so that the tested venv and the image agree). The image runs `pip
  install --require-hashes -r requirements/runtime.lock`, then the package with `--no-deps
  --no-build-isolation`, then `pip check`. `make install` (and so CI) holds the runtime's
  packages at the lock's versions through a `name==version` constraints file made from it,
  because pip refuses hashes in constraints; the train and dev extras resolve around them. `make
  audit-deps` runs `pip-audit --vulnerability-service pypi --strict --require-hashes
  --disable-pip -r requirements/runtime.lock`, so it audits exactly the lock, unchanged wherever
  PyPI's vulnerability data is reachable. Here it fails with exit 1 (`amqp: Dependency not found
  on PyPI and could not be audited`). Test:
  `tests/unit/test_runtime_lock.py::test_every_runtime_dependency_is_pinned_within_pyprojects_range`,
  `::test_every_line_is_pinned_with_a_hash`, `::test_no_torch_and_no_gpu_onnxruntime`,
  `::test_the_lock_is_closed_over_the_installed_runtime`,
  `::test_the_tested_venv_runs_the_locked_versions`
"""


if __name__ == "__main__":
    main()
