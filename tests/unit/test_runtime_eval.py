"""fp32 against int8 through the worker's runtime (training/runtime_eval.py, issue 17 item 3):
on a tiny exported model and synthetic held-out visits, every precision is scored on the same
visits, and int8 shares the fp32 prefix graph, so no conclusion can move."""

from __future__ import annotations

import pytest

pytest.importorskip("torch")

from clinragen_fhir.knowledge import load_graph
from tests.unit.test_export import exported_model_dir
from tests.unit.train_examples import make_examples
from training.runtime_eval import compare, markdown, one_visit_per_patient


def test_one_visit_per_patient_is_seeded_and_keeps_one_visit_each() -> None:
    examples = make_examples(12)
    doubled = examples + [type(e)(**{**e.__dict__, "example_id": e.example_id + "#2"})
                          for e in examples]
    a = one_visit_per_patient(doubled, 5, seed=3)
    assert len(a) == 5 and len({e.patient.patient_id for e in a}) == 5
    assert [e.example_id for e in a] == [e.example_id
                                         for e in one_visit_per_patient(doubled, 5, seed=3)]
    assert len(one_visit_per_patient(doubled, 100, seed=3)) == 12


@pytest.mark.slow
def test_int8_is_scored_beside_fp32_on_the_same_visits_and_moves_no_conclusion() -> None:
    examples = make_examples(10)
    result = compare(exported_model_dir(), examples, load_graph(), threads=1,
                     batch_size=4)
    assert result["patients"] == 10 and result["reference"] == "fp32"
    fp32, int8 = result["systems"]["fp32"], result["systems"]["int8"]
    assert fp32["macro_f1_diff_to_reference"] is None
    assert fp32["identical_conclusions"] == 1.0 and fp32["identical_rationales"] == 1.0
    # the head is in the prefix graph both variants share: int8 moves the wording only
    assert int8["max_probability_shift"] == 0.0 and int8["identical_conclusions"] == 1.0
    diff = int8["macro_f1_diff_to_reference"]
    assert diff["diff_low"] == diff["diff_high"] == 0.0
    assert int8["seconds_per_patient"] > 0 and fp32["speed_vs_reference"] == 1.0
    table = markdown(result)
    assert "| int8 |" in table and "reference" in table and "10 held-out patients" in table
