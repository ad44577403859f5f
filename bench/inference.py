"""PyTorch eager vs onnxruntime fp32 vs onnxruntime int8 on the same real patients, beside the
feature baselines and the memory-bandwidth limit.

    .venv/bin/python -m bench.inference [--patients 8] [--new-tokens 32] [--threads 2]
                                        [--batch 4] [--model-dir DIR] [--provider cpu]
                                        [--untrained]

Each backend runs in its own child process (so peak RSS is its own): load, one warm-up patient,
then every patient alone (batch 1, the fastest of `--repeat` runs: on a shared machine other
load only ever adds time), then the same patients `--batch` at a time. Each run is
the prefix builder + greedy decoding of exactly `--new-tokens` tokens (eos ignored, so every
backend does the same work). Featurisation (FHIR frame, knowledge retrieval, tokenising) is the
same numpy code for all three and is not timed. The table gives tokens/s and patients/s over
the summed per-patient latency, p50/p95 latency, peak RSS, the ratio to PyTorch, whether the
greedy tokens equal PyTorch's, and batched patients/s; then the int8 cost the export measured
(from the manifest).

The model: by default the trained default model, `model/default`, installed into
`.run/model/default` (the directory `make demo` uses) by `clinragen-train default-model
install` when that directory does not hold an export of the artifact's current weights. The
prefix graph's own input names are fed (the runtime reads them from the graph), so a retrained
model with another prefix input set runs unchanged. `--untrained`: an untrained ClinRaGen over
SmolLM2-135M (fresh prefix builder, zero LoRA), saved once and exported, as the first version
of this bench measured.

Beside the three backends, in the same run:
* the feature baselines a user would otherwise run, per patient on the same patients:
  logistic regression on lab features + TF-IDF (`training.baselines.FeatureClassifier`, fitted
  on the first `--baseline-train` / `--baseline-valid` examples of the built dataset
  `--baseline-data`) and the knowledge-rule baseline (`predict.rules.RuleBaseline`, retrieval
  included, as the worker runs it without a model);
* the physical limit: bytes of weights (+ KV cache) streamed per decoded token / this machine's
  memory bandwidth measured by a large numpy copy (`bench.bandwidth`).

Over 400 lines because every backend and baseline is measured by the same child-process
harness on the same patients, and the three tables (backends, baselines, limits) are its
output.
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
DEFAULT_MODEL = ROOT / ".run" / "model" / "default"  # what `make demo` installs and loads
ARTIFACT = ROOT / "model" / "default"
UNTRAINED_MODEL = Path.home() / ".cache" / "clinragen" / "untrained-smollm2"
BASELINE_DATA = ROOT / ".run" / "train" / "default" / "data"
BACKENDS = ("torch", "ort-fp32", "ort-int8")
BASELINES = ("logistic", "rules")
# the files of the artifact that make the ONNX graphs (metrics.json only describes them)
GRAPH_INPUTS = ("weights.safetensors", "calibration.json")


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


def installed_matches(model_dir: Path, artifact: Path = ARTIFACT) -> bool:
    """`model_dir` holds an ONNX export of the artifact's current weights and calibration
    (`training.release.install` stamps it with the artifact's hashes: installed-from.json)."""
    stamp, release = model_dir / "installed-from.json", artifact / "release.json"
    if not (stamp.is_file() and release.is_file()
            and (model_dir / "onnx" / "manifest.json").is_file()):
        return False
    have = json.loads(stamp.read_text()).get("artifact_sha256", {})
    want = json.loads(release.read_text()).get("sha256", {})
    return all(name in want and have.get(name) == want[name] for name in GRAPH_INPUTS)


def ensure_default_model(model_dir: Path, artifact: Path = ARTIFACT) -> None:
    """Install the trained default model into `model_dir` unless it is there already."""
    if installed_matches(model_dir, artifact):
        return
    print(f"installing {artifact} into {model_dir} (clinragen-train default-model install)",
          file=sys.stderr)
    subprocess.run([str(Path(sys.executable).with_name("clinragen-train")), "default-model",
                    "install", "--out", str(model_dir), "--artifact", str(artifact), "--force"],
                   cwd=ROOT, check=True)


def load_features(model_dir: Path, data: Path, n: int
                  ) -> tuple[list[Any], list[set[str]], list[float]]:
    """The same patients for every backend, featurised by the torch-free runtime code; with the
    seconds each patient's retrieval + featurisation took (shared by every backend, untimed in
    the table's latencies)."""
    from tokenizers import Tokenizer

    from clinragen_fhir.encoding.features import featurise, loinc_vocabulary
    from clinragen_fhir.inference.model_config import ModelConfig
    from clinragen_fhir.knowledge import load_graph, retrieve
    from model.parity import bundle_patients

    kg = load_graph()
    cfg = ModelConfig.read(model_dir / "config.json")
    tok = Tokenizer.from_file(str(model_dir / "tokenizer" / "tokenizer.json"))
    vocab = loinc_vocabulary(cfg.loinc_codes)
    feats, gold, took = [], [], []
    for labs, notes, patient, g in bundle_patients(data, n, kg):
        t = time.perf_counter()
        feats.append(featurise(labs, notes, patient, retrieve(kg, labs, notes, patient), tok,
                               vocab, cfg.budgets))
        took.append(time.perf_counter() - t)
        gold.append(g)
    return feats, gold, took


def run_baseline(kind: str, model_dir: Path, data: Path, n: int, baseline_data: Path,
                 n_train: int, n_valid: int, repeat: int = 1) -> dict[str, Any]:
    """A baseline in this process: per-patient seconds on the same patients as the backends
    (the first is the warm-up), from the encoded inputs (what each baseline does itself
    included: the rules' retrieval, the classifier's features)."""
    from itertools import islice

    from clinragen_fhir.inference.model_config import ModelConfig
    from clinragen_fhir.knowledge import load_graph
    from model.parity import bundle_patients

    kg = load_graph()
    patients = bundle_patients(data, n + 1, kg)
    fitted: dict[str, Any] = {}
    if kind == "rules":
        from clinragen_fhir.predict.rules import RuleBaseline

        rules = RuleBaseline(kg)

        def one(i: int) -> Any:
            labs, notes, patient, _ = patients[i]
            return rules.predict(labs, notes, patient)
        name = "knowledge rules (retrieval + thresholds)"
    else:
        from training.baselines import FeatureClassifier
        from training.example import Example, read_examples

        cfg = ModelConfig.read(model_dir / "config.json")
        t = time.perf_counter()
        train = list(islice(read_examples(baseline_data / "train.jsonl"), n_train))
        valid = list(islice(read_examples(baseline_data / "valid.jsonl"), n_valid))
        read_s = time.perf_counter() - t
        t = time.perf_counter()
        clf = FeatureClassifier("logistic").fit(train, valid, cfg.disorders)
        fitted = {"train_examples": len(train), "valid_examples": len(valid),
                  "read_s": read_s, "fit_s": time.perf_counter() - t,
                  "classifiers": len(clf.models), "disorders": len(cfg.disorders)}
        examples = [Example(f"bench:{p.patient_id}", "bench", p, labs, list(notes), [])
                    for labs, notes, p, _ in patients]

        def one(i: int) -> Any:
            return clf.outputs([examples[i]], kg, cfg.min_confidence, cfg.max_codes)
        name = clf.name
    one(0)
    latencies = []
    for i in range(1, len(patients)):
        best = float("inf")
        for _ in range(repeat):
            t = time.perf_counter()
            one(i)
            best = min(best, time.perf_counter() - t)
        latencies.append(best)
    return {"backend": kind, "name": name, "latencies": latencies, "fitted": fitted,
            "peak_rss_mib": peak_rss_mib(), "loadavg_after": os.getloadavg()[0]}


def run_backend(backend: str, model_dir: Path, data: Path, n: int, new_tokens: int,
                threads: int, provider: str, batch: int, repeat: int = 1) -> dict[str, Any]:
    """One backend in this process: per-patient latencies and generated ids."""
    feats, _, featurise_s = load_features(model_dir, data, n + 1)
    warm, feats = feats[0], feats[1:]
    prefix_lengths: list[int] = []
    prefix_inputs: list[str] = []
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
        # what this model's prefix graph reads, and the decoder positions each patient fills
        prefix_inputs = [i.name for i in ort_model.prefix_session.get_inputs()]
        prefix_lengths = [ort_model.prefix_length(collate([f])) for f in feats]

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
            "ids": ids, "prefix_lengths": prefix_lengths, "prefix_inputs": prefix_inputs,
            "featurise_s": featurise_s[1:],
            "peak_rss_mib": peak_rss_mib(), "torch_imported": "torch" in sys.modules,
            "loadavg_after": os.getloadavg()[0]}


def until_eos(ids: list[int], eos: int | None) -> list[int]:
    """The tokens up to and including the first eos (all of them without one)."""
    return ids[:ids.index(eos) + 1] if eos is not None and eos in ids else ids


def same_greedy(a: list[int], b: list[int], eos: int | None) -> bool:
    """The same tokens up to where either writes eos. Every backend decodes exactly the same
    number of tokens, but transformers' generate bars eos until then (min_new_tokens) where
    the runtime writes it and goes on: past the first eos the two differ by design."""
    def before_eos(ids: list[int]) -> int:
        return ids.index(eos) if eos is not None and eos in ids else len(ids)

    n = min(before_eos(a), before_eos(b))
    return a[:n] == b[:n]


def summarise(results: list[dict[str, Any]], new_tokens: int,
              eos: int | None = None) -> list[dict[str, Any]]:
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
               "same_tokens_as_torch": sum(same_greedy(a, b, eos) for a, b in
                                           zip(r["ids"], base["ids"], strict=True)),
               "tokens_to_eos": float(np.mean([len(until_eos(x, eos)) for x in r["ids"]])),
               "batched_patients_per_s": len(lat) / r["batched_s"] if r["batched_s"] else 0.0,
               "patients": len(lat), "torch_imported": r["torch_imported"],
               "loadavg_after": r["loadavg_after"]}
        rows.append(row)
    for row in rows:
        row["speedup"] = row["tokens_per_s"] / rows[0]["tokens_per_s"]
        row["decode_speedup"] = row["decode_tokens_per_s"] / rows[0]["decode_tokens_per_s"]
    return rows


PRECISION = {"torch": "fp32", "ort-fp32": "fp32", "ort-int8": "int8"}


def physical_limits(rows: list[dict[str, Any]], weight_bytes: dict[str, int],
                    decoder: dict[str, Any], positions: float,
                    bandwidth: dict[str, float]) -> list[dict[str, Any]]:
    """Per backend: bytes streamed per decoded token (the decoder's weights in its precision +
    the KV cache at `positions`), the tokens/s the measured bandwidth allows at batch 1 (the
    faster of the copy and read figures: a limit must not be beaten), and the share of it the
    measured decode tokens/s reach."""
    from bench.bandwidth import bytes_per_token, token_limit

    bw = max(bandwidth["copy_gb_s"], bandwidth["read_gb_s"])
    out = []
    for r in rows:
        precision = PRECISION.get(r["backend"], "fp32")
        per_token = bytes_per_token(weight_bytes[precision], int(decoder["n_layers"]),
                                    int(decoder["n_kv_heads"]), int(decoder["head_dim"]),
                                    positions)
        limit = token_limit(bw, per_token)
        out.append({"backend": r["backend"], "precision": precision,
                    "weight_mb": weight_bytes[precision] / 1e6, "mb_per_token": per_token / 1e6,
                    "bandwidth_gb_s": bw, "limit_tokens_per_s": limit,
                    "decode_tokens_per_s": r["decode_tokens_per_s"],
                    "share_of_limit": r["decode_tokens_per_s"] / limit})
    return out


def summarise_baselines(results: list[dict[str, Any]], torch_row: dict[str, Any] | None
                        ) -> list[dict[str, Any]]:
    rows = []
    for r in results:
        lat = np.array(r["latencies"])
        row = {"backend": r["backend"], "name": r["name"], "ms_per_patient": 1e3 * lat.mean(),
               "p95_ms": 1e3 * float(np.percentile(lat, 95)),
               "patients_per_s": len(lat) / lat.sum(), "patients": len(lat),
               "peak_rss_mib": r["peak_rss_mib"], "fitted": r["fitted"],
               "loadavg_after": r["loadavg_after"]}
        if torch_row:
            row["x_pytorch_patients_per_s"] = row["patients_per_s"] / torch_row["patients_per_s"]
        rows.append(row)
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| backend | device | tokens/s | x PyTorch | decode tokens/s | x PyTorch | "
             "first token s | patients/s | p50 s | p95 s | peak RSS MiB | greedy = PyTorch "
             "(to eos) | tokens to eos | patients/s batched |", "|" + "---|" * 14]
    for r in rows:
        lines.append(f"| {r['backend']} | {r['device']} | {r['tokens_per_s']:.1f} | "
                     f"{r['speedup']:.2f} | {r['decode_tokens_per_s']:.1f} | "
                     f"{r['decode_speedup']:.2f} | {r['first_token_s']:.2f} | "
                     f"{r['patients_per_s']:.3f} | {r['p50_s']:.2f} | {r['p95_s']:.2f} | "
                     f"{r['peak_rss_mib']:.0f} | "
                     f"{r['same_tokens_as_torch']}/{r['patients']} | "
                     f"{r['tokens_to_eos']:.1f} | {r['batched_patients_per_s']:.3f} |")
    return "\n".join(lines)


def baseline_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| baseline | ms/patient | p95 ms | patients/s | x PyTorch patients/s | "
             "peak RSS MiB |", "|" + "---|" * 6]
    for r in rows:
        x = r.get("x_pytorch_patients_per_s")
        lines.append(f"| {r['name']} | {r['ms_per_patient']:.1f} | {r['p95_ms']:.1f} | "
                     f"{r['patients_per_s']:.1f} | {f'{x:.0f}' if x else '-'} | "
                     f"{r['peak_rss_mib']:.0f} |")
    return "\n".join(lines)


def limit_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| backend | weights MB | MB streamed / token | limit tokens/s | "
             "decode tokens/s | share of limit |", "|" + "---|" * 6]
    for r in rows:
        lines.append(f"| {r['backend']} ({r['precision']}) | {r['weight_mb']:.1f} | "
                     f"{r['mb_per_token']:.1f} | {r['limit_tokens_per_s']:.0f} | "
                     f"{r['decode_tokens_per_s']:.1f} | {100 * r['share_of_limit']:.0f} % |")
    return "\n".join(lines)


def _child(args: argparse.Namespace, what: str) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "bench.inference", "--child", what, "--model-dir",
           str(args.model_dir), "--data", str(args.data), "--patients", str(args.patients),
           "--new-tokens", str(args.new_tokens), "--threads", str(args.threads),
           "--provider", args.provider, "--batch", str(args.batch), "--repeat",
           str(args.repeat), "--baseline-data", str(args.baseline_data),
           "--baseline-train", str(args.baseline_train),
           "--baseline-valid", str(args.baseline_valid)]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    out = subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, text=True, env=env)
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"{what}: done ({np.sum(result['latencies']):.1f} s)", file=sys.stderr)
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", type=Path, default=None,
                        help="an exported ClinRaGen.save dir (default: the trained default "
                             "model, installed into .run/model/default)")
    parser.add_argument("--untrained", action="store_true",
                        help="an untrained SmolLM2 ClinRaGen (saved + exported once)")
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--patients", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--provider", choices=["cpu", "cuda", "auto"], default="cpu")
    parser.add_argument("--backends", default=",".join(BACKENDS))
    parser.add_argument("--baselines", default=",".join(BASELINES),
                        help="feature baselines to time too ('' for none)")
    parser.add_argument("--baseline-data", type=Path, default=BASELINE_DATA,
                        help="a built dataset (train.jsonl, valid.jsonl) to fit them on")
    parser.add_argument("--baseline-train", type=int, default=1500)
    parser.add_argument("--baseline-valid", type=int, default=500)
    parser.add_argument("--batch", type=int, default=4, help="also time batches of this size")
    parser.add_argument("--repeat", type=int, default=3,
                        help="runs per patient, the fastest counts (a shared machine's noise)")
    parser.add_argument("--bandwidth-mib", type=int, default=1024)
    parser.add_argument("--out", type=Path, default=ROOT / ".run" / "bench" / "inference.json")
    parser.add_argument("--child", default="", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.model_dir is None:
        args.model_dir = UNTRAINED_MODEL if args.untrained else DEFAULT_MODEL
    if args.child in BASELINES:
        print(json.dumps(run_baseline(args.child, args.model_dir, args.data, args.patients,
                                      args.baseline_data, args.baseline_train,
                                      args.baseline_valid, args.repeat)))
        return
    if args.child:
        print(json.dumps(run_backend(args.child, args.model_dir, args.data, args.patients,
                                     args.new_tokens, args.threads, args.provider,
                                     args.batch, args.repeat)))
        return
    if args.untrained:
        ensure_model(args.model_dir, args.patients)
    elif args.model_dir == DEFAULT_MODEL:
        ensure_default_model(args.model_dir)
    load_before = os.getloadavg()[0]
    results = [_child(args, backend) for backend in args.backends.split(",") if backend]
    baselines = []
    for kind in (k for k in args.baselines.split(",") if k):
        if kind == "logistic" and not (args.baseline_data / "train.jsonl").is_file():
            print(f"logistic: skipped, no built dataset in {args.baseline_data} "
                  "(clinragen-train build)", file=sys.stderr)
            continue
        baselines.append(_child(args, kind))
    from bench.bandwidth import graph_weight_bytes, measure_bandwidth

    bandwidth = measure_bandwidth(args.bandwidth_mib)
    manifest = json.loads((args.model_dir / "onnx" / "manifest.json").read_text())
    rows = summarise(results, args.new_tokens, manifest["decoder"].get("eos_token_id"))
    torch_row = next((r for r in rows if r["backend"] == "torch"), None)
    base_rows = summarise_baselines(baselines, torch_row)
    onnx_dir = args.model_dir / "onnx"
    weight_bytes = {v: graph_weight_bytes(onnx_dir / manifest["variants"][v]["decoder"])
                    for v in ("fp32", "int8") if v in manifest["variants"]}
    with_prefix = next((r for r in results if r.get("prefix_lengths")), results[0])
    lengths = with_prefix.get("prefix_lengths") or [0]
    positions = float(np.mean(lengths)) + args.new_tokens / 2  # mean cached positions per step
    limits = physical_limits([r for r in rows if PRECISION.get(r["backend"], "fp32")
                              in weight_bytes], weight_bytes, manifest["decoder"], positions,
                             bandwidth)
    report = {"model_dir": str(args.model_dir), "patients": args.patients,
              "new_tokens": args.new_tokens, "threads": args.threads, "repeat": args.repeat,
              "cpu_count": os.cpu_count(), "loadavg_before": load_before, "rows": rows,
              "baselines": base_rows, "bandwidth": bandwidth, "limits": limits,
              "prefix_lengths": lengths, "prefix_inputs": with_prefix.get("prefix_inputs"),
              "ids": {r["backend"]: r["ids"] for r in results},
              "featurise_ms": 1e3 * float(np.mean(with_prefix.get("featurise_s") or [0.0])),
              "installed_from": (json.loads((args.model_dir / "installed-from.json").read_text())
                                 if (args.model_dir / "installed-from.json").is_file() else None),
              "parity": manifest.get("parity"), "int8_cost": manifest.get("int8_cost")}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    loads = ", ".join(f"{r['loadavg_after']:.1f}" for r in [*rows, *base_rows])
    print(f"model {args.model_dir}; {args.patients} patients, {args.new_tokens} new tokens "
          f"each, batch 1, fastest of {args.repeat}, {args.threads} threads; decoder positions "
          f"after the prefix and prompt {min(lengths)}-{max(lengths)}; prefix graph inputs: "
          f"{', '.join(report['prefix_inputs'] or [])}; {os.cpu_count()} CPUs, 1-min load "
          f"{load_before:.1f} before, {loads} after each child")
    print(table(rows))
    print(f"retrieval + featurisation (shared, not in the latencies above): "
          f"{report['featurise_ms']:.1f} ms/patient")
    if base_rows:
        print(baseline_table(base_rows))
        for r in base_rows:
            if r["fitted"]:
                print(f"{r['name']}: fitted on {json.dumps(r['fitted'])}")
    print(f"memory bandwidth (1 thread, {args.bandwidth_mib} MiB): copy "
          f"{bandwidth['copy_gb_s']:.1f} GB/s (read + write), read {bandwidth['read_gb_s']:.1f}"
          f" GB/s; KV cache at {positions:.0f} positions")
    print(limit_table(limits))
    if report["int8_cost"]:
        print("int8 vs fp32 (export, manifest):", json.dumps(report["int8_cost"]))
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
