"""Training configuration: one TOML file per run (`training/configs/*.toml`).

Everything that changes a result lives in the file (seed, budgets, steps, learning rates), so a run
is reproduced from its config alone; the config is copied into the run directory.
"""

from __future__ import annotations

import tomllib
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from clinragen_fhir.encoding.features import Budgets, Modalities

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
STAGES: tuple[str, ...] = ("notes", "labs", "multimodal", "diagnosis")


@dataclass(frozen=True)
class StageConfig:
    """One distillation stage: how many optimiser steps, and (stage 4) the head-only passes."""

    steps: int = 0
    lr: float = 1e-3  # prefix builder (trained fully)
    lora_lr: float = 3e-4  # LoRA adapters
    head_steps: int = 0  # stage 4: cheap prefix-only BCE steps before the joint ones
    # stage 4: head-only steps after the joint ones, on the final fused tokens (cached: the head
    # is all that trains), so the head is fitted to the trunk the released model has
    refit_steps: int = 0


@dataclass(frozen=True)
class VariantConfig:
    """An SLM variant in the comparison table (ablations switch knowledge or staging off)."""

    name: str
    knowledge: bool = True
    staged: bool = True  # False: only stage 4, given the LM steps of all four stages (joint)


@dataclass
class TrainConfig:
    name: str = "default"
    seed: int = 7
    backbone: str = "smollm2"  # "smollm2" (the converted default), "tiny", or a model directory
    tiny_hidden: int = 64
    tiny_layers: int = 2
    tiny_vocab: int = 4000  # words kept for the tiny word-level tokenizer
    threads: int = 2
    batch_size: int = 4
    head_batch_size: int = 0  # stage 4's head-only steps (prefix only, cheap); 0 = batch_size
    max_target_tokens: int = 48  # rationale tokens per target (the diagnosis line is added)
    max_new_tokens: int = 64  # evaluation generation
    eval_batch_size: int = 8
    warmup: float = 0.1
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    save_every: int = 25
    lora_r: int = 8
    lora_targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    eval_rationale_examples: int = 0  # > 0: rationales generated for a seeded sample per cohort
    backbone_layers: int = 0  # > 0: only the SLM's first N decoder layers (a smaller student)
    vocabulary: str = "all"  # the head's disorders: "all" graph disorders or the "revealable"
    budgets: Budgets = field(default_factory=lambda: Budgets(
        max_labs=32, max_facts=12, max_fact_tokens=16, max_note_tokens=96))
    stages: dict[str, StageConfig] = field(default_factory=lambda: {s: StageConfig(20)
                                                                    for s in STAGES})
    variants: list[VariantConfig] = field(default_factory=lambda: [
        VariantConfig("full"), VariantConfig("no_knowledge", knowledge=False),
        VariantConfig("no_staging", staged=False)])
    min_confidence: float = 0.6
    min_precision: float = 0.8  # the operating point the thresholds are tuned for
    max_codes: int = 3  # the most codes a report concludes (every system alike)
    # dataset (used by `reproduce`)
    data: dict[str, Any] = field(default_factory=dict)

    def variant(self, name: str) -> VariantConfig:
        for v in self.variants:
            if v.name == name:
                return v
        raise KeyError(f"no variant {name!r} in config {self.name!r}")

    def stage_plan(self, variant: VariantConfig) -> list[tuple[str, StageConfig]]:
        """The stages a variant runs, in order; unstaged = stage 4 with every stage's LM steps."""
        if variant.staged:
            return [(s, self.stages[s]) for s in STAGES]
        d = self.stages["diagnosis"]
        total = sum(self.stages[s].steps for s in STAGES)
        return [("diagnosis", StageConfig(total, d.lr, d.lora_lr, d.head_steps, d.refit_steps))]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def stage_modalities(stage: str, knowledge: bool) -> Modalities:
    """Stage 1 sees notes only, stage 2 labs only; 3 and 4 everything (knowledge per variant)."""
    if stage == "notes":
        return Modalities(labs=False, notes=True, knowledge=False)
    if stage == "labs":
        return Modalities(labs=True, notes=False, knowledge=False)
    return Modalities(labs=True, notes=True, knowledge=knowledge)


def _pick(cls: type, d: dict[str, Any]) -> dict[str, Any]:
    names = {f.name for f in fields(cls)}
    unknown = set(d) - names
    if unknown:
        raise ValueError(f"unknown {cls.__name__} keys: {sorted(unknown)}")
    return d


def load_config(path: str | Path) -> TrainConfig:
    """A TOML file -> TrainConfig; unknown keys are errors (a typo must not silently default)."""
    p = Path(path)
    if not p.is_file() and (CONFIG_DIR / f"{p}.toml").is_file():
        p = CONFIG_DIR / f"{p}.toml"
    return config_from_dict(tomllib.loads(p.read_text()))


def config_from_dict(raw: dict[str, Any]) -> TrainConfig:
    """The TOML's structure (or `TrainConfig.to_dict()`) -> TrainConfig, strictly."""
    cfg = TrainConfig()
    top = {k: v for k, v in raw.items() if k not in ("budgets", "stages", "variants", "data")}
    for k, v in _pick(TrainConfig, top).items():
        setattr(cfg, k, v)
    if "budgets" in raw:
        cfg.budgets = Budgets(**_pick(Budgets, {**asdict(cfg.budgets), **raw["budgets"]}))
    if "stages" in raw:
        unknown = set(raw["stages"]) - set(STAGES)
        if unknown:
            raise ValueError(f"unknown stages: {sorted(unknown)}")
        cfg.stages = {s: StageConfig(**_pick(StageConfig, raw["stages"].get(s, {})))
                      for s in STAGES}
    if "variants" in raw:
        cfg.variants = [VariantConfig(**_pick(VariantConfig, v)) for v in raw["variants"]]
    cfg.data = dict(raw.get("data", {}))
    return cfg
