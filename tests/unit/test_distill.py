"""Sequential distillation on a tiny in-process backbone: stage masking, warm starts, resuming
(skipped stages, continuing mid-stage to the same weights), checkpoints and loss curves."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from safetensors.torch import load_file  # noqa: E402

from clinragen_fhir.knowledge import KnowledgeGraph, load_graph  # noqa: E402
from tests.unit.train_examples import make_examples  # noqa: E402
from training.config import (  # noqa: E402
    STAGES,
    StageConfig,
    TrainConfig,
    VariantConfig,
    load_config,
    stage_modalities,
)
from training.distill import (  # noqa: E402
    batch_indices,
    build_model,
    condition_terms,
    stage_target,
    teacher_rationale,
    train_variant,
    trainable_state,
)
from training.example import Example  # noqa: E402
from training.teacher import most_specific, ordered_diagnoses  # noqa: E402


class Crash(RuntimeError):
    pass


@pytest.fixture(scope="module")
def kg() -> KnowledgeGraph:
    return load_graph()


@pytest.fixture(scope="module")
def examples() -> list[Example]:
    return make_examples(20)


def config(**stage_steps: int) -> TrainConfig:
    steps = {"notes": 3, "labs": 3, "multimodal": 4, "diagnosis": 3, **stage_steps}
    return TrainConfig(name="t", backbone="tiny", tiny_hidden=32, batch_size=4, save_every=2,
                       max_target_tokens=24, max_new_tokens=8,
                       stages={s: StageConfig(steps[s], head_steps=4 if s == "diagnosis" else 0)
                               for s in STAGES},
                       variants=[VariantConfig("full"), VariantConfig("no_staging", staged=False)])


def test_stage_modalities_mask_what_the_stage_must_not_see() -> None:
    assert stage_modalities("notes", True) == type(stage_modalities("notes", True))(
        labs=False, notes=True, knowledge=False)
    assert not stage_modalities("labs", True).notes and not stage_modalities("labs", True).knowledge
    assert stage_modalities("multimodal", True).knowledge
    assert not stage_modalities("diagnosis", False).knowledge


def test_configs_in_the_repo_load_and_typos_fail(tmp_path: Path) -> None:
    for name in ("quick", "default"):
        cfg = load_config(name)
        assert [v.name for v in cfg.variants] == ["full", "no_knowledge", "no_staging"]
        unstaged = cfg.stage_plan(cfg.variant("no_staging"))
        assert [s for s, _ in unstaged] == ["diagnosis"]
        assert unstaged[0][1].steps == sum(cfg.stages[s].steps for s in STAGES)  # same compute
    bad = tmp_path / "bad.toml"
    bad.write_text("name = 'x'\nlearning_rat = 1\n")
    with pytest.raises(ValueError, match="learning_rat"):
        load_config(bad)


def test_batches_are_a_function_of_seed_stage_and_step() -> None:
    a = [batch_indices(10, 4, 7, "notes", s) for s in range(6)]
    assert a == [batch_indices(10, 4, 7, "notes", s) for s in range(6)]
    assert a != [batch_indices(10, 4, 8, "notes", s) for s in range(6)]
    assert sorted(a[0] + a[1]) == sorted(set(a[0] + a[1]))  # no repeats within an epoch
    # two processes split one global batch without overlap
    r0, r1 = (batch_indices(10, 2, 7, "labs", 3, rank=r, world=2) for r in (0, 1))
    assert not set(r0) & set(r1) and len(r0) == len(r1) == 2


def test_stage_targets(kg: KnowledgeGraph, examples: list[Example], tmp_path: Path) -> None:
    model = build_model(config(), kg, tmp_path, examples)
    ex = next(e for e in examples if e.labels)
    target = stage_target(model, ex, "diagnosis", kg, 200)
    # the head decides: the target is the rationale alone, no diagnosis line to learn
    assert target is not None and "Diagnosis:" not in target
    assert target == teacher_rationale(ex.rationales["diagnosis"]).strip()
    # the diagnoses it explains come first, as text after the prefix
    assert condition_terms(ex, kg) == [t for _, t in ordered_diagnoses(
        kg, most_specific(kg, ex.labels))]
    lines = "A: a.\nB: b.\nC: c."
    ex.rationales["diagnosis"] = lines
    cut = stage_target(model, ex, "diagnosis", kg, len(model._ids("A: a.\nB: b.")))
    assert cut == "A: a.\nB: b."  # whole lines only
    notes = stage_target(model, ex, "notes", kg, 3)
    assert notes is not None and len(notes.split()) <= 3
    ex.rationales.pop("labs")
    assert stage_target(model, ex, "labs", kg, 10) is None  # no teacher text: no LM target


def test_each_stage_warm_starts_from_the_last(kg: KnowledgeGraph, examples: list[Example],
                                              tmp_path: Path) -> None:
    starts: dict[str, dict[str, torch.Tensor]] = {}
    cfg = config()
    train_variant(cfg, cfg.variants[0], examples, kg, tmp_path, progress=False,
                  on_stage_start=lambda s, m: starts.__setitem__(s, trainable_state(m)))
    vdir = tmp_path / "full"
    for prev, stage in itertools.pairwise(STAGES):
        saved = load_file(str(vdir / prev / "weights.safetensors"))
        assert saved.keys() == starts[stage].keys()
        assert all(torch.equal(saved[k], starts[stage][k]) for k in saved)
    # and training moved the weights within a stage
    first = load_file(str(vdir / "notes" / "weights.safetensors"))
    assert any(not torch.equal(first[k], starts["notes"][k]) for k in first)
    for stage in STAGES:
        info = json.loads((vdir / stage / "done.json").read_text())
        assert info["steps"] == cfg.stages[stage].steps + (4 if stage == "diagnosis" else 0)
        assert not (vdir / stage / "checkpoint.pt").exists()
    final = json.loads((vdir / "final.json").read_text())
    assert 0.05 <= final["temperature"] <= 20 and 0 < final["threshold"] < 1
    # the conclusion rule's base rates: each head disorder's share of the training visits
    train = [e for e in examples if e.split == "train"]
    model = build_model(cfg, kg, tmp_path, examples)
    assert set(final["base_rates"]) == set(model.config.disorders)
    for code, rate in final["base_rates"].items():
        assert rate == pytest.approx(sum(code in e.labels for e in train) / len(train))
    assert any(r > 0 for r in final["base_rates"].values())
    # a run calibrated before base rates gets them on its next `train`, nothing else changes
    (vdir / "final.json").write_text(json.dumps({k: v for k, v in final.items()
                                                 if k != "base_rates"}))
    train_variant(cfg, cfg.variants[0], examples, kg, tmp_path, progress=False)
    assert json.loads((vdir / "final.json").read_text()) == final
    assert (vdir / "losses.png").stat().st_size > 1000
    losses = [json.loads(x) for x in (vdir / "losses.jsonl").read_text().splitlines()]
    assert [r["stage"] for r in losses] == [s for s in STAGES for _ in
                                            range(json.loads((vdir / s / "done.json")
                                                             .read_text())["steps"])]


@pytest.mark.slow
def test_resume_skips_finished_stages_and_continues_mid_stage_exactly(
        kg: KnowledgeGraph, examples: list[Example], tmp_path: Path) -> None:
    cfg = config()
    variant = cfg.variants[0]
    straight = tmp_path / "straight"
    train_variant(cfg, variant, examples, kg, straight, progress=False)

    crashed = tmp_path / "crashed"

    def crash_at_step_3(stage: str, step: int) -> None:
        if stage == "multimodal" and step == 3:
            raise Crash

    with pytest.raises(Crash):
        train_variant(cfg, variant, examples, kg, crashed, progress=False,
                      on_step=crash_at_step_3)
    ckpt = torch.load(crashed / "full" / "multimodal" / "checkpoint.pt", weights_only=False)
    assert ckpt["step"] == 2  # save_every=2: the last checkpoint before the crash

    started: list[str] = []
    steps: list[tuple[str, int]] = []
    result = train_variant(cfg, variant, examples, kg, crashed, progress=False,
                           on_stage_start=lambda s, m: started.append(s),
                           on_step=lambda s, k: steps.append((s, k)))
    assert started == ["multimodal", "diagnosis"]  # notes and labs were finished: skipped
    assert [s.skipped for s in result.stages] == [True, True, False, False]
    assert [k for s, k in steps if s == "multimodal"] == [3, 4]  # continued from step 2
    for stage in STAGES:
        a = load_file(str(straight / "full" / stage / "weights.safetensors"))
        b = load_file(str(crashed / "full" / stage / "weights.safetensors"))
        assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a), stage
    # a finished variant is all skips (and keeps its calibration)
    again = train_variant(cfg, variant, examples, kg, crashed, progress=False,
                          on_stage_start=lambda s, m: started.append(s))
    assert all(s.skipped for s in again.stages) and started == ["multimodal", "diagnosis"]
    assert again.temperature == result.temperature


def test_unstaged_variant_runs_only_stage_four_with_all_the_steps(
        kg: KnowledgeGraph, examples: list[Example], tmp_path: Path) -> None:
    cfg = config()
    r = train_variant(cfg, cfg.variants[1], examples, kg, tmp_path, progress=False)
    assert [s.stage for s in r.stages] == ["diagnosis"]
    assert r.stages[0].steps == 3 + 3 + 4 + 3 + 4
    assert not (tmp_path / "no_staging" / "notes").exists()


def test_the_refit_trains_the_head_alone_on_the_final_fused_tokens(
        kg: KnowledgeGraph, examples: list[Example], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Stage 4 ends with head-only steps on cached fused tokens: the record summary and the head
    move, nothing the decoder's prefix is made of does, and the cached logits are the prefix's."""
    import dataclasses

    from training.distill import HEAD_ONLY_MODULES, cached_head_logits, encode, fused_tokens

    base = config()
    cfg = dataclasses.replace(
        base, budgets=dataclasses.replace(base.budgets, max_tests=8),
        stages={**base.stages, "diagnosis": StageConfig(3, head_steps=2, refit_steps=3)})
    variant = cfg.variants[0]
    seen: dict[str, dict[str, torch.Tensor]] = {}

    def keep(stage: str, step: int) -> None:
        if stage == "diagnosis" and step == 5:  # the last joint step: the refit starts here
            seen["joint"] = {k: v.clone() for k, v in trainable_state(model).items()}

    model = build_model(cfg, kg, tmp_path, examples)
    # the test watches the very model trained
    monkeypatch.setattr("training.distill.build_model", lambda *a, **k: model)
    train_variant(cfg, variant, examples, kg, tmp_path, on_step=keep, progress=False)
    after = trainable_state(model)
    head = ("prefix.head.", *HEAD_ONLY_MODULES)
    assert json.loads((tmp_path / "full" / "diagnosis" / "done.json").read_text())["steps"] == 8
    moved = [k for k in after if not torch.equal(after[k], seen["joint"][k])]
    assert moved and all(k.startswith(head) for k in moved)  # only the head refits
    assert any(k.startswith("prefix.tests.") for k in moved)  # the record summary is trained
    train = [e for e in examples if e.split == "train"][:4]
    data = encode(model, train, stage_modalities("diagnosis", True), None, kg, 24)
    cache = fused_tokens(model, data, 2)
    with torch.no_grad():
        want = model.prefix(**model.batch([e.features for e in data]).tensors)[3]
        got = cached_head_logits(model, cache, list(range(len(data))),
                                 model.batch([e.features for e in data]))
    assert torch.allclose(got, want, atol=1e-2)  # half-precision cache
