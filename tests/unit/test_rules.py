"""The rule baseline: graph thresholds, cited values, abstention, nothing abnormal."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from clinragen_fhir.encoding.schema import LAB_COLUMNS, PatientContext
from clinragen_fhir.knowledge import load_graph
from clinragen_fhir.knowledge.bundle import inputs_from_bundle, read_bundle
from clinragen_fhir.predict.rules import RuleBaseline
from tests.unit.test_knowledge import frame


@pytest.fixture(scope="module")
def rules() -> RuleBaseline:
    return RuleBaseline(load_graph())


def test_abstains_without_inputs(rules: RuleBaseline) -> None:
    p = rules.predict(pd.DataFrame(columns=list(LAB_COLUMNS)), [], PatientContext("p"))
    assert p.abstained and p.abstain_reason and not p.diagnoses
    assert p.method == "knowledge-rule-baseline" and p.knowledge_version == rules.kg.version


def test_nothing_abnormal(rules: RuleBaseline) -> None:
    labs = frame([("4548-4", 5.2, "2024-03-02"), ("718-7", 14.0, "2024-03-02")])
    p = rules.predict(labs, [], PatientContext("p", sex="female"))
    assert not p.abstained and p.diagnoses == []
    assert p.rationale.startswith("No disorder supported")


def test_diabetes_rationale_cites_value_unit_date_source(rules: RuleBaseline) -> None:
    labs = frame([("4548-4", 7.1, "2024-03-02")], "%")
    p = rules.predict(labs, [], PatientContext("p", sex="female"))
    dx = {d.snomed: d for d in p.diagnoses}
    assert "44054006" in dx and "73211009" not in dx  # the more specific one is kept
    assert "was 7.1 % on 2024-03-02 (>= 6.5 %, ADA 2024)" in p.rationale
    ev = dx["44054006"].evidence[0]
    assert ev.reference == "Observation/t0" and ev.value == 7.1 and ev.unit == "%"
    assert any(k.endswith("fact/hba1c-diabetic-t2dm") for k in dx["44054006"].knowledge)
    assert p.facts_used


def test_threshold_read_from_graph(tmp_path: Path) -> None:
    src = Path(__file__).resolve().parents[2] / "clinragen_fhir" / "knowledge"
    for f in src.glob("*.ttl"):
        text = f.read_text()
        if f.name == "findings.ttl":  # move the diagnostic HbA1c threshold to 8 %
            text = text.replace('crg:direction "high" ; crg:threshold 6.5',
                                'crg:direction "high" ; crg:threshold 8.0')
        (tmp_path / f.name).write_text(text)
    labs = frame([("4548-4", 7.1, "2024-03-02")], "%")
    moved = RuleBaseline(load_graph(tmp_path)).predict(labs, [], PatientContext("p"))
    assert "44054006" not in {d.snomed for d in moved.diagnoses}


def test_rule_baseline_on_real_patient(rules: RuleBaseline, data_dir: Path) -> None:
    path = next(data_dir.rglob("196c1186-6df5-df42-99b8-a0f5cf5b5bf0.json.gz"))
    inp = inputs_from_bundle(read_bundle(path), rules.kg)
    p = rules.predict(inp.labs, inp.notes, inp.patient)
    pre = next(d for d in p.diagnoses if d.snomed == "714628002")
    hba1c = inp.labs[inp.labs.loinc == "4548-4"].sort_values("time").iloc[-1]
    cited = f"was {hba1c.value:.3g} % on {hba1c.time.date().isoformat()}"
    assert cited in p.rationale
    assert {e.reference for e in pre.evidence} >= {hba1c.observation_id}
