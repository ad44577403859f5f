"""Render docs/reliability.md from the suite's results (.run/reliability/results/*.json).

    make reliability-report          # full suite + load bench + this renderer
    .venv/bin/python bench/reliability_report.py   # re-render from the last run's results

Every number in the document comes from a results file written by tests/reliability or
bench/load.py; a scenario without results says so instead of showing a stale figure. The
renderer refuses (exit 1, writing nothing) when the last run's junit.xml is missing or has
failures or errors, or when a results file was recorded before that run started: a figure
from an earlier run must never be shown as this run's.
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
        "(measured: 101 s drain with a 25 s timeout). `worker/app.py` now sets "
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
        "Celery's traceback line. `fhir/client.py` now redacts every `Type/id` and every "
        "id or search value the request carried from server error texts "
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
        "started again after 2 s. Short form: `rabbitmqctl stop`; full form: also SIGKILL "
        "of the Erlang VM (`beam.smp`), as a crash or an OOM kill would.\n")
    rows = []
    for how in ("stop", "kill"):
        r = load(f"broker_restart_rabbitmq_{how}")
        if r:
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
        "queue: they run again and find their report, `exists`). The queue's message "
        "counts before and after the restart are equal in both cases: nothing in the queue "
        "was lost, even by SIGKILL, because every message had been confirmed (so on disk) "
        "seconds before. Quorum queues (replicated, for a cluster) were not used or "
        "measured; on one node they add nothing over a durable classic queue with "
        "persistent messages and confirms.\n")
    return "\n".join(out)


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
           "`encoding.labs.build_lab_frame`, `encoding.notes.decode_notes`, the rule "
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
        out.append("Children's RSS at the end of each round (MiB; round 1 includes the "
                   "one-off load of the knowledge graph and libraries, from ~108 MiB at "
                   "start): " + "; ".join(
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
        "on PyPI and could not be audited\" (`make audit-deps` on the lock's 64 packages, "
        "2026-12-02: exit 1 at the first, `amqp`).\n"
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

Short form (in `make test`, 18 tests): 212 s measured on the shared 2-core box with HAPI and
the RabbitMQ node already up (`.venv/bin/pytest -q -m reliability tests/reliability`,
2026-11-26), plus 40-65 s when the suite has to start HAPI and ~11 s for the RabbitMQ node.
That is over the ~3 min aim; the HAPI restart alone costs ~75 s of it, mostly HAPI's own
start-up. It uses 20 patients per fault scenario, 5 kills, 12 patients for the HAPI restart,
a graceful RabbitMQ stop, ~1,050 fuzz cases, a 25,000-point series. Full form: 200 patients
per scenario, 24 kills, SIGKILL restarts of Redis and of RabbitMQ as well, ~10,500 fuzz
cases, a 50,000-point series.

"""


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
        parts = [HEADER, "## Test results\n", junit_summary(), section_kill(),
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
SECURITY_REVIEW = """## Security review fixes (issue 13)

What the review found, the fix, and the unit test that fails before the fix and passes after
(fake transports, no servers), per item done so far.

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
  deploy/compose/site.env and deploy/k8s/clinragen.yaml),
  `::test_unknown_config_keys_are_named`, `::test_the_shipped_configs_have_only_known_keys`
* **12. Servers without versionId.** Found: The report key used `versionId`, or "" when missing,
  so a changed input kept its key and never got a new report. Fix: An input's version in the key
  is `versionId`, else `meta.lastUpdated`, else a sha256 of its content
  (`report.build.input_stamp`); keys where servers send `versionId` are unchanged, and
  `_history` references still use `versionId` only. Test:
  `tests/unit/test_report_key_versions.py::test_an_edited_input_without_version_id_gives_a_new_report_key`,
  `::test_version_id_keeps_the_key_it_always_had`,
  `::test_input_stamp_prefers_version_id_then_last_updated_then_content`
"""


if __name__ == "__main__":
    main()
