"""One reading, one text (issue 16, item 2): `encoding.schema.Reading` and `describe_reading`.

The released model was trained on the readings `encoding.features.reading_texts` writes and the
teacher cited ("<name> <value> <unit> on <YYYY-MM-DD>, high"), and `report.faithfulness` parses
that text back: these tests pin it byte for byte.
"""

from __future__ import annotations

from datetime import UTC, datetime

import pandas as pd

from clinragen_fhir.encoding.features import knowledge_facts, reading_texts
from clinragen_fhir.encoding.schema import Reading, describe_reading
from clinragen_fhir.knowledge import load_graph
from clinragen_fhir.knowledge.retrieval import FindingHit, Retrieval
from clinragen_fhir.predict.types import Evidence
from clinragen_fhir.report.faithfulness import LabLexicon, check_rationale
from tests.unit.train_examples import frame

T = datetime(2024, 3, 2, 9, 30, tzinfo=UTC)


def test_the_trained_reading_text_is_pinned() -> None:
    labs = frame([("4548-4", 7.14, T), ("2345-7", 1234.5, T), ("8480-6", 110.0, T),
                  ("33914-3", 45.0, T)])
    assert reading_texts(labs, {"4548-4": "HbA1c"}) == [
        ("2345-7", "Glucose [Mass/volume] in Serum or Plasma 1234 mg/dL on 2024-03-02, high"),
        ("4548-4", "HbA1c 7.14 % on 2024-03-02, high"),
        ("33914-3", "Glomerular filtration rate/1.73 sq M.predicted 45 mL/min/{1.73_m2} on "
                    "2024-03-02, low"),
        ("8480-6", "Systolic blood pressure 110 mm[Hg] on 2024-03-02, normal"),
    ]


def test_describe_reading_forms() -> None:
    assert describe_reading("HbA1c", 7.2, "%", "2024-03-01T08:00:00+00:00", "high") == \
        "HbA1c 7.2 % on 2024-03-01, high"
    assert describe_reading("HbA1c", 7.2, "%", pd.Timestamp(T)) == "HbA1c 7.2 % on 2024-03-02"
    assert describe_reading("eGFR", 45.0, "mL/min", "2024-03-02", was=True) == \
        "eGFR was 45 mL/min on 2024-03-02"
    r = Reading("Observation/o1", "1", "4548-4", "", 15321.0, "%", T.isoformat())
    assert r.describe() == "4548-4 15321 % on 2024-03-02"
    assert Evidence.of_reading(r).statement == r.describe()


def test_a_cited_fact_reads_as_the_reading() -> None:
    row = Reading("Observation/o1", "1", "4548-4", "hba1c", 7.1, "%", "2024-03-02T00:00:00")
    hit = FindingHit("f", "High HbA1c", "4548-4", "high", 6.5, None, "%", 1, 0.0, (row,))
    r = Retrieval("v", [hit], [], [], [])
    assert r.facts() == [("High HbA1c", "observed as", "hba1c 7.1 % on 2024-03-02")]
    assert [f.object for f in knowledge_facts(r)] == ["hba1c 7.1 % on 2024-03-02"]


def test_the_checker_holds_the_pinned_text() -> None:
    labs = frame([("4548-4", 7.14, T)])
    (_code, text), = reading_texts(labs, {"4548-4": "HbA1c"})
    checks = check_rationale(f"{text.split(',')[0]}.", labs, LabLexicon.build(load_graph(), [labs]))
    assert checks and all(c.matched for c in checks), [(c.claim, c.reason) for c in checks]
