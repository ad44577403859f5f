"""Torch-free helpers shared by the export's parity/int8 checks and the benchmark: real patients
from the shared Synthea bundles, and macro-F1. No torch here, so the benchmark's onnxruntime
processes measure onnxruntime, not a torch import."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np


def macro_f1(pred: Sequence[set[str]], gold: Sequence[set[str]], labels: Sequence[str]) -> float:
    """Mean per-label F1 over labels that occur in gold or prediction (0 when none do)."""
    scores = []
    for c in labels:
        tp = sum(1 for p, g in zip(pred, gold, strict=True) if c in p and c in g)
        fp = sum(1 for p, g in zip(pred, gold, strict=True) if c in p and c not in g)
        fn = sum(1 for p, g in zip(pred, gold, strict=True) if c not in p and c in g)
        if tp + fp + fn:
            scores.append(2 * tp / (2 * tp + fp + fn))
    return float(np.mean(scores)) if scores else 0.0




def bundle_patients(data_dir: Path, n: int, kg: Any) -> list[Any]:
    """(labs, notes, patient, gold SNOMED codes) of the first `n` bundles with labs or notes.

    The gold codes are the patient's recorded Conditions that are in the graph's disorder set
    (Synthea's own coding): enough to put a number on what int8 costs, not a clinical test set.
    """
    from clinragen_fhir.knowledge.bundle import inputs_from_bundle, read_bundle, resources

    disorders = {d.snomed for d in kg.disorders().values()}
    out = []
    for path in sorted(data_dir.rglob("*.json.gz")):
        if path.name.startswith(("hospitalInformation", "practitionerInformation")):
            continue
        bundle = read_bundle(path)
        inputs = inputs_from_bundle(bundle, kg)
        if inputs.labs.empty and not inputs.notes:
            continue
        gold = {c.get("code", "") for r in resources(bundle, "Condition")
                for c in (r.get("code") or {}).get("coding", [])} & disorders
        out.append((inputs.labs, inputs.notes, inputs.patient, gold))
        if len(out) >= n:
            break
    return out
