"""One real patient end to end on CPU: FHIR bundle -> frame -> knowledge -> model -> text.

    python -m model.run_patient [BUNDLE.json.gz] [--new-tokens 64] [--threads 2]

Prints the parameter counts, the latency of each step, the peak RSS and the output. The model is
untrained (fresh prefix builder, zero LoRA), so the text shows the plumbing, not clinical skill.
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from datetime import UTC, datetime
from pathlib import Path

import torch

from clinragen_fhir.knowledge import load_graph
from clinragen_fhir.knowledge.bundle import inputs_from_bundle, read_bundle
from model.backbone import load_backbone
from model.clinragen import ClinRaGen

DATA = Path("/work/shared/data/synthea-exafluence-qicore")
DEFAULT_PATIENT = DATA / "california" / "0bfbd5a4-83d7-ac15-1a6f-de6ef1ca912f.json.gz"


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("bundle", nargs="?", type=Path, default=DEFAULT_PATIENT)
    parser.add_argument("--backbone", type=Path, default=None, help="default: SmolLM2-135M")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--save", type=Path, default=None, help="also save the model here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    timings: dict[str, float] = {}

    def step(name: str, started: float) -> None:
        timings[name] = round(time.perf_counter() - started, 3)

    t = time.perf_counter()
    kg = load_graph()
    inputs = inputs_from_bundle(read_bundle(args.bundle), kg, now=datetime.now(UTC))
    step("fhir_to_frame_s", t)
    t = time.perf_counter()
    slm, tokenizer = load_backbone(args.backbone)
    model = ClinRaGen.build(slm, tokenizer, kg).eval()
    step("load_model_s", t)
    total, trainable = model.parameter_counts()

    t = time.perf_counter()
    feats = model.featurise(inputs.labs, inputs.notes, inputs.patient)
    batch = model.batch([feats])
    step("knowledge_and_features_s", t)
    with torch.no_grad():
        prefix_length = int(model.prefix(**batch.tensors)[1].shape[1])
        t = time.perf_counter()
        model(batch)
        step("forward_s", t)
        t = time.perf_counter()
        texts, ids = model.generate(batch, max_new_tokens=args.new_tokens)
        step("generate_s", t)
        t = time.perf_counter()
        why = model.explain(batch, ids)[0]
        step("explain_s", t)
        t = time.perf_counter()
        prediction = model.predict(inputs.labs, inputs.notes, inputs.patient)
        step("predict_s", t)
    if args.save is not None:
        model.save(args.save)
    report = {
        "bundle": str(args.bundle), "threads": args.threads,
        "parameters_total": total, "parameters_trainable": trainable,
        "labs_in_frame": len(inputs.labs), "notes": len(inputs.notes),
        "lab_tokens": len(feats.labs), "fact_tokens": len(feats.facts),
        "note_tokens": len(feats.note_ids), "prefix_length": prefix_length,
        "generated_tokens": int(ids.shape[1]), **timings,
        "peak_rss_mib": round(peak_rss_mib(), 1),
        "gates": why.gates, "top_facts": why.facts[:3], "top_labs": why.labs[:3],
        "prediction_abstained": prediction.abstained, "abstain_reason": prediction.abstain_reason,
    }
    print(json.dumps(report, indent=1, default=str))
    print("--- generated ---")
    print(texts[0])


if __name__ == "__main__":
    main()
