"""Load: N patients of a clinosim cohort, loaded into HAPI, through one worker with 2 processes.

    .venv/bin/python bench/load.py --patients 1000          # default
    .venv/bin/python bench/load.py --patients 200 --population 600
    .venv/bin/python bench/load.py --patients 300 --model .run/model/default --batch 8

`--batch N` sends `clinragen.diagnose_batch` tasks of N patients (1: one `clinragen.diagnose`
task per patient, as the webhook and polling do); `--model DIR` runs the ONNX model instead of
the rule baseline (`--threads`, `--model-batch`: its intra-op threads and patients per graph
call). Where the time goes per patient is read from each outcome's `timings` (pipeline.Outcome:
the batch of reads, encoding, retrieval and model inputs, prefix graph, prefill, decoding, the
comparison, rendering and write), a batch's prediction shared out evenly over its patients.

Uses the reliability suite's private services (HAPI on 127.0.0.1:8091, Redis on 6391; started
when down). Measures throughput, per-patient task time (p50/p95, from the worker's own
"succeeded in" lines), FHIR calls per patient (the worker's Prometheus counter
clinragen_fhir_requests_total), and the RSS of the worker's processes every 2 s (growth from
the first to the last quarter of the run). Writes .run/reliability/results/load.json.

Over 400 lines because a load run is one script a reader follows top to bottom: the cohort,
loading it, the worker, the run, the checks of lost and duplicated reports, the table.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from clinragen_fhir.fhir.client import FhirClient
from clinragen_fhir.fhir.loader import compartment_of, load, read_ndjson
from tests.reliability.stack import (
    RESULTS,
    RUN,
    SYSTEM,
    Hapi,
    Redis,
    Worker,
    base_env,
    celery_app,
    dead_letters,
    enqueue,
    lost_and_duplicated,
    queue_len,
    record,
    reports_by_patient,
    rss_kib,
    wait_all_done,
)

SUCCEEDED = re.compile(r"Task clinragen\.diagnose(?:_batch)?\[[^\]]+\] succeeded in ([0-9.]+)s")
STAGES = ("fhir_read_s", "encode_s", "featurise_s", "prefix_s", "prefill_s", "decode_s",
          "predict_s", "write_s")
WORK = ("fhir_read_s", "encode_s", "predict_s", "write_s")  # a patient's work, in sequence


def cohort(population: int, seed: int) -> Path:
    """A clinosim US cohort as FHIR R4 NDJSON (generated once, cached under .run)."""
    out = RUN / "cohort" / f"us-p{population}-s{seed}"
    folder = out / "fhir_r4"
    if not (folder / "Patient.ndjson").is_file():
        subprocess.run([str(Path(sys.executable).parent / "clinosim"), "simulate",
                        "--country", "US", "--population", str(population), "--seed",
                        str(seed), "--format", "fhir-r4", "-o", str(out)], check=True,
                       timeout=3600, stdout=subprocess.DEVNULL)
    return folder


WORKER_TYPES = {"Patient", "Observation", "DocumentReference"}  # what the worker reads


def first_ids(folder: Path, n: int) -> list[str]:
    """The cohort's first `n` patient ids, in file order."""
    with open(folder / "Patient.ndjson") as fh:
        return [json.loads(line)["id"] for line, _ in zip(fh, range(n), strict=False)
                if line.strip()]


def subset(folder: Path, pids: list[str]) -> Path:
    """The chosen patients' compartments and every shared resource, all types, as NDJSON in a
    folder of their own (cached): the loader then knows which references would dangle."""
    # named by the first patient too: a slice further on (--offset) is another subset
    out = folder.parent / (f"subset-{len(pids)}" if pids[:1] == first_ids(folder, 1)
                           else f"subset-{len(pids)}-{pids[0]}")
    if (out / "Patient.ndjson").is_file():
        return out
    chosen = set(pids)
    tmp = out.with_name(out.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    for path in sorted(folder.glob("*.ndjson")):
        with open(tmp / path.name, "w") as fh:
            for resource in read_ndjson(path):
                owner = compartment_of(resource)
                if owner is None or owner in chosen:
                    fh.write(json.dumps(resource) + "\n")
    tmp.rename(out)
    return out


def load_cohort(url: str, folder: Path, pids: list[str]) -> tuple[int, int, list[str]]:
    """The chosen patients with what the worker reads, by clinragen_fhir.fhir.loader (one
    patient's compartment per transaction unit, references to types not loaded removed).
    Returns (resources loaded, references removed, errors)."""
    with FhirClient(url, timeout=600) as client:
        report = load(client, [subset(folder, pids)], keep_types=WORKER_TYPES, workers=2,
                      progress=False)
    return sum(report.counts.values()), report.stripped, [e for _, e in report.errors]


def reports_of_method(url: str, pids: list[str], method: str) -> Counter[str]:
    """Our reports per patient whose identifier names `method` (`<method>:<hash>`): each
    method has its own current report, so a run of the model after one of the baseline on the
    same server (`--skip-load`) checks its own."""
    counts: Counter[str] = Counter({p: 0 for p in pids})
    with httpx.Client(timeout=120) as http:
        next_url: str | None = f"{url}/DiagnosticReport"
        params: dict[str, Any] | None = {"identifier": f"{SYSTEM}|", "_count": 500,
                                         "_elements": "subject,identifier"}
        for _ in range(1000):
            if not next_url:
                break
            r = http.get(next_url, params=params)
            r.raise_for_status()
            bundle = r.json()
            for e in bundle.get("entry", []) or []:
                res = e["resource"]
                pid = str(res.get("subject", {}).get("reference", "")).removeprefix("Patient/")
                if pid in counts and any(str(i.get("value", "")).startswith(f"{method}:")
                                         for i in res.get("identifier", [])):
                    counts[pid] += 1
            next_url = next((lk["url"] for lk in bundle.get("link", [])
                             if lk.get("relation") == "next"), None)
            params = None
    return counts


def outcome_check(url: str, redis: Redis, pids: list[str],
                  method: str | None = None) -> dict[str, Any]:
    """Lost and duplicated, from the FHIR server (our reports per patient; of `method` only
    when given) and the dead-letter queue: lost = no report and no dead letter; duplicated =
    more than one report."""
    counts = reports_by_patient(url, pids) if method is None else \
        reports_of_method(url, pids, method)
    letters = dead_letters(redis)
    lettered = {str(d["args"][0]) for d in letters if d.get("args")}
    lost, duplicated = lost_and_duplicated(pids, counts, letters)
    errors: dict[str, int] = {}
    for d in letters:
        errors[str(d["error"])[:120]] = errors.get(str(d["error"])[:120], 0) + 1
    return {"reports_per_patient": {str(k): v for k, v in sorted(
                {c: sum(1 for p in pids if counts[p] == c) for c in set(counts.values())
                 }.items())},
            "lost": len(lost),
            "duplicated": len(duplicated),
            "dead_letters": errors,
            "dead_lettered_with_report": sum(1 for p in lettered if counts.get(p, 0) > 0)}


def fhir_calls(metrics_port: int) -> float:
    text = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("clinragen_fhir_requests_total{"))


def enqueue_batches(app: Any, pids: list[str], size: int) -> dict[str, str]:
    """`size` patients per `clinragen.diagnose_batch` task (1: `enqueue`, a task each); task id
    by its first patient."""
    if size <= 1:
        return enqueue(app, pids)
    return {chunk[0]: app.send_task("clinragen.diagnose_batch", args=(chunk,),
                                    queue="clinragen").id
            for chunk in (pids[i:i + size] for i in range(0, len(pids), size))}


def task_outcomes(app: Any, tasks: dict[str, str]) -> tuple[dict[str, int], list[dict[str, Any]]]:
    """Outcome counts (a patient each; a task's state where it failed) and every patient's
    outcome dict, from the result backend (a batch task's result holds a list of them)."""
    counts: dict[str, int] = {}
    outcomes: list[dict[str, Any]] = []
    for tid in tasks.values():
        res = app.AsyncResult(tid)
        if res.state != "SUCCESS":
            counts[res.state] = counts.get(res.state, 0) + 1
            continue
        result = res.result or {}
        found = list(result.get("outcomes") or []) if "outcomes" in result else [result]
        outcomes += found
        for o in found:
            counts[o.get("status", "?")] = counts.get(o.get("status", "?"), 0) + 1
        for key in ("retried", "failed", "split"):
            if result.get(key):
                counts[key] = counts.get(key, 0) + int(result[key])
    return counts, outcomes


def stage_table(outcomes: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per stage: mean and p95 seconds per patient over the patients that ran it, its share of
    all patients' work (`WORK`: featurise, prefix, prefill and decode are parts of predict),
    and the patients it was measured on."""
    total = sum(float((o.get("timings") or {}).get(k, 0.0)) for o in outcomes
                for k in WORK) or 1.0
    table = {}
    for stage in STAGES:
        values = [float(o["timings"][stage]) for o in outcomes
                  if stage in (o.get("timings") or {})]
        if values:
            table[stage] = {"mean_s": round(statistics.fmean(values), 4),
                            "p95_s": round(percentile(values, 0.95), 4),
                            "share_of_work": round(sum(values) / total, 3),
                            "patients": len(values)}
    return table


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))] if ordered else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--patients", type=int, default=1000)
    parser.add_argument("--population", type=int, default=0,
                        help="clinosim catchment population (default: 1.9 x patients; "
                        "~56%% of it become patients: 334 of 600, 1083 of 1900)")
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--concurrency", type=int, default=2, help="worker processes")
    parser.add_argument("--timeout", type=float, default=7200)
    parser.add_argument("--suite-timeouts", action="store_true",
                        help="the reliability suite's short time limits (soft/hard 40/50 s, "
                             "FHIR timeout 10 s) instead of the config defaults (300/360 s, "
                             "30 s)")
    parser.add_argument("--check-only", action="store_true",
                        help="only count reports per patient and dead letters for the cohort "
                             "on the running services (after a run) and add them to "
                             "load.json")
    parser.add_argument("--rounds", type=int, default=1,
                        help="diagnose every patient this many times (later rounds find the "
                             "report: the whole read path without the write), for a longer "
                             "RSS series")
    parser.add_argument("--batch", type=int, default=1,
                        help="patients per task (clinragen.diagnose_batch); 1: a "
                             "clinragen.diagnose task each")
    parser.add_argument("--model", type=Path, default=None,
                        help="ONNX model directory (default: the rule baseline)")
    parser.add_argument("--threads", type=int, default=0,
                        help="onnxruntime intra-op threads per worker process (0: its default)")
    parser.add_argument("--model-batch", type=int, default=0,
                        help="patients per model graph call (inference.batch_size; 0: the "
                             "config default)")
    parser.add_argument("--offset", type=int, default=0,
                        help="start at this patient of the cohort (a slice not diagnosed yet: "
                             "another run on the same server with the same model would find "
                             "its reports and predict nothing)")
    parser.add_argument("--precision", choices=("fp32", "int8"), default="fp32",
                        help="inference.precision (int8: the quantised graphs)")
    parser.add_argument("--max-new-tokens", type=int, default=0,
                        help="inference.max_new_tokens (0: the model's own)")
    parser.add_argument("--page-size", type=int, default=0,
                        help="fhir.page_size (_count of each search; 0: the config default, "
                             "200): HAPI pages slowly, 1000 reads most patients in one page")
    parser.add_argument("--skip-load", action="store_true",
                        help="the cohort is on the server already (an earlier run): do not "
                             "load it again; lost/duplicated are checked for this run's "
                             "method only")
    args = parser.parse_args()
    population = args.population or int(args.patients * 1.9)

    hapi, redis = Hapi(), Redis()
    if args.check_only:
        folder = cohort(population, args.seed)
        pids = [json.loads(line)["id"] for line in
                (folder / "Patient.ndjson").read_text().splitlines() if line.strip()]
        pids = pids[args.offset:args.offset + args.patients]
        check = outcome_check(hapi.url, redis, pids)
        path = RESULTS / "load.json"
        figures = json.loads(path.read_text())
        if figures.get("patients") != len(pids):
            sys.exit(f"{path} is a run of {figures.get('patients')} patients, not {len(pids)}")
        figures.update(check)
        figures["check_command"] = ".venv/bin/python bench/load.py " + " ".join(sys.argv[1:])
        path.write_text(json.dumps(figures, indent=2, default=str))
        print(json.dumps(check, indent=2))
        return
    if not hapi.up():
        hapi.start()
    redis.start()
    redis.flush()
    folder = cohort(population, args.seed)
    pids = [json.loads(line)["id"] for line in
            (folder / "Patient.ndjson").read_text().splitlines() if line.strip()]
    if len(pids) < args.patients:
        print(f"cohort has {len(pids)} patients (< {args.patients}); raise --population",
              file=sys.stderr)
    pids = pids[args.offset:args.offset + args.patients]
    t_load = time.monotonic()
    loaded, stripped, load_errors = (0, 0, []) if args.skip_load else \
        load_cohort(hapi.url, folder, pids)
    load_s = time.monotonic() - t_load
    print(f"loaded {loaded} resources in {load_s:.0f} s ({stripped} references to types not "
          f"loaded removed, {len(load_errors)} errors)", file=sys.stderr, flush=True)

    metrics_port = 9391
    # The production time limits and FHIR timeout (config defaults), not the fault suite's
    # short ones: 40 s / 10 s dead-lettered the 5 largest of 1,000 clinosim patients (1,200-
    # 2,800 Observations; their report transaction took HAPI > 10 s on the loaded machine).
    env = base_env(hapi.url, redis, CLINRAGEN_WORKER__METRICS_PORT=str(metrics_port),
                   CLINRAGEN_WORKER__CONCURRENCY=str(args.concurrency))
    if args.page_size:
        env["CLINRAGEN_FHIR__PAGE_SIZE"] = str(args.page_size)
    if args.model is not None:
        env["CLINRAGEN_MODEL_DIR"] = str(args.model.resolve())
        env["CLINRAGEN_INFERENCE__THREADS"] = str(args.threads)
        if args.model_batch:
            env["CLINRAGEN_INFERENCE__BATCH_SIZE"] = str(args.model_batch)
        env["CLINRAGEN_INFERENCE__PRECISION"] = args.precision
        if args.max_new_tokens:
            env["CLINRAGEN_INFERENCE__MAX_NEW_TOKENS"] = str(args.max_new_tokens)
    if not args.suite_timeouts:
        for key in ("CLINRAGEN_WORKER__SOFT_TIME_LIMIT_S", "CLINRAGEN_WORKER__TIME_LIMIT_S",
                    "CLINRAGEN_WORKER__VISIBILITY_TIMEOUT_S", "CLINRAGEN_FHIR__TIMEOUT_S"):
            env.pop(key)
    worker = Worker("load", env, concurrency=args.concurrency)
    worker.start()
    worker.ready(180)
    app = celery_app(redis)
    calls_before = fhir_calls(metrics_port)
    rss: list[dict[str, Any]] = []
    t0 = time.monotonic()
    last_sample = [0.0]

    def sample() -> None:
        if time.monotonic() - last_sample[0] >= 2:
            last_sample[0] = time.monotonic()
            procs = [worker.pid, *worker.pool()]
            rss.append({"t_s": round(last_sample[0] - t0, 1),
                        "main_mib": round(rss_kib(worker.pid) / 1024, 1),
                        "children_mib": [round(rss_kib(p) / 1024, 1) for p in procs[1:]]})

    tasks: dict[str, str] = {}
    by_round: list[list[float]] = []  # children's RSS at the end of each round
    try:
        for n in range(args.rounds):
            batch = enqueue_batches(app, pids, args.batch)
            tasks.update({f"{pid}#{n}": tid for pid, tid in batch.items()})
            wait_all_done(app, batch, args.timeout, sample)
            # patients a task sent on (a retry, a split batch) are in new messages: the run
            # ends when the broker holds none (queued, or reserved and not yet done)
            drain = time.monotonic() + args.timeout
            while queue_len(redis) and time.monotonic() < drain:
                sample()
                time.sleep(1)
            by_round.append([round(rss_kib(p) / 1024, 1) for p in worker.pool()])
    finally:
        elapsed = time.monotonic() - t0
        calls = fhir_calls(metrics_port) - calls_before
        worker.stop()
    check = outcome_check(hapi.url, redis, pids, method=(
        "clinragen-onnx" if args.model else "knowledge-rule-baseline") if args.skip_load
        else None)
    outcomes, per_patient = task_outcomes(app, tasks)
    work = [sum(float((o.get("timings") or {}).get(k, 0.0)) for k in WORK) for o in per_patient]
    durations = [float(m.group(1)) for path in worker.logs
                 for m in SUCCEEDED.finditer(path.read_text(errors="replace"))]
    n1 = len(durations) // max(1, args.rounds)  # rounds run one after the other: round 1 first
    q = max(1, len(rss) // 4)
    first = [sum(r["children_mib"]) for r in rss[:q]]
    last = [sum(r["children_mib"]) for r in rss[-q:]]
    figures = {
        "patients": len(pids), "population": population, "seed": args.seed,
        "resources_loaded": loaded, "load_seconds": round(load_s, 1),
        "load_resources_per_s": round(loaded / load_s, 1) if load_s else 0,
        "load_references_removed": stripped, "load_errors": load_errors[:20],
        "load_error_count": len(load_errors),
        "rounds": args.rounds, "tasks": len(tasks), "patients_per_task": args.batch,
        "model": str(args.model) if args.model else "rule baseline",
        "onnx_threads": args.threads, "model_batch": args.model_batch or "config default",
        "diagnosed": len(pids) * args.rounds,
        "throughput_patients_per_hour": round(3600 * len(pids) * args.rounds / elapsed),
        "worker_processes": args.concurrency, "seconds": round(elapsed, 1),
        "throughput_patients_per_min": round(60 * len(pids) * args.rounds / elapsed, 1),
        "task_p50_s": round(percentile(durations, 0.5), 2),
        "task_p95_s": round(percentile(durations, 0.95), 2),
        "task_mean_s": round(statistics.fmean(durations), 2) if durations else 0,
        "task_p50_s_round1": round(percentile(durations[:n1], 0.5), 2),
        "task_p95_s_round1": round(percentile(durations[:n1], 0.95), 2),
        # the worker's own count of FHIR exchanges (retries included), over the patients
        "fhir_calls": int(calls),
        "fhir_calls_per_patient": round(calls / (len(pids) * args.rounds), 2),
        # per patient: the summed stages (a batch's prediction shared out evenly), and each
        "patient_work_p50_s": round(percentile(work, 0.5), 3),
        "patient_work_p95_s": round(percentile(work, 0.95), 3),
        "stages": stage_table(per_patient),
        "outcomes": outcomes, **check,
        "settings": {k: v for k, v in worker.env.items() if k.startswith((
            "CLINRAGEN_WORKER__", "CLINRAGEN_FHIR__TIMEOUT", "CLINRAGEN_FHIR__RETRIES",
            "CLINRAGEN_INFERENCE__", "CLINRAGEN_MODEL_DIR", "CLINRAGEN_FHIR__PAGE_SIZE"))}
        or "config defaults",
        "rss_children_first_quarter_mib": round(statistics.fmean(first), 1) if first else 0,
        "rss_children_last_quarter_mib": round(statistics.fmean(last), 1) if last else 0,
        "rss_main_mib_last": rss[-1]["main_mib"] if rss else 0,
        "rss_samples": rss[:: max(1, len(rss) // 40)],
        "rss_children_mib_by_round": by_round,
        "machine": "2 shared CPU cores (other jobs running)",
        "command": ".venv/bin/python bench/load.py " + " ".join(sys.argv[1:]),
    }
    first_mean = figures["rss_children_first_quarter_mib"]
    figures["rss_growth_pct"] = round(100 * (figures["rss_children_last_quarter_mib"] -
                                             first_mean) / first_mean, 1) if first_mean else 0
    record("load", figures, to=RESULTS)  # the report's results, whatever the suite's form
    print(json.dumps({k: v for k, v in figures.items() if k != "rss_samples"}, indent=2))


if __name__ == "__main__":
    main()
