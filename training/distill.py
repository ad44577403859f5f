"""Sequential rationale distillation (ClinRaGen): four stages, each warm-starting from the last.

    stage 1 "notes"       rationale from the notes alone (labs and knowledge masked)
    stage 2 "labs"        rationale from the lab time series alone (notes and knowledge masked)
    stage 3 "multimodal"  rationale from labs + notes, knowledge-augmented attention on
    stage 4 "diagnosis"   rationale ending in the diagnosis line (LM loss) + the head's BCE;
                          then temperature scaling and the decision threshold on the valid split

The modalities are switched with `encoding.features.Modalities`, so the network is the same in every
stage; the teacher's per-stage rationales (`Example.rationales[stage]`) are the targets.

A plain torch loop that goes through `accelerate` (device placement, DDP wrapping, backward,
gradient reduction), so `accelerate launch` / `torchrun` run it unchanged on several devices.
Batches are a pure function of (seed, stage, step), and checkpoints keep the optimiser, scheduler
and RNG state, so a resumed run continues exactly where it stopped; a finished stage is skipped.

Run layout (`<run>/<variant>/`): `<stage>/checkpoint.pt` while training, then
`<stage>/weights.safetensors` + `<stage>/done.json`; `final.json` (temperature, threshold),
`losses.jsonl`, `losses.png`.

Over 400 lines because the stages share one training loop and one encoding of the examples:
its `# ---` sections (the model, the data, the training: loop, head refit, a variant's four
stages and its calibration) are the split lines if it grows.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from tqdm.auto import tqdm

from clinragen_fhir.encoding.features import CORE_BATCH_KEYS, Features, Modalities
from clinragen_fhir.encoding.prompt import condition_text
from clinragen_fhir.knowledge import KnowledgeGraph
from clinragen_fhir.predict.diagnosis_line import format_target, split_output
from model.clinragen import ClinRaGen, LoraSettings
from training.config import STAGES, StageConfig, TrainConfig, VariantConfig, stage_modalities
from training.example import Example, label_matrix
from training.metrics import base_rates
from training.teacher import most_specific, ordered_diagnoses
from training.vocabulary import revealable_disorders

log = logging.getLogger(__name__)

StageHook = Callable[[str, ClinRaGen], None]
StepHook = Callable[[str, int], None]


# ---------------------------------------------------------------------------------------------
# the model


def tiny_words(examples: Sequence[Example], kg: KnowledgeGraph, limit: int) -> list[str]:
    """Vocabulary of the in-process tiny backbone: prompt, graph and the training texts' words."""
    from model.clinragen import Prompt

    counts: Counter[str] = Counter()
    for ex in examples:
        if ex.split != "train":
            continue
        for text in [*ex.rationales.values(), *(n.text for n in ex.notes)]:
            counts.update(text.split())
        counts.update(diagnosis_line_words(ex, kg))
    fixed: list[str] = []
    prompt = Prompt()
    for text in (prompt.pre, prompt.lab_header, prompt.fact_header, prompt.note_header,
                 prompt.post):
        fixed += text.split()
    for code, lab in kg.labs().items():
        fixed += [code, *lab.name.split()]
    for d in kg.disorders().values():
        fixed += [d.snomed, *d.term.split()]
    fixed += ["Diagnosis:", "none", "supports", "opposes", "observed", "as", "mentions", "on"]
    fixed += condition_text(["none"]).split()
    common = [w for w, _ in counts.most_common(limit)]
    return list(dict.fromkeys([*fixed, *common]))


def diagnosis_line_words(ex: Example, kg: KnowledgeGraph) -> list[str]:
    return format_target("", diagnoses(ex, kg)).split()


def diagnoses(ex: Example, kg: KnowledgeGraph) -> list[tuple[str, str]]:
    out = []
    for code in ex.labels:
        d = kg.disorder(code)
        if d is not None:
            out.append((code, d.term))
    return out


def build_model(cfg: TrainConfig, kg: KnowledgeGraph, run_dir: Path,
                examples: Sequence[Example] | None = None) -> ClinRaGen:
    """A fresh ClinRaGen for the config, seeded; the tiny backbone's vocabulary is stored in the
    run directory so evaluation rebuilds the identical network."""
    from model.backbone import load_backbone, tiny_backbone

    torch.manual_seed(cfg.seed)
    slm: Any
    tok: Any
    if cfg.backbone == "tiny":
        vocab_file = run_dir / "tiny_vocab.json"
        if vocab_file.is_file():
            words = json.loads(vocab_file.read_text())
        else:
            if examples is None:
                raise ValueError("the tiny backbone needs the examples (or a stored vocabulary)")
            words = tiny_words(examples, kg, cfg.tiny_vocab)
            run_dir.mkdir(parents=True, exist_ok=True)
            vocab_file.write_text(json.dumps(words))
        slm, tok = tiny_backbone(words, seed=cfg.seed, hidden=cfg.tiny_hidden,
                                 layers=cfg.tiny_layers)
    else:
        slm, tok = load_backbone(None if cfg.backbone == "smollm2" else cfg.backbone,
                                 layers=cfg.backbone_layers)
    torch.manual_seed(cfg.seed)
    disorders = revealable_disorders(kg) if cfg.vocabulary == "revealable" else None
    model = ClinRaGen.build(slm, tok, kg, lora=False, disorders=disorders, budgets=cfg.budgets,
                            max_new_tokens=cfg.max_new_tokens, min_confidence=cfg.min_confidence,
                            max_codes=cfg.max_codes)
    model.config.lora = LoraSettings(r=cfg.lora_r, alpha=2 * cfg.lora_r,  # `lora=`: build's flag
                                     targets=tuple(cfg.lora_targets))
    model.add_lora()
    return model


def trainable_state(model: ClinRaGen) -> dict[str, Tensor]:
    """Every trained tensor (LoRA adapters + prefix builder); the frozen SLM is rebuilt."""
    return {n: p.detach().clone().contiguous() for n, p in model.named_parameters()
            if p.requires_grad}


# Modules only the diagnosis stage trains (the record summary reaches the head alone): a run
# resumed from stages written before they existed starts them from their seeded initial values,
# which is where a run from nothing has them at that point too (the LM stages never touch them).
HEAD_ONLY_MODULES = ("prefix.tests.", "prefix.patient.", "prefix.note_bag.")


def load_trainable(model: ClinRaGen, state: dict[str, Tensor],
                   may_lack: tuple[str, ...] = ()) -> None:
    """Copy trained tensors in; every trainable tensor must be there, except under `may_lack`."""
    params = dict(model.named_parameters())
    missing = [n for n, p in params.items() if p.requires_grad and n not in state
               and not n.startswith(may_lack)]
    unknown = [n for n in state if n not in params]
    if missing or unknown:
        raise ValueError(f"checkpoint does not fit the model: {missing[:3]=} {unknown[:3]=}")
    with torch.no_grad():
        for n, t in state.items():
            params[n].copy_(t.to(params[n].device))


# ---------------------------------------------------------------------------------------------
# data


@dataclass
class Encoded:
    """One example, featurised for one modality setting, with its target text and label row."""

    features: Features
    target: str | None  # None: the teacher gave no rationale for this stage
    labels: np.ndarray  # float32 [n_disorders]
    terms: list[str] = field(default_factory=list)  # the diagnoses the target explains


def truncate(model: ClinRaGen, text: str, max_tokens: int) -> str:
    """The first `max_tokens` tokens of a rationale: whole lines while they fit (a per-diagnosis
    rationale is never cut inside a line), else cut at a word boundary."""
    ids = model.tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) <= max_tokens:
        return text.strip()
    lines = text.strip().split("\n")
    if len(lines) > 1:
        kept: list[str] = []
        for line in lines:
            if len(model.tokenizer("\n".join([*kept, line]), add_special_tokens=False)
                   ["input_ids"]) > max_tokens:
                break
            kept.append(line)
        if kept:
            return "\n".join(kept).strip()
    cut = str(model.tokenizer.decode(ids[:max_tokens], skip_special_tokens=True))
    return (cut.rsplit(" ", 1)[0] if " " in cut else cut).strip()


def stage_target(model: ClinRaGen, ex: Example, stage: str, kg: KnowledgeGraph,
                 max_tokens: int) -> str | None:
    """Stages 1-3: the teacher's stage rationale; stage 4: its diagnosis rationale + the line."""
    rationale = teacher_rationale(ex.rationales.get(stage, ""))  # no diagnosis line: the head
    return truncate(model, rationale, max_tokens) if rationale.strip() else None  # decides


def condition_terms(ex: Example, kg: KnowledgeGraph) -> list[str]:
    """The terms of the most specific labels: what the rationale is written for."""
    return [t for _, t in ordered_diagnoses(kg, most_specific(kg, ex.labels))]


def teacher_rationale(text: str) -> str:
    """The rationale without a trailing diagnosis line (what BLEU/ROUGE compare)."""
    return split_output(text)[0] if text else ""


# Features depend on the example, the modalities, the tokenizer and the budgets only: variants of
# one run share them (the knowledge retrieval is the slow part).
_FEATURES: dict[tuple[str, Modalities, int, str], Features] = {}


def encode(model: ClinRaGen, examples: Sequence[Example], modalities: Modalities,
           stage: str | None, kg: KnowledgeGraph, max_tokens: int,
           desc: str = "featurise") -> list[Encoded]:
    y = label_matrix(examples, model.config.disorders, dtype=np.float32)
    out = []
    key = (len(model.tokenizer), repr(model.config.budgets) + kg.version)
    if len(_FEATURES) > 50_000:
        _FEATURES.clear()
    for i, ex in enumerate(tqdm(examples, desc=desc, leave=False, disable=len(examples) < 50)):
        k = (ex.example_id, modalities, *key)
        feats = _FEATURES.get(k)
        if feats is None:
            feats = _FEATURES[k] = model.featurise(ex.labs, ex.notes, ex.patient, modalities)
        target = stage_target(model, ex, stage, kg, max_tokens) if stage else None
        out.append(Encoded(feats, target, y[i], condition_terms(ex, kg)))
    return out


def batch_indices(n: int, batch_size: int, seed: int, stage: str, step: int,
                  rank: int = 0, world: int = 1) -> list[int]:
    """The examples of one step: a pure function of (seed, stage, step), so resuming at step k
    sees the batches an uninterrupted run would; each process takes its share of the batch."""
    per_epoch = max(1, n // (batch_size * world))
    epoch, k = divmod(step, per_epoch)
    salt = STAGES.index(stage) if stage in STAGES else 9
    rng = np.random.default_rng([seed, salt, epoch])
    order = rng.permutation(n)
    glob = order[k * batch_size * world:(k + 1) * batch_size * world]
    if len(glob) == 0:
        glob = order[:batch_size * world]
    return [int(i) for i in glob[rank::world]]


# ---------------------------------------------------------------------------------------------
# training


@dataclass
class StageResult:
    stage: str
    steps: int
    seconds: float
    skipped: bool
    final_loss: float = float("nan")


@dataclass
class VariantResult:
    variant: str
    stages: list[StageResult] = field(default_factory=list)
    temperature: float = 1.0
    threshold: float = 0.5
    seconds: float = 0.0


def make_accelerator() -> Any:
    """One Accelerator per process; heads and LM steps leave some parameters without grads."""
    from accelerate import Accelerator, DistributedDataParallelKwargs

    return Accelerator(cpu=not torch.cuda.is_available(), kwargs_handlers=[
        DistributedDataParallelKwargs(find_unused_parameters=True)])


def _lr_lambda(total: int, warmup: float) -> Callable[[int], float]:
    w = max(1, int(total * warmup))

    def f(step: int) -> float:
        if step < w:
            return (step + 1) / w
        return max(0.05, 1.0 - (step - w) / max(1, total - w))

    return f


def _optimizer(model: ClinRaGen, sc: StageConfig, wd: float) -> torch.optim.Optimizer:
    lora = [p for n, p in model.named_parameters() if p.requires_grad and "lora_" in n]
    prefix = [p for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n]
    return torch.optim.AdamW([{"params": prefix, "lr": sc.lr},
                              {"params": lora, "lr": sc.lora_lr}], weight_decay=wd)


def _pos_weight(y: np.ndarray) -> Tensor:
    """Gentle up-weighting of rare positives (sqrt of the class ratio, capped at 10)."""
    pos = y.sum(0)
    ratio = np.where(pos > 0, (len(y) - pos) / np.maximum(pos, 1), 1.0)
    return torch.tensor(np.clip(np.sqrt(ratio), 1.0, 10.0), dtype=torch.float32)


def train_stage(model: ClinRaGen, stage: str, sc: StageConfig, data: list[Encoded],
                cfg: TrainConfig, stage_dir: Path, accelerator: Any, history: list[dict[str, Any]],
                variant: str, on_step: StepHook | None = None, progress: bool = True) -> int:
    """Train one stage from its checkpoint (if any); returns how many steps ran in this call."""
    stage_dir.mkdir(parents=True, exist_ok=True)
    lm_pool = [i for i, e in enumerate(data) if e.target is not None]
    head = stage == "diagnosis"
    joint_end = sc.steps + (sc.head_steps if head else 0)  # head phase, then the joint steps
    total = joint_end + (sc.refit_steps if head else 0)  # then the head refit
    optimizer = _optimizer(model, sc, cfg.weight_decay)
    joint, refit = _lr_lambda(joint_end, cfg.warmup), _lr_lambda(max(1, total - joint_end),
                                                                 cfg.warmup)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: joint(s) if s < joint_end else refit(s - joint_end))
    start, ckpt_file = 0, stage_dir / "checkpoint.pt"
    if ckpt_file.is_file():
        ckpt = torch.load(ckpt_file, weights_only=False)
        load_trainable(model, ckpt["trainable"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        torch.set_rng_state(ckpt["rng"])
        start = int(ckpt["step"])
        history[:] = [h for h in history if not (h["stage"] == stage and h["step"] >= start)]
        log.info("%s/%s: resuming at step %d of %d", variant, stage, start, total)
    wrapped, optimizer = accelerator.prepare(model, optimizer)
    y_all = np.stack([e.labels for e in data]) if data else np.zeros((0, 0))
    pos_weight = _pos_weight(y_all).to(accelerator.device) if head else None
    rank, world = accelerator.process_index, accelerator.num_processes
    # the head-only phases train the head on the fused tokens, computed once per phase: nothing
    # before the head changes in them (the record summary reaches the head directly), so
    # caching is exact
    cache: list[Tensor] | None = None
    wrapped.train()
    bar = tqdm(range(start, total), desc=f"{variant}/{stage}", initial=start, total=total,
               disable=not progress or not accelerator.is_main_process, leave=False)
    ran = 0
    for step in bar:
        head_only = head and (step < sc.head_steps or step >= joint_end)
        if not head_only:
            cache = None  # the joint steps change the trunk
        elif cache is None:
            cache = fused_tokens(model, data, cfg.eval_batch_size)
        pool = list(range(len(data))) if head_only else lm_pool
        if not pool:
            break
        lm: Tensor | None
        bce: Tensor | None
        size = cfg.head_batch_size or cfg.batch_size if head_only else cfg.batch_size
        idx = [pool[i] for i in batch_indices(len(pool), size, cfg.seed, stage, step,
                                              rank, world)]
        batch = model.batch([data[i].features for i in idx])
        y = torch.from_numpy(np.stack([data[i].labels for i in idx])).to(accelerator.device)
        if head_only:  # the head lives in the prefix builder: no decoder pass needed
            assert cache is not None
            logits = cached_head_logits(model, cache, idx, batch)
            bce = nn.functional.binary_cross_entropy_with_logits(logits, y, pos_weight=pos_weight)
            lm, loss = None, bce
        else:
            out = wrapped(batch, targets=[data[i].target for i in idx],
                          terms=[data[i].terms for i in idx])
            lm = out.lm_loss
            bce = nn.functional.binary_cross_entropy_with_logits(
                out.diagnosis_logits, y, pos_weight=pos_weight) if head else None
            loss = lm if bce is None else lm + bce
        optimizer.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        if head_only and world > 1:  # the prefix was called outside the DDP wrapper
            for p in model.prefix.parameters():
                if p.grad is not None:
                    p.grad.copy_(accelerator.reduce(p.grad, "mean"))
        if cfg.grad_clip > 0:
            accelerator.clip_grad_norm_([p for p in model.parameters() if p.requires_grad],
                                        cfg.grad_clip)
        optimizer.step()
        scheduler.step()
        ran += 1
        row = {"variant": variant, "stage": stage, "step": step, "loss": loss.item(),
               "lm": lm.item() if lm is not None else None,
               "bce": bce.item() if bce is not None else None}
        history.append(row)
        bar.set_postfix(loss=f"{row['loss']:.3f}")
        done = step + 1
        if accelerator.is_main_process and (done % cfg.save_every == 0 and done < total):
            torch.save({"step": done, "trainable": trainable_state(model),
                        "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                        "rng": torch.get_rng_state()}, ckpt_file)
        if on_step is not None:
            on_step(stage, done)
    bar.close()
    accelerator.free_memory()
    return ran


@torch.no_grad()
def fused_tokens(model: ClinRaGen, data: Sequence[Encoded], batch_size: int) -> list[Tensor]:
    """Per example, the fused lab, fact and note tokens the head reads (padding dropped), in
    half precision: a 12k-visit run holds about 1 GB of them."""
    was_training = model.training
    model.eval()
    out: list[Tensor] = []
    for i in range(0, len(data), batch_size):
        t = model.batch([e.features for e in data[i:i + batch_size]]).tensors
        labs, notes, facts, _ = model.prefix.fuse(*(t[k] for k in CORE_BATCH_KEYS))
        tokens = torch.cat([labs, facts, notes], 1)
        mask = torch.cat([t["lab_mask"], t["fact_mask"], t["note_mask"]], 1) > 0
        out.extend(tokens[r][mask[r]].half() for r in range(len(tokens)))
    model.train(was_training)
    return out


def cached_head_logits(model: ClinRaGen, cache: Sequence[Tensor], idx: Sequence[int],
                       batch: Any) -> Tensor:
    """The head's logits for examples `idx` from their cached fused tokens (= the prefix's)."""
    d = model.prefix.cfg.d_model
    device = batch.tensors["lab_code"].device
    n = max(1, *(len(cache[i]) for i in idx))
    tokens = torch.zeros(len(idx), n, d, device=device)
    mask = torch.zeros(len(idx), n, device=device)
    for r, i in enumerate(idx):
        tokens[r, :len(cache[i])] = cache[i].float()
        mask[r, :len(cache[i])] = 1.0
    t = batch.tensors
    return model.prefix.diagnose(tokens, mask, t["test_code"], t["test_stats"], t["test_mask"],
                                 t["patient_stats"], t["note_bag_ids"], t["note_bag_weight"],
                                 t["note_bag_mask"])


def _write_history(path: Path, history: list[dict[str, Any]]) -> None:
    path.write_text("".join(json.dumps(h) + "\n" for h in history))


def _read_history(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def train_variant(cfg: TrainConfig, variant: VariantConfig, examples: Sequence[Example],
                  kg: KnowledgeGraph, run_dir: Path, accelerator: Any | None = None,
                  on_stage_start: StageHook | None = None, on_step: StepHook | None = None,
                  progress: bool = True) -> VariantResult:
    """All stages of one variant, resuming where a previous run stopped."""
    t0 = time.perf_counter()
    torch.set_num_threads(max(1, cfg.threads))
    accelerator = accelerator or make_accelerator()
    vdir = run_dir / variant.name
    vdir.mkdir(parents=True, exist_ok=True)
    model = build_model(cfg, kg, run_dir, examples).to(accelerator.device)
    train = [e for e in examples if e.split == "train"]
    valid = [e for e in examples if e.split == "valid"]
    history = _read_history(vdir / "losses.jsonl")
    result = VariantResult(variant.name)
    plan = cfg.stage_plan(variant)
    pending: Path | None = None  # weights of the last finished stage, not yet in the model
    for i, (stage, sc) in enumerate(plan):
        sdir = vdir / stage
        done_file = sdir / "done.json"
        if done_file.is_file():
            info = json.loads(done_file.read_text())
            result.stages.append(StageResult(stage, info["steps"], info["seconds"], True,
                                             info.get("final_loss", float("nan"))))
            pending = sdir / "weights.safetensors"
            continue
        if pending is not None:  # warm start from the previous stage's weights
            load_trainable(model, load_file(str(pending)),
                           HEAD_ONLY_MODULES if stage == "diagnosis" else ())
            pending = None
        if on_stage_start is not None:
            on_stage_start(stage, model)
        ts = time.perf_counter()
        modalities = stage_modalities(stage, variant.knowledge)
        data = encode(model, train, modalities, stage, kg, cfg.max_target_tokens,
                      desc=f"{variant.name}/{stage} features")
        torch.manual_seed(cfg.seed + 101 * i)
        ran = train_stage(model, stage, sc, data, cfg, sdir, accelerator, history, variant.name,
                          on_step, progress)
        seconds = time.perf_counter() - ts
        rows = [h for h in history if h["stage"] == stage]
        final = float(np.mean([h["loss"] for h in rows[-10:]])) if rows else float("nan")
        if accelerator.is_main_process:
            save_file(trainable_state(model), str(sdir / "weights.safetensors"))
            prev = json.loads(done_file.read_text()) if done_file.is_file() else {}
            done_file.write_text(json.dumps({"steps": len(rows), "ran_now": ran,
                                             "seconds": seconds + prev.get("seconds", 0.0),
                                             "final_loss": final}))
            (sdir / "checkpoint.pt").unlink(missing_ok=True)
            _write_history(vdir / "losses.jsonl", history)
        result.stages.append(StageResult(stage, len(rows), seconds, False, final))
    if pending is not None:
        load_trainable(model, load_file(str(pending)))
    final_file = vdir / "final.json"
    rates = base_rates(label_matrix(train, model.config.disorders), model.config.disorders)
    if final_file.is_file():
        info = json.loads(final_file.read_text())
        result.temperature, result.threshold = info["temperature"], info["threshold"]
        if "base_rates" not in info and accelerator.is_main_process:
            # a run calibrated before the conclusion rule read base rates: the training split
            # gives them without touching the weights, temperature or thresholds
            final_file.write_text(json.dumps({**info, "base_rates": rates}))
    else:
        result.temperature, result.threshold = calibrate(
            model, valid, stage_modalities("diagnosis", variant.knowledge), kg, cfg)
        if accelerator.is_main_process:
            final_file.write_text(json.dumps({"temperature": result.temperature,
                                              "threshold": result.threshold,
                                              "thresholds": model.config.thresholds,
                                              "base_rates": rates,
                                              "valid_examples": len(valid)}))
    if accelerator.is_main_process:
        plot_losses(history, vdir / "losses.png", f"{cfg.name}: {variant.name}")
    result.seconds = time.perf_counter() - t0
    return result


@torch.no_grad()
def head_logits(model: ClinRaGen, data: Sequence[Encoded], batch_size: int) -> Tensor:
    model.eval()
    out = [model.prefix(**model.batch([e.features for e in data[i:i + batch_size]]).tensors)[3]
           for i in range(0, len(data), batch_size)]
    return torch.cat(out) if out else torch.zeros(0, len(model.config.disorders))


def calibrate(model: ClinRaGen, valid: Sequence[Example], modalities: Modalities,
              kg: KnowledgeGraph, cfg: TrainConfig) -> tuple[float, float]:
    """Temperature scaling, then the decision thresholds (`tune_thresholds`: a precision
    operating point, global and per disorder), both on the valid split (over the disorders that
    occur there: the never-seen ones would only teach 'always no')."""
    from training.metrics import tune_thresholds

    if not valid:
        return model.config.temperature, model.config.threshold
    data = encode(model, valid, modalities, None, kg, cfg.max_target_tokens, "valid features")
    logits = head_logits(model, data, cfg.eval_batch_size)
    y = torch.from_numpy(np.stack([e.labels for e in data]))
    cols = (y.sum(0) > 0).nonzero().flatten()
    if len(cols) == 0:
        return model.config.temperature, model.config.threshold
    temperature = model.fit_temperature(logits[:, cols], y[:, cols])
    # a head with no signal sends T to infinity (every probability 0.5); keep it in a sane range
    if not math.isfinite(temperature):
        temperature = 1.0
    temperature = model.config.temperature = float(np.clip(temperature, 0.05, 20.0))
    probs = torch.sigmoid(logits[:, cols] / temperature).numpy()
    model.config.threshold, model.config.thresholds = tune_thresholds(
        y[:, cols].numpy(), probs, [model.config.disorders[int(c)] for c in cols],
        cfg.min_precision)
    return temperature, model.config.threshold


def final_weights(cfg: TrainConfig, variant: VariantConfig, run_dir: Path) -> Path:
    """The weights a finished variant ends with: those of its last stage."""
    return run_dir / variant.name / cfg.stage_plan(variant)[-1][0] / "weights.safetensors"


def assemble(cfg: TrainConfig, kg: KnowledgeGraph, vocab_dir: Path, weights: Path,
             calibration: Path) -> ClinRaGen:
    """A trained ClinRaGen from its parts: the config's backbone (a tiny one's vocabulary in
    `vocab_dir`), the trained tensors, and a JSON file with temperature, thresholds and base
    rates."""
    model = build_model(cfg, kg, vocab_dir)
    load_trainable(model, load_file(str(weights)))
    info = json.loads(calibration.read_text())
    model.config.temperature, model.config.threshold = info["temperature"], info["threshold"]
    model.config.thresholds = {str(k): float(v) for k, v in info.get("thresholds", {}).items()}
    model.config.base_rates = {str(k): float(v) for k, v in info.get("base_rates", {}).items()}
    return model.eval()


def load_variant(cfg: TrainConfig, variant: VariantConfig, run_dir: Path,
                 kg: KnowledgeGraph) -> ClinRaGen:
    """The trained variant: the last stage's weights, temperature and threshold from final.json."""
    return assemble(cfg, kg, run_dir, final_weights(cfg, variant, run_dir),
                    run_dir / variant.name / "final.json")


def plot_losses(history: Sequence[dict[str, Any]], path: Path, title: str) -> None:
    """Loss per step over all stages (x continues across stages), one colour per stage."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    offset = 0
    for stage in STAGES:
        rows = sorted((h for h in history if h["stage"] == stage), key=lambda h: h["step"])
        if not rows:
            continue
        x = np.arange(len(rows)) + offset
        ax.plot(x, [h["loss"] for h in rows], label=f"{stage} (total)")
        if stage == "diagnosis":
            lm = [(xi, h["lm"]) for xi, h in zip(x, rows, strict=True) if h["lm"] is not None]
            if lm:
                ax.plot(*zip(*lm, strict=True), linestyle="--", label="diagnosis (LM)")
        ax.axvline(offset, color="grey", linewidth=0.5)
        offset += len(rows)
    ax.set_xlabel("optimiser step (stages in order)")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
