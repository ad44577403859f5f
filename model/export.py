"""Export a saved ClinRaGen directory to ONNX for the torch-free runtime, and prove parity.

    python -m model.export MODEL_DIR [--int8] [--patients 32] [--new-tokens 8] [--data DIR]

Reads the directory `ClinRaGen.save` wrote and adds `MODEL_DIR/onnx/`:

* `prefix.onnx`: the `PrefixBuilder` (lab encoder, fact encoder, gated knowledge attention,
  diagnosis head, prompt pieces), torch.onnx, dynamic batch and lengths;
* `decoder.onnx`: the SLM with the LoRA merged in, one step with a KV cache, fed
  `inputs_embeds` (dynamic batch, new-token and past lengths; logits of the last position only);
* `embeddings.npy`: the SLM's token embeddings, for generated tokens (memory-mapped at run time);
* `int8/` (with `--int8`): the decoder after `onnxruntime.quantization.quantize_dynamic`. The
  int8 variant keeps the fp32 prefix graph: the diagnosis head lives there, so int8 cannot move
  a probability or a conclusion, only the rationale's wording (issue 17: quantise where it does
  not hurt; the decoder is 90 % of the weights streamed per token, the prefix mostly a Gather);
* `manifest.json`: versions, opset, limits, shapes, sha256 of every file and of the model's
  config and tokenizer, and the parity (and int8 agreement) figures.

Why the decoder is not optimum's: optimum-onnx 0.1.0 exports text decoders
(`text-generation-with-past`) with `input_ids` as the only token input, while ClinRaGen feeds the
SLM `inputs_embeds` from the prefix builder (lab and fact tokens have no ids). `DecoderStep`
re-expresses the Llama-family forward with the SLM's own modules and an explicit mask, which the
TorchScript exporter traces without transformers' cache and mask machinery.

After every export the parity check runs the runtime (`clinragen_fhir.inference`) against
PyTorch on >= 32 patients: max |logit difference| < 1e-3 on the diagnosis head and on every
decoding step, identical greedy tokens. It raises `ParityError` otherwise, and the manifest is
only written after it passed.

Over 400 lines because export and parity belong together: each graph is exported, then run
against the torch model; its `# ---` sections (the decoder step, export, parity, int8 cost,
the whole export), so a graph that does not match never ships.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from torch import Tensor, nn

from clinragen_fhir.encoding.features import Features, collate
from clinragen_fhir.inference.manifest import (
    FORMAT,
    FORMAT_VERSION,
    MANIFEST,
    MODEL_FILES,
    ONNX_DIR,
    file_entry,
)
from model.clinragen import ClinRaGen
from model.parity import bundle_patients, macro_f1

log = logging.getLogger(__name__)
OPSET = 17
PARITY_ATOL = 1e-3
MIN_PARITY_PATIENTS = 32
# the graphs the int8 variant quantises: the decoder; the prefix graph (the diagnosis head)
# stays fp32 and is shared, so int8 changes no probability (module docstring)
INT8_GRAPHS = ("decoder",)
PREFIX_OUTPUTS = ["inputs_embeds", "attention_mask", "knowledge_attention", "diagnosis_logits"]


class ExportError(RuntimeError):
    """The model cannot be exported as it is (unsupported backbone, bad directory)."""


class ParityError(RuntimeError):
    """ONNX and PyTorch disagree beyond the tolerance: the export must not be used."""


# ---------------------------------------------------------------------------------------------
# the decoder step


def _rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], -1)


class DecoderStep(nn.Module):
    """A Llama-family decoder (Llama, SmolLM2, Qwen2, Mistral) as one traceable step.

    inputs_embeds [B,T,D], attention_mask [B,S] (S = past + T; 0 = padding slot inside the
    prefix), position_ids [B,T], past keys/values per layer [B,KVH,S-T,hd] ->
    logits of the last position [B,V], present keys/values [B,KVH,S,hd]. The mask is causal
    over absolute positions and hides padding keys, as transformers' sdpa path does.
    """

    def __init__(self, lm: Any) -> None:
        super().__init__()
        cfg = lm.config
        rope = getattr(cfg, "rope_scaling", None) or {}
        if rope.get("rope_type", rope.get("type", "default")) not in ("default", "linear",
                                                                         "llama3"):
            raise ExportError(f"rope scaling {rope} changes with the sequence length; "
                              "DecoderStep supports static rope only")
        inner = lm.model
        self.layers = inner.layers
        self.norm = inner.norm
        self.lm_head = lm.lm_head
        for layer in self.layers:
            if hasattr(layer.self_attn, "q_norm") or getattr(layer, "attention_type",
                                                              "full_attention") != \
                    "full_attention":
                raise ExportError(f"{type(lm).__name__}: per-head norms or sliding attention "
                                  "are not supported by DecoderStep")
        self.inv_freq: Tensor
        self.register_buffer("inv_freq", inner.rotary_emb.inv_freq.detach().clone(),
                             persistent=False)
        self.rope_scale = float(getattr(inner.rotary_emb, "attention_scaling", 1.0))
        self.n_heads = int(cfg.num_attention_heads)
        self.n_kv = int(getattr(cfg, "num_key_value_heads", None) or self.n_heads)
        self.head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // self.n_heads)

    def forward(self, inputs_embeds: Tensor, attention_mask: Tensor, position_ids: Tensor,
                *past: Tensor) -> tuple[Tensor, ...]:
        b, t, _ = inputs_embeds.shape
        s = attention_mask.shape[1]
        h, kvh, hd = self.n_heads, self.n_kv, self.head_dim
        freqs = position_ids.unsqueeze(-1).float() * self.inv_freq  # [B,T,hd/2]
        emb = torch.cat([freqs, freqs], -1)
        cos = (emb.cos() * self.rope_scale).unsqueeze(1)  # [B,1,T,hd]
        sin = (emb.sin() * self.rope_scale).unsqueeze(1)
        q_pos = torch.arange(t, device=inputs_embeds.device) + (s - t)
        k_pos = torch.arange(s, device=inputs_embeds.device)
        allowed = (k_pos.unsqueeze(0) <= q_pos.unsqueeze(1)).unsqueeze(0).unsqueeze(0) \
            & (attention_mask > 0).unsqueeze(1).unsqueeze(1)  # [B,1,T,S]
        bias = torch.where(allowed, torch.tensor(0.0), torch.tensor(torch.finfo(torch.float32).min))
        x = inputs_embeds
        presents: list[Tensor] = []
        for i, layer in enumerate(self.layers):
            attn = layer.self_attn
            y = layer.input_layernorm(x)
            q = attn.q_proj(y).view(b, t, h, hd).transpose(1, 2)
            k = attn.k_proj(y).view(b, t, kvh, hd).transpose(1, 2)
            v = attn.v_proj(y).view(b, t, kvh, hd).transpose(1, 2)
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
            k = torch.cat([past[2 * i], k], 2)
            v = torch.cat([past[2 * i + 1], v], 2)
            presents += [k, v]
            # grouped-query attention without copying K/V per query head: query heads
            # g*j .. g*j+g-1 share kv head j, so fold them into the query length
            g = h // kvh
            qg = q.reshape(b, kvh, g * t, hd)
            scores = (qg @ k.transpose(-1, -2) * (1.0 / math.sqrt(hd))).view(b, kvh, g, t, s)
            weights = torch.softmax(scores + bias.unsqueeze(1), -1).view(b, kvh, g * t, s)
            out = (weights @ v).view(b, h, t, hd)
            x = x + attn.o_proj(out.transpose(1, 2).reshape(b, t, h * hd))
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        logits = self.lm_head(self.norm(x[:, -1]))
        return (logits, *presents)


# ---------------------------------------------------------------------------------------------
# export


def _versions() -> dict[str, str]:
    out = {}
    for pkg in ("torch", "transformers", "onnx", "onnxruntime", "optimum", "optimum-onnx",
                "peft", "tokenizers", "clinragen-fhir"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = ""
    return out


def _export(module: nn.Module, args: tuple[Tensor, ...], path: Path, inputs: list[str],
            outputs: list[str], axes: dict[str, dict[int, str]], opset: int) -> None:
    import warnings

    with warnings.catch_warnings():
        # the TorchScript exporter, on purpose: shape reads become graph ops (TracerWarning)
        warnings.simplefilter("ignore")
        torch.onnx.export(module, args, str(path), input_names=inputs, output_names=outputs,
                          dynamic_axes=axes, dynamo=False, opset_version=opset,
                          do_constant_folding=True)


def export_prefix(model: ClinRaGen, features: Sequence[Features], path: Path,
                  opset: int = OPSET) -> None:
    batch = model.batch(list(features))
    names = model.prefix.input_names()
    _export(model.prefix, tuple(batch.tensors[k] for k in names), path, names,
            PREFIX_OUTPUTS,
            {**{k: {0: "batch"} if k == "patient_stats" else {0: "batch", 1: f"{k}_len"}
                for k in names},
             "inputs_embeds": {0: "batch", 1: "prefix"}, "attention_mask": {0: "batch",
                                                                            1: "prefix"},
             "knowledge_attention": {0: "batch", 2: "queries", 3: "facts"},
             "diagnosis_logits": {0: "batch"}}, opset)


def export_decoder(model: ClinRaGen, path: Path, opset: int = OPSET) -> DecoderStep:
    step = DecoderStep(model.base_lm()).eval()
    b, t, past = 2, 3, 4
    d = model.base_lm().config.hidden_size
    names_in = ["inputs_embeds", "attention_mask", "position_ids"]
    names_out = ["logits"]
    pasts: list[Tensor] = []
    axes: dict[str, dict[int, str]] = {
        "inputs_embeds": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "total"},
        "position_ids": {0: "batch", 1: "sequence"}, "logits": {0: "batch"}}
    for i in range(len(step.layers)):
        for kv in ("key", "value"):
            names_in.append(f"past_key_values.{i}.{kv}")
            names_out.append(f"present.{i}.{kv}")
            axes[names_in[-1]] = {0: "batch", 2: "past"}
            axes[names_out[-1]] = {0: "batch", 2: "total"}
            pasts.append(torch.randn(b, step.n_kv, past, step.head_dim))
    mask = torch.ones(b, past + t, dtype=torch.long)
    mask[1, 1] = 0
    args = (torch.randn(b, t, d), mask, torch.arange(past, past + t).repeat(b, 1), *pasts)
    with torch.no_grad():
        _export(step, args, path, names_in, names_out, axes, opset)
    return step


def quantise(src: Path, dest: Path) -> None:
    """int8 dynamic quantisation of the MatMul weights (activations quantised per call)."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    graph = onnx.load(str(src), load_external_data=False).graph
    dims = {i.name: len(i.dims) for i in graph.initializer}
    # per-channel scales need a 2-D weight: leave vector products (the head's pool) in fp32
    skip = [n.name for n in graph.node if n.op_type == "MatMul"
            and not any(dims.get(x) == 2 for x in n.input)]
    dest.parent.mkdir(parents=True, exist_ok=True)
    quantize_dynamic(str(src), str(dest), weight_type=QuantType.QInt8, per_channel=True,
                     op_types_to_quantize=["MatMul"], nodes_to_exclude=skip)


# ---------------------------------------------------------------------------------------------
# parity


@dataclass
class ParityReport:
    patients: int
    new_tokens: int
    max_logit_diff: float  # decoder logits, every step
    max_diagnosis_logit_diff: float
    max_embeds_diff: float
    greedy_tokens_identical: bool
    mismatches: list[str]
    seconds: float

    def ok(self, atol: float = PARITY_ATOL) -> bool:
        return (self.greedy_tokens_identical and self.max_logit_diff < atol
                and self.max_diagnosis_logit_diff < atol)


def torch_greedy(model: ClinRaGen, features: Sequence[Features], new_tokens: int,
                 min_new_tokens: int = 0, logits_processor: Any = None
                 ) -> tuple[Tensor, Tensor, Tensor]:
    """transformers' generate from the prefix: (new ids [B,G], raw logits [B,G,V],
    diagnosis logits [B, n_disorders]); what PyTorch eager serves."""
    from transformers import GenerationConfig

    batch = model.batch(list(features))
    with torch.no_grad():
        embeds, mask, _, diag = model.prefix(**batch.tensors)
        embeds, mask = model.with_condition(embeds, mask, None)  # as the runtime: "none"
        eos = int(model.tokenizer.eos_token_id)
        pad = int(model.tokenizer.pad_token_id if model.tokenizer.pad_token_id is not None
                  else eos)
        gc = GenerationConfig(  # type: ignore[no-untyped-call]
            do_sample=False, max_new_tokens=new_tokens, min_new_tokens=min_new_tokens,
            eos_token_id=eos, pad_token_id=pad, output_logits=True,
            return_dict_in_generate=True)
        out = model.slm.generate(inputs_embeds=embeds, attention_mask=mask.long(),
                                 generation_config=gc, logits_processor=logits_processor)
    return out.sequences, torch.stack(out.logits, 1), diag


def check_parity(model: ClinRaGen, onnx_model: Any, features: Sequence[Features],
                 new_tokens: int = 8, batch_size: int = 8,
                 atol: float = PARITY_ATOL) -> ParityReport:
    """Runtime (onnxruntime) vs PyTorch on the same patients; raises ParityError on a miss."""
    started = time.perf_counter()
    worst_logit = worst_diag = worst_embeds = 0.0
    mismatches: list[str] = []
    eos = onnx_model.manifest.decoder.eos_token_id
    for start in range(0, len(features), batch_size):
        chunk = list(features[start:start + batch_size])
        want_ids, want_logits, want_diag = torch_greedy(model, chunk, new_tokens)
        arrays = collate(chunk)
        with torch.no_grad():
            want_embeds = model.prefix(**model.batch(chunk).tensors)[0].numpy()
        got = onnx_model.generate(arrays, new_tokens, constrained=False, keep_logits=True)
        worst_diag = max(worst_diag, float(np.abs(got.prefix.diagnosis_logits
                                                  - want_diag.numpy()).max()))
        worst_embeds = max(worst_embeds, float(np.abs(got.prefix.inputs_embeds
                                                      - want_embeds).max()))
        w_ids = want_ids.numpy()
        for row in range(len(chunk)):
            a, b = _until_eos(w_ids[row], eos), _until_eos(got.ids[row], eos)
            if a != b:
                mismatches.append(f"patient {start + row}: torch {a} onnx {b}")
            steps = min(len(a), len(b))
            for k in range(steps):
                diff = float(np.abs(got.step_logits[k][row] - want_logits[row, k].numpy()).max())
                worst_logit = max(worst_logit, diff)
    report = ParityReport(len(features), new_tokens, worst_logit, worst_diag, worst_embeds,
                          not mismatches, mismatches[:5], round(time.perf_counter() - started, 1))
    if not report.ok(atol):
        tokens = "identical" if not mismatches else "differ: " + "; ".join(mismatches[:3])
        raise ParityError(f"ONNX export differs from PyTorch on {len(features)} patients: "
                          f"max |logit diff| {worst_logit:.2e}, diagnosis logits "
                          f"{worst_diag:.2e} (limit {atol:.0e}); greedy tokens {tokens}")
    return report


def _until_eos(ids: np.ndarray, eos: int) -> list[int]:
    out = []
    for t in ids.tolist():
        out.append(int(t))
        if t == eos:
            break
    return out


# ---------------------------------------------------------------------------------------------
# int8 cost


def compare_variants(reference: Any, candidate: Any, features: Sequence[Features],
                     new_tokens: int = 32, gold: Sequence[set[str]] | None = None,
                     batch_size: int = 8) -> dict[str, Any]:
    """What int8 costs against fp32 on the same patients (both through the runtime).

    * macro-F1 of each variant's decisions (`predict.conclude` on the head: per-disorder
      thresholds, most specific, the cap; no patient sex/age here) against `gold` when given;
    * agreement: macro-F1 of int8's decisions taking fp32's as the truth, the share of
      patients with identical decisions, the largest head-probability shift;
    * faithfulness: the share of patients whose generation is token-for-token the
      same, and per variant the share of concluded codes that the knowledge facts the model
      read name (a disorder it was shown evidence for, not one it made up).
    """
    cfg = reference.config
    decisions: dict[str, list[set[str]]] = {"fp32": [], "int8": []}
    texts: dict[str, list[list[int]]] = {"fp32": [], "int8": []}
    max_shift = 0.0
    for start in range(0, len(features), batch_size):
        arrays = collate(list(features[start:start + batch_size]))
        probs = {}
        for key, m in (("fp32", reference), ("int8", candidate)):
            g = m.generate(arrays, new_tokens)
            probs[key] = g.probabilities
            for row in g.probabilities:
                decisions[key].append(set(cfg.conclude_for(row, None, None, None).codes))
            texts[key] += [r.tolist() for r in g.ids]
        max_shift = max(max_shift, float(np.abs(probs["fp32"] - probs["int8"]).max()))
    out: dict[str, Any] = {
        "patients": len(features), "new_tokens": new_tokens,
        "agreement_macro_f1": macro_f1(decisions["int8"], decisions["fp32"], cfg.disorders),
        "identical_decisions": float(np.mean([a == b for a, b in zip(
            decisions["fp32"], decisions["int8"], strict=True)])),
        "max_probability_shift": max_shift,
        "identical_generations": float(np.mean([a == b for a, b in zip(
            texts["fp32"], texts["int8"], strict=True)])),
    }
    term = dict(zip(cfg.disorders, (t.lower() for t in cfg.disorder_terms), strict=True))
    for key in ("fp32", "int8"):
        hits = total = 0
        for feats, codes in zip(features, decisions[key], strict=True):
            shown = " ".join(f.text.lower() for f in feats.facts)
            total += len(codes)
            hits += sum(term[c] in shown for c in codes)
        out[f"faithfulness_{key}"] = round(hits / total, 4) if total else None
        out[f"concluded_codes_{key}"] = total
    if gold is not None:
        out["macro_f1_fp32"] = macro_f1(decisions["fp32"], gold, cfg.disorders)
        out["macro_f1_int8"] = macro_f1(decisions["int8"], gold, cfg.disorders)
        out["macro_f1_cost_points"] = 100 * (out["macro_f1_fp32"] - out["macro_f1_int8"])
    return out


# ---------------------------------------------------------------------------------------------
# the whole export


def export(model_dir: Path, features: Sequence[Features], model: ClinRaGen | None = None,
           int8: bool = False, new_tokens: int = 8, min_patients: int = MIN_PARITY_PATIENTS,
           gold: Sequence[set[str]] | None = None, opset: int = OPSET,
           batch_size: int = 8, cost_tokens: int = 32) -> dict[str, Any]:
    """Export `model_dir` (a `ClinRaGen.save` directory) to `model_dir/onnx/`, check parity on
    `features` (at least `min_patients`), optionally quantise, and write the manifest last."""
    from clinragen_fhir.inference.runtime import OnnxModel

    model_dir = Path(model_dir)
    for name in MODEL_FILES:
        if not (model_dir / name).is_file():
            raise ExportError(f"{model_dir / name} missing: not a ClinRaGen.save directory")
    if len(features) < min_patients:
        raise ExportError(f"parity needs at least {min_patients} patients, got {len(features)}")
    model = model if model is not None else ClinRaGen.load(model_dir)
    model.eval()
    out = model_dir / ONNX_DIR
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    started = time.perf_counter()
    export_prefix(model, features[:2], out / "prefix.onnx", opset)
    step = export_decoder(model, out / "decoder.onnx", opset)
    weight = cast(Tensor, model.prefix.token_embedding.weight)
    emb = weight.detach().float().numpy()
    np.save(out / "embeddings.npy", np.ascontiguousarray(emb))
    export_seconds = time.perf_counter() - started
    lm_cfg = model.base_lm().config
    cfg = model.config
    b = cfg.budgets
    files = ["prefix.onnx", "decoder.onnx"]
    variants = {"fp32": {"prefix": "prefix.onnx", "decoder": "decoder.onnx"}}
    if int8:  # the decoder only: the head's prefix graph stays fp32 (module docstring)
        for name in INT8_GRAPHS:
            quantise(out / f"{name}.onnx", out / "int8" / f"{name}.onnx")
        files += [f"int8/{name}.onnx" for name in INT8_GRAPHS]
        variants["int8"] = {role: f"int8/{role}.onnx" if role in INT8_GRAPHS else file
                            for role, file in variants["fp32"].items()}
    eos = int(model.tokenizer.eos_token_id)
    pad = model.tokenizer.pad_token_id
    manifest: dict[str, Any] = {
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "versions": _versions(), "opset": opset,
        "backbone": {"architecture": type(model.base_lm()).__name__, "name": cfg.backbone},
        "limits": {"max_labs": b.max_labs, "max_facts": b.max_facts,
                   "max_fact_tokens": b.max_fact_tokens, "max_note_tokens": b.max_note_tokens,
                   "max_note_bag": b.max_note_bag,
                   "max_positions": int(getattr(lm_cfg, "max_position_embeddings", 2048)),
                   "max_new_tokens": max(cfg.max_new_tokens, 512)},
        "decoder": {"n_layers": len(step.layers), "n_kv_heads": step.n_kv,
                    "head_dim": step.head_dim, "hidden_size": int(lm_cfg.hidden_size),
                    "vocab_size": int(emb.shape[0]), "eos_token_id": eos,
                    "pad_token_id": int(pad if pad is not None else eos)},
        "prompt_tokens": sum(model.prefix.piece_lengths().values()),
        "inputs": {"prefix": model.prefix.input_names(), "prefix_outputs": PREFIX_OUTPUTS},
        "variants": variants,
        "model_files": {n: file_entry(model_dir / n) for n in MODEL_FILES},
        "files": {n: file_entry(out / n) for n in [*files, "embeddings.npy"]},
        "export_seconds": round(export_seconds, 1),
    }
    # the runtime reads the manifest: write a provisional one, check, then the final one
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1))
    try:
        fp32 = OnnxModel(model_dir, "fp32", "cpu", verify_hashes=False)
        report = check_parity(model, fp32, features, new_tokens, batch_size)
        manifest["parity"] = asdict(report)
        if int8:
            q = OnnxModel(model_dir, "int8", "cpu", verify_hashes=False)
            manifest["int8_cost"] = compare_variants(fp32, q, features, cost_tokens, gold,
                                                     batch_size)
    except Exception:
        (out / MANIFEST).unlink(missing_ok=True)  # no manifest: the runtime refuses the dir
        raise
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return manifest


def measure_int8_cost(model_dir: Path, patients: Sequence[Any], kg: Any, new_tokens: int,
                      batch_size: int = 8) -> dict[str, Any]:
    """int8 vs fp32 of an existing export on real patients; recorded in the manifest."""
    from clinragen_fhir.inference.manifest import read_manifest
    from clinragen_fhir.inference.predictor import OnnxPredictor

    fp32 = OnnxPredictor.load(model_dir, kg, "fp32", "cpu")
    q = OnnxPredictor.load(model_dir, kg, "int8", "cpu")
    feats = [fp32.featurise(labs, notes, patient)[0] for labs, notes, patient, _ in patients]
    cost = compare_variants(fp32.model, q.model, feats, new_tokens,
                            [g for *_, g in patients], batch_size)
    path = read_manifest(model_dir, verify_hashes=False).path
    data = json.loads(path.read_text())
    data["int8_cost"] = cost
    path.write_text(json.dumps(data, indent=1))
    return cost


def main(argv: list[str] | None = None) -> None:
    from clinragen_fhir.knowledge import load_graph

    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_dir", type=Path, help="a ClinRaGen.save directory")
    parser.add_argument("--int8", action="store_true", help="also write int8 graphs")
    parser.add_argument("--patients", type=int, default=MIN_PARITY_PATIENTS)
    parser.add_argument("--new-tokens", type=int, default=8, help="greedy tokens compared")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--cost-tokens", type=int, default=32,
                        help="tokens generated per patient when measuring the int8 cost")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--data", type=Path,
                        default=Path(__file__).resolve().parents[2] / "shared" / "data"
                        / "synthea-exafluence-qicore")
    parser.add_argument("--cost-only", action="store_true",
                        help="re-measure the int8 cost of an existing export (no re-export)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")  # quantiser chatter off
    logging.getLogger("clinragen_fhir").setLevel(logging.INFO)
    if args.threads:
        torch.set_num_threads(args.threads)
    kg = load_graph()
    patients = bundle_patients(args.data, args.patients, kg)
    if args.cost_only:
        print(json.dumps(measure_int8_cost(args.model_dir, patients, kg, args.cost_tokens,
                                           args.batch_size), indent=1))
        return
    model = ClinRaGen.load(args.model_dir, kg)
    feats = [model.featurise(labs, notes, patient) for labs, notes, patient, _ in patients]
    manifest = export(args.model_dir, feats, model, args.int8, args.new_tokens,
                      gold=[g for *_, g in patients], batch_size=args.batch_size,
                      cost_tokens=args.cost_tokens)
    json.dump({k: manifest[k] for k in ("parity", "int8_cost", "files", "export_seconds")
               if k in manifest}, sys.stdout, indent=1)
    print()


if __name__ == "__main__":
    main()
