"""Which model wrote a report: one hash of the released artifact, used everywhere.

The report (its `model-identity` extension and content fingerprint), the `diagnose-all`
backfill checkpoint and the audit all name the model by `model_identity`, so a retrained or
re-exported model is a new model for each of them alike. Torch-free and onnxruntime-free: the
CLI computes it without loading the model.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

RULE_BASELINE = "rule-baseline"
MANIFEST_PATH = ("onnx", "manifest.json")  # inference.manifest: ONNX_DIR / MANIFEST


def model_identity(model_dir: Path | str | None) -> str:
    """`rule-baseline` without a model, else `onnx:` + the first 16 hex digits of the sha256 of
    the export's manifest (which lists every graph's and file's sha256): a re-exported or
    retrained model counts as new. A directory without a readable manifest: `unreadable:<dir>`
    (the worker then runs the rule baseline, whose reports say `rule-baseline`)."""
    if model_dir is None:
        return RULE_BASELINE
    manifest = Path(model_dir).joinpath(*MANIFEST_PATH)
    try:
        return "onnx:" + hashlib.sha256(manifest.read_bytes()).hexdigest()[:16]
    except OSError:
        return f"unreadable:{Path(model_dir).resolve()}"
