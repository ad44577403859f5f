"""The runtime imports and predicts with torch (and transformers) made unimportable.

A child interpreter gets a meta-path finder that raises ImportError for torch, transformers,
peft and optimum, then imports the runtime and the worker tasks and runs the ONNX predictor on a
patient. That is the production worker's situation: the runtime extra has no torch.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BLOCKER = '''
import sys
BLOCKED = ("torch", "transformers", "peft", "optimum", "safetensors.torch")
class Blocker:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED or name in BLOCKED:
            raise ImportError(f"{name} is blocked: the runtime must not need it")
        return None
sys.meta_path.insert(0, Blocker())
'''


def run_blocked(code: str) -> str:
    out = subprocess.run([sys.executable, "-c", BLOCKER + code], cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_blocker_really_blocks_torch() -> None:
    out = subprocess.run([sys.executable, "-c", BLOCKER + "import torch"], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and "torch is blocked" in out.stderr


def test_runtime_and_worker_import_without_torch() -> None:
    run_blocked("""
import clinragen_fhir.inference, clinragen_fhir.worker.tasks
import clinragen_fhir.encoding.features, clinragen_fhir.predict.diagnosis_line
assert not any(m.split('.')[0] in ('torch', 'transformers') for m in sys.modules)
""")


@pytest.mark.slow
def test_onnx_predictor_runs_without_torch() -> None:
    pytest.importorskip("torch")  # only to build and export the tiny model in this process
    from tests.unit.test_export import exported_model_dir

    model_dir = exported_model_dir()
    out = run_blocked(f"""
import json
from clinragen_fhir.inference import OnnxPredictor, build_predictor
from clinragen_fhir.knowledge import load_graph
from tests.unit.onnx_fixtures import patients
kg = load_graph()
pred = OnnxPredictor.load({str(model_dir)!r}, kg, provider="cpu", threads=1)
batch = pred.predict_batch(patients(3))
assert not any(m.split('.')[0] in ('torch', 'transformers') for m in sys.modules)
print(json.dumps([{{"method": p.method, "diagnoses": [d.snomed for d in p.diagnoses],
                   "facts": p.facts_used, "rationale": p.rationale}} for p in batch]))
""")
    results = json.loads(out.strip().splitlines()[-1])
    assert [r["method"] for r in results] == ["clinragen-onnx"] * 3
    assert all(isinstance(r["rationale"], str) for r in results)
