"""Concluding codes from head probabilities: sex/age constraints of the graph, most specific,
the cap, per-disorder thresholds, and the generated text adding nothing (ONNX predictor, rules)."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from clinragen_fhir.encoding.features import Budgets
from clinragen_fhir.encoding.schema import Note, PatientContext
from clinragen_fhir.inference.model_config import ModelConfig
from clinragen_fhir.inference.predictor import OnnxPredictor
from clinragen_fhir.knowledge import KnowledgeGraph, load_graph
from clinragen_fhir.knowledge.validate import validate
from clinragen_fhir.predict.conclude import (
    IMPOSSIBLE,
    OVER_CAP,
    PARENT,
    conclude,
    conclude_matrix,
)
from clinragen_fhir.predict.rules import RuleBaseline
from tests.unit.test_knowledge import frame

PRE_ECLAMPSIA, ECLAMPSIA = "398254007", "198992004"
PROSTATE = "126906006"
INFECTIOUS, UTI, CYSTITIS = "40733004", "68566005", "307426000"
T2DM, HTN, OBESITY, COPD, ANEMIA = "44054006", "38341003", "414916001", "13645005", "271737000"


@pytest.fixture(scope="module")
def kg() -> KnowledgeGraph:
    return load_graph()


def run(kg: KnowledgeGraph, probs: dict[str, float], **kw: Any) -> Any:
    args: dict[str, Any] = {"threshold": 0.5, "min_confidence": 0.6, "sex": None,
                            "age_years": None, **kw}
    return conclude(list(probs.values()), list(probs), kg, **args)


# -- the graph's constraints -------------------------------------------------------------------


def test_constraints_are_loaded_and_inherited(kg: KnowledgeGraph) -> None:
    pe = kg.disorder(PRE_ECLAMPSIA)
    assert pe is not None and pe.applicable_sex == "female"
    assert (pe.min_age_years, pe.max_age_years) == (12.0, 55.0)
    assert kg.disorder(T2DM).applicable_sex is None  # type: ignore[union-attr]
    assert not kg.possible(PRE_ECLAMPSIA, "male", 30)
    assert kg.possible(PRE_ECLAMPSIA, "female", 30)
    assert not kg.possible(PRE_ECLAMPSIA, "female", 70) and not kg.possible(ECLAMPSIA, None, 8)
    assert not kg.possible(PROSTATE, "female", 60) and kg.possible(PROSTATE, "male", 60)
    assert kg.possible(T2DM, "male", 3)


def test_unknown_sex_or_age_is_possible(kg: KnowledgeGraph) -> None:
    for sex in (None, "unknown", "other"):
        assert kg.possible(PRE_ECLAMPSIA, sex, None)
        assert kg.possible(PROSTATE, sex, 40)
    assert kg.possible(PRE_ECLAMPSIA, "female", None)
    assert kg.possible(PRE_ECLAMPSIA, "female", float("nan"))
    assert kg.possible("999999999", "male", 1)  # a code the graph does not know
    c = run(kg, {PRE_ECLAMPSIA: 0.9, T2DM: 0.1}, sex=None, age_years=None)
    assert c.codes == [PRE_ECLAMPSIA]


def test_a_constraint_on_an_ancestor_binds_descendants(tmp_path: Path) -> None:
    src = Path(__file__).resolve().parents[2] / "clinragen_fhir" / "knowledge"
    for f in src.glob("*.ttl"):
        (tmp_path / f.name).write_text(f.read_text())
    # eclampsia states its own constraints too; a new child of pre-eclampsia states none
    with (tmp_path / "disorders.ttl").open("a") as fh:
        fh.write('sct:111111111 a crg:Disorder ; skos:prefLabel "Test child of pre-eclampsia" ;'
                 " rdfs:subClassOf sct:398254007 .\n")
    g = load_graph(tmp_path)
    assert not g.possible("111111111", "male", 30) and g.possible("111111111", "female", 30)
    assert not g.possible("111111111", "female", 60)


def test_most_specific_keeps_order_and_drops_ancestors(kg: KnowledgeGraph) -> None:
    assert kg.most_specific([INFECTIOUS, T2DM, CYSTITIS, UTI, T2DM]) == [T2DM, CYSTITIS]
    assert kg.most_specific([]) == []


def test_validate_catches_malformed_constraints(tmp_path: Path) -> None:
    src = Path(__file__).resolve().parents[2] / "clinragen_fhir" / "knowledge"
    for f in src.glob("*.ttl"):
        text = f.read_text()
        if f.name == "disorders.ttl":
            text = text.replace('sct:126906006 crg:applicableSex "male" .',
                                'sct:126906006 crg:applicableSex "men" .')
            text = text.replace("sct:398254007 crg:applicableSex \"female\" ; crg:minAgeYears 12.0",
                                "sct:398254007 crg:applicableSex \"female\" ; "
                                "crg:minAgeYears \"twelve\"")
            text += ('sct:198992004 crg:applicableSex "male" .\n'
                     'sct:111111111 a crg:Disorder ; skos:prefLabel "Test" ; '
                     'rdfs:subClassOf sct:398254007 ; crg:applicableSex "male" .\n'
                     "sct:44054006 crg:minAgeYears 40.0 ; crg:maxAgeYears 30.0 .\n"
                     "sct:13645005 crg:maxAgeYears -1.0 .\n")
        (tmp_path / f.name).write_text(text)
    problems = "\n".join(validate(load_graph(tmp_path)))
    assert "126906006 applicableSex 'men'" in problems
    assert "398254007 minAgeYears 'twelve'" in problems
    assert "198992004 has 2 applicableSex values" in problems
    assert "111111111: its own and its ancestors' applicableSex contradict" in problems
    assert "44054006: minAgeYears 40 > maxAgeYears 30" in problems
    assert "13645005 maxAgeYears '-1.0'" in problems
    assert validate(load_graph()) == []


# -- conclude ------------------------------------------------------------------------------------


def test_a_man_never_gets_pre_eclampsia(kg: KnowledgeGraph) -> None:
    c = run(kg, {PRE_ECLAMPSIA: 0.99, T2DM: 0.02}, sex="male", age_years=40)
    assert c.codes == [] and c.dropped == {PRE_ECLAMPSIA: IMPOSSIBLE}
    # its probability does not count for abstaining: T2DM at 0.02 is a confident "none"
    assert not c.abstained
    assert run(kg, {PRE_ECLAMPSIA: 0.99, T2DM: 0.02}, sex="female", age_years=30).codes \
        == [PRE_ECLAMPSIA]
    assert run(kg, {ECLAMPSIA: 0.99}, sex="female", age_years=70).codes == []


def test_impossible_codes_do_not_make_it_abstain(kg: KnowledgeGraph) -> None:
    probs = {PRE_ECLAMPSIA: 0.45, T2DM: 0.1}  # 0.45 is inside the band [0.4, 0.6)
    assert run(kg, probs, sex="female", age_years=30).abstained
    assert not run(kg, probs, sex="male", age_years=30).abstained


def test_only_a_report_without_codes_abstains(kg: KnowledgeGraph) -> None:
    """A code past its (precision-tuned) threshold is an answer; with none, the model abstains
    when some probability sits just under its own threshold."""
    c = run(kg, {T2DM: 0.55, PRE_ECLAMPSIA: 0.45}, sex="female", age_years=30)
    assert c.codes == [T2DM] and not c.abstained
    # measured against its own threshold: 0.75 under a 0.8 threshold is uncertain ...
    near = run(kg, {T2DM: 0.75}, thresholds={T2DM: 0.8})
    assert near.codes == [] and near.abstained
    # ... while 0.3 under 0.8 is a confident "no"
    assert not run(kg, {T2DM: 0.3}, thresholds={T2DM: 0.8}).abstained


def test_parent_and_child_above_threshold_give_the_child(kg: KnowledgeGraph) -> None:
    c = run(kg, {INFECTIOUS: 0.95, UTI: 0.7, T2DM: 0.1})
    assert c.codes == [UTI] and c.dropped == {INFECTIOUS: PARENT}
    c = run(kg, {INFECTIOUS: 0.95, UTI: 0.9, CYSTITIS: 0.8})
    assert c.codes == [CYSTITIS] and c.dropped == {INFECTIOUS: PARENT, UTI: PARENT}


def test_at_most_max_codes_highest_first(kg: KnowledgeGraph) -> None:
    probs = {T2DM: 0.7, HTN: 0.95, OBESITY: 0.8, COPD: 0.65, ANEMIA: 0.9}
    c = run(kg, probs)
    assert c.codes == [HTN, ANEMIA, OBESITY]
    assert c.dropped == {T2DM: OVER_CAP, COPD: OVER_CAP}
    assert run(kg, probs, max_codes=5).codes == [HTN, ANEMIA, OBESITY, T2DM, COPD]


def test_with_base_rates_the_cap_keeps_the_largest_lift(kg: KnowledgeGraph) -> None:
    """Hypertension at 0.95 in half of all visits says less than anaemia at 0.6 in 5 %: the cap
    keeps the lift (p / base rate), lists the kept most probable first, and names the cut."""
    probs = {T2DM: 0.7, HTN: 0.95, OBESITY: 0.8, ANEMIA: 0.6}
    rates = {T2DM: 0.25, HTN: 0.5, OBESITY: 0.6, ANEMIA: 0.05}
    c = run(kg, probs, base_rates=rates)
    # lifts: anaemia 12, T2DM 2.8, HTN 1.9, obesity 1.3
    assert c.codes == [HTN, T2DM, ANEMIA]
    assert c.dropped == {OBESITY: OVER_CAP}
    assert run(kg, probs, base_rates=rates, max_codes=1).codes == [ANEMIA]
    assert run(kg, probs).codes == [HTN, OBESITY, T2DM]  # no base rates: the most probable
    # within the cap nothing changes: the lift only chooses what the cap cuts
    assert run(kg, probs, base_rates=rates, max_codes=4).codes == [HTN, OBESITY, T2DM, ANEMIA]


def test_a_disorder_no_training_visit_had_is_ranked_not_divided_by_zero(
        kg: KnowledgeGraph) -> None:
    probs = {T2DM: 0.9, HTN: 0.95}
    c = run(kg, probs, base_rates={T2DM: 0.0, HTN: 0.5}, max_codes=1)
    assert c.codes == [T2DM] and c.dropped == {HTN: OVER_CAP}
    # a code missing from the base rates is treated the same way (as never seen)
    assert run(kg, probs, base_rates={HTN: 0.5}, max_codes=1).codes == [T2DM]


def test_each_disorder_has_its_own_threshold(kg: KnowledgeGraph) -> None:
    probs = {T2DM: 0.35, HTN: 0.6, OBESITY: 0.9}
    c = run(kg, probs, thresholds={T2DM: 0.3, HTN: 0.7})
    assert c.codes == [OBESITY, T2DM]  # HTN at 0.6 misses its 0.7
    assert run(kg, probs).codes == [OBESITY, HTN]


def test_conclude_rejects_misaligned_inputs(kg: KnowledgeGraph) -> None:
    with pytest.raises(ValueError, match="2 probabilities for 1 disorders"):
        conclude([0.1, 0.2], [T2DM], kg, threshold=0.5, min_confidence=0.6, sex=None,
                 age_years=None)


def test_conclude_matrix_matches_conclude_row_by_row(kg: KnowledgeGraph) -> None:
    disorders = [PRE_ECLAMPSIA, PROSTATE, INFECTIOUS, UTI, T2DM, HTN, OBESITY, COPD]
    rng = np.random.default_rng(0)
    P = rng.random((40, len(disorders)))
    P[0] = [0.99, 0.99, 0.9, 0.8, 0.7, 0.1, 0.1, 0.1]
    sexes = (["male", "female", None, "other"] * 10)
    ages: list[float | None] = [30.0, 70.0, None, 8.0] * 10
    thresholds = {COPD: 0.3}
    rates = dict(zip(disorders, rng.random(len(disorders)), strict=True))
    out = conclude_matrix(P, disorders, kg, sexes, ages, 0.5, thresholds, max_codes=2)
    lifted = conclude_matrix(P, disorders, kg, sexes, ages, 0.5, thresholds, max_codes=2,
                             base_rates=rates)
    assert out.shape == P.shape and out.dtype == bool
    assert (out != lifted).any()  # the base rates reach the matrix form
    for i in range(len(P)):
        c = conclude(P[i], disorders, kg, threshold=0.5, thresholds=thresholds,
                     min_confidence=0.6, sex=sexes[i], age_years=ages[i], max_codes=2)
        assert {d for d, k in zip(disorders, out[i], strict=True) if k} == set(c.codes)
        c = conclude(P[i], disorders, kg, threshold=0.5, thresholds=thresholds,
                     min_confidence=0.6, sex=sexes[i], age_years=ages[i], max_codes=2,
                     base_rates=rates)
        assert {d for d, k in zip(disorders, lifted[i], strict=True) if k} == set(c.codes)
    assert out[0].tolist() == [False, True, False, True, False, False, False, False]
    with pytest.raises(ValueError):
        conclude_matrix(P[:, :3], disorders, kg, sexes, ages, 0.5)


# -- the predictors use it -----------------------------------------------------------------------


def _onnx_predictor(kg: KnowledgeGraph, disorders: list[str], **cfg: Any) -> OnnxPredictor:
    config = ModelConfig(["4548-4"], disorders, [kg.disorder(d).term  # type: ignore[union-attr]
                                                   for d in disorders], kg.version, Budgets(),
                           1.0, 0.5, 0.6, 16, "1", **cfg)
    return OnnxPredictor(SimpleNamespace(config=config), kg)  # type: ignore[arg-type]


def _prediction(pred: OnnxPredictor, text: str, probs: list[float],
                patient: PatientContext) -> Any:
    feats = SimpleNamespace(facts=[], labs=[])
    retrieval = SimpleNamespace(disorders=[], findings=[])
    p = np.array(probs)
    return pred._prediction(text, pred._conclude(p, patient), p,
                            np.zeros((1, 1, 1)), feats, retrieval)  # type: ignore[arg-type]


def test_onnx_diagnosis_line_under_threshold_is_not_concluded(kg: KnowledgeGraph) -> None:
    pred = _onnx_predictor(kg, [T2DM, COPD])
    text = f"HbA1c 7.1 % is high.\nDiagnosis: {T2DM} Diabetes mellitus type 2; {COPD} COPD"
    p = _prediction(pred, text, [0.9, 0.0], PatientContext("p"))
    assert [d.snomed for d in p.diagnoses] == [T2DM]
    assert p.diagnoses[0].probability == pytest.approx(0.9)
    assert p.rationale == "HbA1c 7.1 % is high."


def test_onnx_predictor_uses_sex_age_thresholds_and_cap(kg: KnowledgeGraph) -> None:
    pred = _onnx_predictor(kg, [PRE_ECLAMPSIA, T2DM, HTN, OBESITY], thresholds={HTN: 0.95},
                           max_codes=1)
    man = PatientContext("p", sex="male", birth_date=datetime(1980, 1, 1, tzinfo=UTC),
                         index_time=datetime(2024, 3, 3, tzinfo=UTC))
    p = _prediction(pred, "Diagnosis: none", [0.99, 0.8, 0.9, 0.7], man)
    assert [d.snomed for d in p.diagnoses] == [T2DM] and not p.abstained


def test_runtime_config_reads_thresholds_and_cap_with_defaults(tmp_path: Path) -> None:
    d = {"loinc_codes": ["4548-4"], "disorders": [T2DM], "disorder_terms": ["t2dm"],
         "budgets": {}}
    path = tmp_path / "config.json"
    path.write_text(__import__("json").dumps(d))
    cfg = ModelConfig.read(path)
    assert cfg.thresholds == {} and cfg.max_codes == 3 and cfg.base_rates == {}
    path.write_text(__import__("json").dumps({**d, "thresholds": {T2DM: 0.3}, "max_codes": 2,
                                              "base_rates": {T2DM: "0.25"}}))
    cfg = ModelConfig.read(path)
    assert cfg.thresholds == {T2DM: 0.3} and cfg.max_codes == 2
    assert cfg.base_rates == {T2DM: 0.25}


def test_onnx_predictor_keeps_the_lift_within_the_cap(kg: KnowledgeGraph) -> None:
    pred = _onnx_predictor(kg, [T2DM, HTN, ANEMIA], max_codes=2,
                           base_rates={T2DM: 0.25, HTN: 0.5, ANEMIA: 0.05})
    p = _prediction(pred, "Diagnosis: none", [0.7, 0.95, 0.6], PatientContext("p"))
    assert [d.snomed for d in p.diagnoses] == [T2DM, ANEMIA]
    assert [(w.snomed, w.probability) for w in p.withheld] == [(HTN, pytest.approx(0.95))]
    # nothing over the cap: nothing withheld
    p = _prediction(pred, "Diagnosis: none", [0.7, 0.2, 0.6], PatientContext("p"))
    assert [d.snomed for d in p.diagnoses] == [T2DM, ANEMIA] and p.withheld == []


def test_rules_drop_impossible_codes(kg: KnowledgeGraph) -> None:
    """Proteinuria plus a note naming pre-eclampsia reach the rule threshold (0.52)."""
    labs = frame([("5804-0", 100.0, "2024-03-02"), ("5804-0", 120.0, "2024-03-03")], "mg/dL")
    notes = [Note("DocumentReference/n1", "1", datetime(2024, 3, 1, tzinfo=UTC),
                  "Assessment: preeclampsia.")]
    index = datetime(2024, 3, 3, tzinfo=UTC)

    def codes(sex: str | None, born: int | None) -> set[str]:
        birth = datetime(born, 1, 1, tzinfo=UTC) if born else None
        p = RuleBaseline(kg).predict(labs, notes, PatientContext("p", sex, birth, index))
        return {d.snomed for d in p.diagnoses}

    assert PRE_ECLAMPSIA in codes("female", 1994) and PRE_ECLAMPSIA in codes(None, None)
    assert PRE_ECLAMPSIA not in codes("male", 1994)
    assert PRE_ECLAMPSIA not in codes("female", 1950)
