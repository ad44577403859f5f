"""How the cost of one patient grows with the number of Observations (issue 17, item 5).

    .venv/bin/python -m bench.scaling [--sizes 10,100,1000,10000,50000] [--repeat 3]
                                      [--model-dir DIR | --rules] [--plot docs/images/scaling.png]

One synthetic patient per size: `n` lab Observations (FHIR R4 JSON, as a server returns them)
spread evenly over the lookback, cycling over `--tests` LOINC codes the graph knows, in their
canonical units, values around the graph's reference range with some out of it; two short
notes. Each goes through the path `pipeline.diagnose_patient` runs after its FHIR read:
`encode_patient` (the lab frame: parsing, units, ranges, the reading cap), the predictor
(knowledge retrieval, featurisation, the ONNX prefix + head + generation, or the rule
baseline), the rationale check (`LabLexicon.build`, `check_report_rationale`,
`diagnosis_claims`) and `build_transaction` (DiagnosticReport + Provenance naming every input).
The FHIR read itself (HTTP, JSON, paging) is not in it: `bench/load.py` measures it on HAPI.

Per size: the fastest of `--repeat` runs (a shared machine's noise only adds time) and each
stage's share, then one more run under tracemalloc for the peak of memory allocated during the
run (Python objects, numpy and pandas buffers; onnxruntime's own arena is not traced and does
not grow with the record: the model reads at most the budget's readings). `growth` is the
log-log slope between successive sizes: 1 is linear, below 1 sub-linear; above 1 names the
stage that grew most (profile it with --profile N).

Over 400 lines because the synthetic patients, the stage timers and the table are one
measurement and are read together.
"""

from __future__ import annotations

import argparse
import base64
import json
import math
import os
import random
import sys
import time
import tracemalloc
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DEFAULT_MODEL = ROOT / ".run" / "model" / "default"
SIZES = (10, 100, 1_000, 10_000, 50_000)
UCUM = "http://unitsofmeasure.org"
NOW = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)  # fixed: the same patient every run


Test = tuple[str, str, str, float, float, str]


def pick_tests(kg: Any, wanted: list[str], n: int) -> list[Test]:
    """(loinc, display, canonical unit, low, high, FHIR category) of up to `n` quantity tests
    the graph knows with a reference range: the model's vocabulary first (`wanted`), then the
    graph's other labs."""
    out = []
    for code in [*wanted, *sorted(kg.labs())]:
        if any(code == t[0] for t in out):
            continue
        lab = kg.lab(code)
        if lab is None or not lab.canonical_unit or lab.value_type != "quantity":
            continue
        low, high = kg.reference_range(code, "female", 66.0)
        if low is None and high is None:
            continue
        low = float(low) if low is not None else float(high) * 0.5  # type: ignore[arg-type]
        high = float(high) if high is not None else low * 2.0
        if not (math.isfinite(low) and math.isfinite(high)) or high <= low:
            continue
        out.append((code, lab.name or code, lab.canonical_unit, low, high,
                    "vital-signs" if lab.category == "vital" else "laboratory"))
        if len(out) >= n:
            break
    return out


def synthetic_observations(n: int, tests: list[Test],
                           now: datetime = NOW, lookback_days: int = 3 * 365,
                           seed: int = 0, patient_id: str = "scale") -> list[dict[str, Any]]:
    """`n` final lab or vital-sign Observations of `patient_id`, evenly spread over the lookback
    (newest a day before `now`), test `i % len(tests)`; a value in the reference range, or
    (one in five) up to 40 % beyond one of its ends."""
    rng = random.Random(seed)
    span = timedelta(days=lookback_days - 2)
    out = []
    for i in range(n):
        code, display, unit, low, high, category = tests[i % len(tests)]
        when = now - timedelta(days=1) - span * (1 - (i + 1) / n)
        width = high - low
        if rng.random() < 0.2:
            value = high + rng.random() * 0.4 * width if rng.random() < 0.5 \
                else max(0.0, low - rng.random() * 0.4 * width)
        else:
            value = low + rng.random() * width
        out.append({
            "resourceType": "Observation", "id": f"{patient_id}-obs-{i}",
            "meta": {"versionId": "1"}, "status": "final",
            "category": [{"coding": [{
                "system": "http://terminology.hl7.org/CodeSystem/observation-category",
                "code": category}]}],
            "code": {"coding": [{"system": "http://loinc.org", "code": code,
                                 "display": display}], "text": display},
            "subject": {"reference": f"Patient/{patient_id}"},
            "effectiveDateTime": when.isoformat(),
            "valueQuantity": {"value": round(value, 2), "unit": unit, "system": UCUM,
                              "code": unit}})
    return out


def synthetic_patient(patient_id: str = "scale") -> dict[str, Any]:
    return {"resourceType": "Patient", "id": patient_id, "meta": {"versionId": "1"},
            "gender": "female", "birthDate": "1960-06-01"}


def synthetic_notes(patient_id: str = "scale", now: datetime = NOW) -> list[dict[str, Any]]:
    texts = ["Follow-up visit. Patient reports fatigue and increased thirst. Plan: repeat labs.",
             "Annual check. Blood pressure reviewed, diet discussed, no acute complaints."]
    return [{"resourceType": "DocumentReference", "id": f"{patient_id}-note-{k}",
             "meta": {"versionId": "1"}, "status": "current",
             "subject": {"reference": f"Patient/{patient_id}"},
             "date": (now - timedelta(days=30 * (k + 1))).isoformat(),
             "content": [{"attachment": {"contentType": "text/plain",
                                         "data": base64.b64encode(t.encode()).decode()}}]}
            for k, t in enumerate(texts)]


class Stages:
    """Wall time per named stage of one run, by wrapping module attributes in this process."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.tokens = 0
        self._undo: list[Callable[[], None]] = []

    def wrap(self, owner: Any, name: str, stage: str) -> None:
        original = getattr(owner, name)

        def timed(*args: Any, **kwargs: Any) -> Any:
            t = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.seconds[stage] += time.perf_counter() - t

        setattr(owner, name, timed)
        self._undo.append(lambda: setattr(owner, name, original))

    def reset(self) -> None:
        self.seconds.clear()
        self.tokens = 0

    def undo(self) -> None:
        while self._undo:
            self._undo.pop()()


def install_stages(stages: Stages, predictor: Any) -> None:
    """The stages inside `diagnose_one`'s calls (retrieval and featurisation happen inside the
    predictor; their names are looked up where the predictor modules imported them)."""
    import clinragen_fhir.inference.predictor as onnx_predictor
    import clinragen_fhir.predict.rules as rules

    stages.wrap(onnx_predictor, "retrieve", "retrieve")
    stages.wrap(rules, "retrieve", "retrieve")
    stages.wrap(onnx_predictor, "featurise", "featurise")
    model = getattr(getattr(predictor, "model", None), "model", None)  # ModelOrBaseline -> Onnx
    if model is not None:
        stages.wrap(model, "generate", "model (prefix + decode)")
        generate = model.generate

        def counted(*args: Any, **kwargs: Any) -> Any:
            out = generate(*args, **kwargs)
            stages.tokens += int(out.ids.shape[1])  # generated length (until eos)
            return out

        model.generate = counted


def diagnose_one(kg: Any, predictor: Any, patient: dict[str, Any],
                 observations: list[dict[str, Any]], documents: list[dict[str, Any]],
                 stages: Stages, now: datetime = NOW) -> dict[str, Any]:
    """`diagnose_patient`'s work after the read, stage by stage (the same functions, from the
    pipeline's own namespace)."""
    import pandas as pd

    from clinragen_fhir import pipeline
    from clinragen_fhir.config import ReportSettings
    from clinragen_fhir.report.fingerprint import inputs_fingerprint as fingerprint_of
    from clinragen_fhir.report.fingerprint import prediction_identity

    settings = ReportSettings()
    sec = stages.seconds
    t = time.perf_counter()
    enc = pipeline.encode_patient(patient, observations, documents, kg, now,
                                  patient_id=patient["id"])
    used = [pipeline.InputRef(r, v, v) for r, v in
            enc.labs[["observation_id", "version_id"]].drop_duplicates().itertuples(index=False)]
    used += [pipeline.InputRef(n.document_id, n.version_id, n.version_id) for n in enc.notes]
    sec["encode"] += time.perf_counter() - t
    t = time.perf_counter()
    prediction = predictor.predict(enc.labs, enc.notes, enc.patient)
    sec["predict (all)"] += time.perf_counter() - t
    t = time.perf_counter()
    lexicon = pipeline.LabLexicon.build(kg, [enc.labs] if len(enc.labs) else [])
    claims = pipeline.check_report_rationale(prediction.rationale, enc.labs, kg, lexicon)
    pipeline.diagnosis_claims(prediction.rationale, [d.term for d in prediction.diagnoses],
                              enc.labs, lexicon)
    sec["rationale check"] += time.perf_counter() - t
    t = time.perf_counter()
    fingerprint = fingerprint_of(enc, prediction_identity(prediction))
    latest = [x for x in [enc.labs["time"].max() if not enc.labs.empty else None,
                          *(n.time for n in enc.notes)] if x is not None]
    effective = max(pd.Timestamp(x) for x in latest).to_pydatetime() if latest else now
    bundle, _ = pipeline.build_transaction(
        patient["id"], prediction, used, enc.skips, settings, now=now, effective=effective,
        labs=enc.labs, claims=claims, patient=enc.resource,
        fact_labels=pipeline.fact_labels(kg, prediction, enc.labs))
    sec["report + Provenance"] += time.perf_counter() - t
    return {"readings": len(enc.labs), "skips": len(enc.skips), "inputs_used": len(used),
            "diagnoses": [d.snomed for d in prediction.diagnoses], "method": prediction.method,
            "entries": len(bundle.get("entry", [])), "fingerprint": fingerprint[:12],
            "bundle": bundle}


def resource_mib(bundle: dict[str, Any]) -> dict[str, float]:
    """MiB of JSON of each resource type in a transaction (what would be posted)."""
    out: dict[str, float] = defaultdict(float)
    for entry in bundle.get("entry", []):
        r = entry.get("resource") or {}
        out[str(r.get("resourceType", "?"))] += len(json.dumps(r)) / 2**20
    return dict(out)


@contextmanager
def traced() -> Iterator[dict[str, float]]:
    out: dict[str, float] = {}
    tracemalloc.start()
    tracemalloc.reset_peak()
    base = tracemalloc.get_traced_memory()[0]
    try:
        yield out
    finally:
        out["peak_mib"] = (tracemalloc.get_traced_memory()[1] - base) / 2**20
        tracemalloc.stop()


def growth(sizes: list[int], values: list[float]) -> list[float | None]:
    """Log-log slope from each size to the next (None for the first): 1.0 is linear."""
    out: list[float | None] = [None]
    for (a, x), (b, y) in zip(zip(sizes, values, strict=True),
                              zip(sizes[1:], values[1:], strict=True), strict=False):
        out.append(math.log(y / x) / math.log(b / a) if x > 0 and y > 0 and b != a else None)
    return out


def stage_shares(seconds: dict[str, float]) -> dict[str, float]:
    """The stages that do not contain one another, and what is left of the total: retrieval,
    featurisation and the model run inside the predictor."""
    inner = sum(seconds.get(k, 0.0) for k in ("retrieve", "featurise", "model (prefix + decode)"))
    out = {k: seconds.get(k, 0.0) for k in ("encode", "retrieve", "featurise",
                                            "model (prefix + decode)")}
    out["predict (other)"] = max(0.0, seconds.get("predict (all)", 0.0) - inner)
    out["rationale check"] = seconds.get("rationale check", 0.0)
    out["report + Provenance"] = seconds.get("report + Provenance", 0.0)
    return out


def plot(rows: list[dict[str, Any]], path: Path, title: str, cap: int | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = [r["observations"] for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    ax1.loglog(sizes, [r["seconds"] for r in rows], "o-", label="total per patient")
    ax1.loglog(sizes, [r["seconds_without_model"] for r in rows], "s-",
               label="total without the model run")
    for stage in rows[0]["stages"]:
        vals = [max(r["stages"][stage], 1e-5) for r in rows]
        if max(vals) > 1e-3:
            ax1.loglog(sizes, vals, ".--", alpha=0.7, label=stage)
    s0, t0 = sizes[0], rows[0]["seconds_without_model"]
    ax1.loglog(sizes, [t0 * s / s0 for s in sizes], ":", color="grey", label="linear from 10")
    for ax in (ax1, ax2):
        if cap and sizes[0] <= cap <= sizes[-1]:
            ax.axvline(cap, color="black", lw=0.8, alpha=0.5)
            ax.text(cap, ax.get_ylim()[0], " reading cap", fontsize=7, rotation=90,
                    va="bottom", alpha=0.7)
    ax1.set_xlabel("Observations of the patient")
    ax1.set_ylabel("seconds (fastest run)")
    ax1.legend(fontsize=7)
    ax1.grid(True, which="both", alpha=0.3)
    ax2.loglog(sizes, [max(r["peak_mib"], 1e-3) for r in rows], "o-", color="C3",
               label="peak allocated during the run (tracemalloc)")
    ax2.loglog(sizes, [max(r["input_mib"], 1e-3) for r in rows], "s:", color="grey",
               label="the Observations' JSON size")
    ax2.set_xlabel("Observations of the patient")
    ax2.set_ylabel("MiB")
    ax2.legend(fontsize=7)
    ax2.grid(True, which="both", alpha=0.3)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default=",".join(map(str, SIZES)))
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--tests", type=int, default=24, help="distinct LOINC codes")
    parser.add_argument("--model-dir", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--rules", action="store_true", help="the rule baseline, no model")
    parser.add_argument("--precision", choices=["fp32", "int8"], default="fp32")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--profile", type=int, default=0,
                        help="cProfile one run at this size and print the top functions")
    parser.add_argument("--plot", type=Path, default=None)
    parser.add_argument("--replot", action="store_true",
                        help="only draw --plot again from --out (no run)")
    parser.add_argument("--out", type=Path, default=ROOT / ".run" / "bench" / "scaling.json")
    args = parser.parse_args(argv)
    if args.replot:
        saved = json.loads(args.out.read_text())
        plot(saved["rows"], args.plot, f"cost per patient vs Observations ({saved['method']}, "
             f"{saved['precision']}, {saved['threads']} thread, reading cap "
             f"{saved['max_readings']:,})", saved["max_readings"])
        return

    from clinragen_fhir.config import InferenceSettings
    from clinragen_fhir.encoding.labs import MAX_READINGS
    from clinragen_fhir.inference.fallback import build_predictor
    from clinragen_fhir.inference.model_config import ModelConfig
    from clinragen_fhir.knowledge import load_graph

    kg = load_graph()
    model_dir = None if args.rules else args.model_dir
    predictor = build_predictor(model_dir, kg, InferenceSettings(precision=args.precision,
                                                                 threads=args.threads))
    wanted = ModelConfig.read(model_dir / "config.json").loinc_codes if model_dir else []
    tests = pick_tests(kg, wanted, args.tests)
    budgets = (ModelConfig.read(model_dir / "config.json").budgets if model_dir else None)
    stages = Stages()
    install_stages(stages, predictor)
    patient, notes = synthetic_patient(), synthetic_notes()
    sizes = [int(s) for s in args.sizes.split(",") if s]
    diagnose_one(kg, predictor, patient, synthetic_observations(50, tests), notes, stages)
    stages.reset()

    if args.profile:
        import cProfile
        import pstats

        obs = synthetic_observations(args.profile, tests)
        prof = cProfile.Profile()
        prof.enable()
        diagnose_one(kg, predictor, patient, obs, notes, stages)
        prof.disable()
        pstats.Stats(prof).sort_stats("cumulative").print_stats(35)
        pstats.Stats(prof).sort_stats("tottime").print_stats(25)
        return

    rows = []
    for n in sizes:
        obs = synthetic_observations(n, tests)
        input_mib = len(json.dumps(obs)) / 2**20
        best: tuple[float, dict[str, float], dict[str, Any]] = (float("inf"), {}, {})
        for _ in range(args.repeat):
            stages.reset()
            t = time.perf_counter()
            info = diagnose_one(kg, predictor, patient, obs, notes, stages)
            took = time.perf_counter() - t
            written = resource_mib(info.pop("bundle"))  # measured outside the timed run
            if took < best[0]:
                best = (took, dict(stages.seconds), {**info, "generated_tokens": stages.tokens,
                                                     "written_mib": written})
        stages.reset()
        with traced() as mem:
            diagnose_one(kg, predictor, patient, obs, notes, stages).pop("bundle")
        shares = stage_shares(best[1])
        row = {"observations": n, "seconds": best[0], "stages": shares,
               "seconds_without_model": best[0] - shares["model (prefix + decode)"],
               "peak_mib": mem["peak_mib"], "input_mib": input_mib, **best[2]}
        rows.append(row)
        print(f"{n:>6} Observations: {best[0]:.3f} s, peak {mem['peak_mib']:.1f} MiB "
              f"(their JSON {input_mib:.1f} MiB), {row['readings']} readings kept, "
              f"{row['skips']} skipped, {row['entries']} transaction entries "
              f"({', '.join(f'{k} {v:.2f} MiB' for k, v in row['written_mib'].items())})",
              file=sys.stderr)
        del obs
    for key in ("seconds", "seconds_without_model", "peak_mib"):
        for r, g in zip(rows, growth(sizes, [r[key] for r in rows]), strict=True):
            r[f"growth_{key}"] = g
    method = rows[0]["method"] if rows else ""
    report = {"model_dir": str(model_dir) if model_dir else None, "method": method,
              "precision": args.precision, "threads": args.threads, "repeat": args.repeat,
              "tests": len(tests), "max_readings": MAX_READINGS,
              "model_max_labs": budgets.max_labs if budgets else None,
              "cpu_count": os.cpu_count(), "loadavg_after": os.getloadavg()[0], "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    names = list(rows[0]["stages"]) if rows else []
    print(f"{method}, {len(tests)} tests, reading cap {MAX_READINGS}, fastest of {args.repeat}; "
          f"1-min load {report['loadavg_after']:.1f}")
    def g(x: float | None) -> str:
        return "-" if x is None else f"{x:.2f}"

    print("| Observations | s/patient | growth | s without the model | growth | peak MiB | "
          "growth | readings kept | tokens generated | " + " | ".join(names) + " |")
    print("|" + "---|" * (9 + len(names)))
    for r in rows:
        print(f"| {r['observations']:,} | {r['seconds']:.3f} | {g(r['growth_seconds'])} | "
              f"{r['seconds_without_model']:.3f} | {g(r['growth_seconds_without_model'])} | "
              f"{r['peak_mib']:.1f} | {g(r['growth_peak_mib'])} | {r['readings']:,} | "
              f"{r['generated_tokens']} | "
              + " | ".join(f"{1e3 * r['stages'][k]:.0f} ms" for k in names) + " |")
    if args.plot:
        plot(rows, args.plot, f"cost per patient vs Observations ({method}, "
             f"{args.precision}, {args.threads} thread, reading cap {MAX_READINGS:,})",
             MAX_READINGS)
        print(f"plot: {args.plot}")
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
