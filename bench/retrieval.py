"""Benchmarks for the knowledge layer.

    python bench/retrieval.py [--data DIR] [--repeat N]     retrieval patients/s on the shared data
    python bench/retrieval.py --rf2 370000                  RF2 import rate and peak memory on a
                                                             synthetic release of that many concepts

Frames and notes are built first (not timed): the number is retrieval itself, as the worker runs it.
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "synthea-exafluence-qicore"


def bench_retrieval(data: Path, repeat: int) -> None:
    from clinragen_fhir.knowledge import load_graph, retrieve
    from clinragen_fhir.knowledge.bundle import inputs_from_bundle, read_bundle
    from clinragen_fhir.knowledge.retrieval import rule_index

    t0 = time.perf_counter()
    kg = load_graph()
    t1 = time.perf_counter()
    rule_index(kg)
    t2 = time.perf_counter()
    files = sorted(p for p in data.rglob("*.json.gz")
                   if not p.name.startswith(("hospitalInformation", "practitionerInformation")))
    inputs = [inputs_from_bundle(read_bundle(p), kg) for p in files]
    n_find = 0
    started = time.perf_counter()
    for _ in range(repeat):
        for inp in inputs:
            r = retrieve(kg, inp.labs, inp.notes, inp.patient)
            n_find += len(r.findings)
    elapsed = time.perf_counter() - started
    n = len(inputs) * repeat
    print(f"graph load {t1 - t0:.2f} s, rule index (SPARQL) {t2 - t1:.2f} s")
    print(f"retrieval: {n} patients in {elapsed:.2f} s = {n / elapsed:.0f} patients/s "
          f"({n_find / n:.1f} findings/patient, "
          f"{sum(len(i.labs) for i in inputs) / len(inputs):.0f} readings and "
          f"{sum(len(i.notes) for i in inputs) / len(inputs):.0f} notes/patient)")


def bench_rf2(n_concepts: int) -> None:
    from clinragen_fhir.knowledge.rf2 import import_rf2, write_synthetic_release

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        release = write_synthetic_release(Path(tmp) / "release", n_concepts)
        print(f"synthetic release of {n_concepts} concepts written in "
              f"{time.perf_counter() - t0:.1f} s")
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        report = import_rf2(release, Path(tmp) / "store")
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(f"imported {report.concepts} concepts, {report.descriptions} descriptions, "
              f"{report.is_a} IS-A + {report.attributes} attribute relationships "
              f"({report.triples} triples, {report.rows} RF2 rows) in {report.seconds:.1f} s: "
              f"{report.rows_per_second:,.0f} rows/s, {report.triples / report.seconds:,.0f} "
              f"triples/s; peak RSS {peak:.0f} MB (before import {before:.0f} MB)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--rf2", type=int, default=0, help="concepts in a synthetic RF2 release")
    args = ap.parse_args()
    if args.rf2:
        bench_rf2(args.rf2)
    else:
        bench_retrieval(args.data, args.repeat)


if __name__ == "__main__":
    main()
