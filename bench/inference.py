"""PyTorch eager vs onnxruntime fp32 vs onnxruntime int8 on the same real patients.

    .venv/bin/python -m bench.inference [--patients 8] [--new-tokens 32] [--threads 2]
                                        [--batch 4] [--model-dir DIR] [--provider cpu]

Each backend runs in its own child process (so peak RSS is its own): load, one warm-up patient,
then every patient alone (batch 1, the fastest of `--repeat` runs: on a shared machine other
load only ever adds time), then the same patients `--batch` at a time. Each run is
the prefix builder + greedy decoding of exactly `--new-tokens` tokens (eos ignored, so every
backend does the same work). Featurisation (FHIR frame, knowledge retrieval, tokenising) is the
same numpy code for all three and is not timed. The table gives tokens/s and patients/s over
the summed per-patient latency, p50/p95 latency, peak RSS, the ratio to PyTorch, whether the
greedy tokens equal PyTorch's, and batched patients/s; then the int8 cost the export measured
(from the manifest).

Without `--model-dir` an untrained ClinRaGen over SmolLM2-135M (fresh prefix builder, zero LoRA)
is saved once and exported: speed does not depend on training.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "synthea-exafluence-qicore"
DEFAULT_MODEL = Path.home() / ".cache" / "clinragen" / "untrained-smollm2"
BACKENDS = ("torch", "ort-fp32", "ort-int8")


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def ensure_model(model_dir: Path, patients: int) -> None:
    """Save an untrained SmolLM2 ClinRaGen and export it (fp32 + int8), once."""
    if (model_dir / "onnx" / "manifest.json").is_file():
        return
    subprocess.run([sys.executable, "-c", f"""
import torch
from clinragen_fhir.knowledge import load_graph
from model.backbone import load_backbone
from model.clinragen import ClinRaGen
torch.manual_seed(0)
slm, tok = load_backbone()
ClinRaGen.build(slm, tok, load_graph()).eval().save({str(model_dir)!r})
"""], cwd=ROOT, check=True)
    subprocess.run([sys.executable, "-m", "model.export", str(model_dir), "--int8",
                    "--patients", str(max(patients, 32))], cwd=ROOT, check=True)


def load_features(model_dir: Path, data: Path, n: int) -> tuple[list[Any], list[set[str]]]:
    """The same patients for every backend, featurised by the torch-free runtime code."""
    from tokenizers import Tokenizer

    from clinragen_fhir.encoding.features import featurise, loinc_vocabulary
    from clinragen_fhir.inference.runtime import RuntimeConfig
    from clinragen_fhir.knowledge import load_graph, retrieve
    from model.parity import bundle_patients

    kg = load_graph()
    cfg = RuntimeConfig.read(model_dir / "config.json")
    tok = Tokenizer.from_file(str(model_dir / "tokenizer" / "tokenizer.json"))
    vocab = loinc_vocabulary(cfg.loinc_codes)
    feats, gold = [], []
    for labs, notes, patient, g in bundle_patients(data, n, kg):
        feats.append(featurise(labs, notes, patient, retrieve(kg, labs, notes, patient), tok,
                               vocab, cfg.budgets))
        gold.append(g)
    return feats, gold


def run_backend(backend: str, model_dir: Path, data: Path, n: int, new_tokens: int,
                threads: int, provider: str, batch: int, repeat: int = 1) -> dict[str, Any]:
    """One backend in this process: per-patient latencies and generated ids."""
    feats, _ = load_features(model_dir, data, n + 1)
    warm, feats = feats[0], feats[1:]
    marks: list[float] = []  # perf_counter after each decoder call (torch: each logits step)
    started = time.perf_counter()
    if backend == "torch":
        import torch
        from transformers import LogitsProcessor, LogitsProcessorList

        from model.clinragen import ClinRaGen
        from model.export import torch_greedy

        class FirstToken(LogitsProcessor):
            """Called once per step after the forward: the first call ends the prefill."""

            def __call__(self, ids: Any, scores: Any) -> Any:
                marks.append(time.perf_counter())
                return scores

        torch.set_num_threads(threads)
        model = ClinRaGen.load(model_dir)
        first = LogitsProcessorList([FirstToken()])

        def one(f: Any) -> np.ndarray:
            return many([f])

        def many(fs: list[Any]) -> np.ndarray:
            return torch_greedy(model, fs, new_tokens, new_tokens, first)[0].numpy()
        device = "cpu (torch eager)"
    else:
        from clinragen_fhir.encoding.features import collate
        from clinragen_fhir.inference.runtime import OnnxModel

        ort_model = OnnxModel(model_dir, "int8" if backend == "ort-int8" else "fp32",
                              "cuda" if provider == "cuda" else "auto" if provider == "auto"
                              else "cpu", threads)

        step = ort_model.step

        def timed_step(*a: Any) -> Any:
            out = step(*a)
            marks.append(time.perf_counter())  # the first call is the prefill
            return out

        ort_model.step = timed_step  # type: ignore[method-assign,assignment]

        def one(f: Any) -> np.ndarray:
            return many([f])

        def many(fs: list[Any]) -> np.ndarray:
            return ort_model.generate(collate(fs), new_tokens, constrained=False,
                                      stop_at_eos=False).ids
        device = ort_model.provider
    load_s = time.perf_counter() - started
    one(warm)
    latencies, ids, ttft = [], [], []
    for f in feats:
        best = (float("inf"), 0.0)
        for _ in range(repeat):  # the fastest of `repeat` runs: other load only adds time
            marks.clear()
            t = time.perf_counter()
            out = one(f)
            took = time.perf_counter() - t
            if took < best[0]:
                best = (took, marks[0] - t)  # prefix builder + prefill: time to first token
        latencies.append(best[0])
        ttft.append(best[1])
        ids.append(out[0].tolist())
    batched = 0.0
    if batch > 1:  # the same patients again, `batch` at a time (padding inside the prefix)
        t = time.perf_counter()
        for i in range(0, len(feats), batch):
            many(feats[i:i + batch])
        batched = time.perf_counter() - t
    return {"backend": backend, "device": device, "load_s": load_s, "latencies": latencies,
            "batched_s": batched, "batch": batch, "ttft": ttft,
            "ids": ids, "prefix_lengths": [len(f.lab_code) + len(f.fact_ids) + len(f.note_ids)
                                           for f in feats],
            "peak_rss_mib": peak_rss_mib(), "torch_imported": "torch" in sys.modules,
            "loadavg_after": os.getloadavg()[0]}


def summarise(results: list[dict[str, Any]], new_tokens: int) -> list[dict[str, Any]]:
    base = results[0]
    rows = []
    for r in results:
        lat = np.array(r["latencies"])
        tokens = new_tokens * len(lat)
        ttft = np.array(r["ttft"])
        row = {"backend": r["backend"], "device": r["device"],
               "tokens_per_s": tokens / lat.sum(), "patients_per_s": len(lat) / lat.sum(),
               "first_token_s": float(ttft.mean()),
               "decode_tokens_per_s": (new_tokens - 1) * len(lat) / (lat - ttft).sum(),
               "p50_s": float(np.percentile(lat, 50)), "p95_s": float(np.percentile(lat, 95)),
               "peak_rss_mib": r["peak_rss_mib"],
               "same_tokens_as_torch": sum(a == b for a, b in zip(r["ids"], base["ids"],
                                                                     strict=True)),
               "batched_patients_per_s": len(lat) / r["batched_s"] if r["batched_s"] else 0.0,
               "patients": len(lat), "torch_imported": r["torch_imported"],
               "loadavg_after": r["loadavg_after"]}
        rows.append(row)
    for row in rows:
        row["speedup"] = row["tokens_per_s"] / rows[0]["tokens_per_s"]
        row["decode_speedup"] = row["decode_tokens_per_s"] / rows[0]["decode_tokens_per_s"]
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| backend | device | tokens/s | x PyTorch | decode tokens/s | x PyTorch | "
             "first token s | patients/s | p50 s | p95 s | peak RSS MiB | greedy = PyTorch | "
             "patients/s batched |", "|" + "---|" * 13]
    for r in rows:
        lines.append(f"| {r['backend']} | {r['device']} | {r['tokens_per_s']:.1f} | "
                     f"{r['speedup']:.2f} | {r['decode_tokens_per_s']:.1f} | "
                     f"{r['decode_speedup']:.2f} | {r['first_token_s']:.2f} | "
                     f"{r['patients_per_s']:.3f} | {r['p50_s']:.2f} | {r['p95_s']:.2f} | "
                     f"{r['peak_rss_mib']:.0f} | "
                     f"{r['same_tokens_as_torch']}/{r['patients']} | "
                     f"{r['batched_patients_per_s']:.3f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--patients", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--provider", choices=["cpu", "cuda", "auto"], default="cpu")
    parser.add_argument("--backends", default=",".join(BACKENDS))
    parser.add_argument("--batch", type=int, default=4, help="also time batches of this size")
    parser.add_argument("--repeat", type=int, default=3,
                        help="runs per patient, the fastest counts (a shared machine's noise)")
    parser.add_argument("--out", type=Path, default=ROOT / ".run" / "bench" / "inference.json")
    parser.add_argument("--child", default="", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(run_backend(args.child, args.model_dir, args.data, args.patients,
                                     args.new_tokens, args.threads, args.provider,
                                     args.batch, args.repeat)))
        return
    ensure_model(args.model_dir, args.patients)
    load_before = os.getloadavg()[0]
    results = []
    for backend in args.backends.split(","):
        cmd = [sys.executable, "-m", "bench.inference", "--child", backend, "--model-dir",
               str(args.model_dir), "--data", str(args.data), "--patients", str(args.patients),
               "--new-tokens", str(args.new_tokens), "--threads", str(args.threads),
               "--provider", args.provider, "--batch", str(args.batch), "--repeat",
               str(args.repeat)]
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
        out = subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, text=True, env=env)
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(f"{backend}: done ({np.sum(results[-1]['latencies']):.1f} s)", file=sys.stderr)
    rows = summarise(results, args.new_tokens)
    manifest = json.loads((args.model_dir / "onnx" / "manifest.json").read_text())
    report = {"patients": args.patients, "new_tokens": args.new_tokens, "threads": args.threads,
              "repeat": args.repeat,
              "cpu_count": os.cpu_count(), "loadavg_before": load_before, "rows": rows,
              "prefix_lengths": results[0]["prefix_lengths"],
              "parity": manifest.get("parity"), "int8_cost": manifest.get("int8_cost")}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    loads = ", ".join(f"{r['loadavg_after']:.1f}" for r in rows)
    print(f"{args.patients} patients, {args.new_tokens} new tokens each, batch 1, "
          f"fastest of {args.repeat}, {args.threads} threads; prefix lengths "
          f"{min(report['prefix_lengths'])}-"
          f"{max(report['prefix_lengths'])} (+ prompt); {os.cpu_count()} CPUs, 1-min load "
          f"{load_before:.1f} before, {loads} after each backend")
    print(table(rows))
    if report["int8_cost"]:
        print("int8 vs fp32 (export, manifest):", json.dumps(report["int8_cost"]))
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
