"""Featurisation and output decoding: the torch-free half of the model."""

from __future__ import annotations

import subprocess
import sys
from datetime import UTC, datetime

import numpy as np
import pandas as pd
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers

from clinragen_fhir.encoding.features import (
    UNK_ID,
    Budgets,
    Modalities,
    collate,
    featurise,
    featurise_labs,
    featurise_notes,
    knowledge_facts,
    loinc_vocabulary,
    normalise_values,
)
from clinragen_fhir.encoding.schema import LAB_COLUMNS, Note, PatientContext, Reading
from clinragen_fhir.knowledge.retrieval import FindingHit, PathStep, Retrieval
from clinragen_fhir.predict.diagnosis_line import (
    abstain,
    format_target,
    split_output,
    uncertain_band,
    verhoeff_ok,
)

WORDS = ["glucose", "is", "high", "hba1c", "diabetes", "supports", "observed", "as", "note", "the",
         "patient", "reports", "thirst", "and", "tired", "no", "fever", "today", "yesterday",
         "[2024-03-01]", "[2024-03-02]", "[undated]"]
INDEX = datetime(2024, 3, 3, tzinfo=UTC)


def tokenizer() -> Tokenizer:
    vocab = {w: i for i, w in enumerate(["<unk>", *dict.fromkeys(WORDS)])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return tok


def lab_frame(rows: list[tuple[str, float, str, float, float]]) -> pd.DataFrame:
    """(loinc, value, date, ref_low, ref_high) -> a frame with the real schema."""
    records = [{
        "observation_id": f"Observation/o{i}", "version_id": "1", "loinc": code,
        "display": code, "category": "laboratory", "value": value, "unit": "mg/dL",
        "raw_value": value, "raw_unit": "mg/dL", "time": pd.Timestamp(day, tz="UTC"),
        "ref_low": low, "ref_high": high, "interpretation": "",
    } for i, (code, value, day, low, high) in enumerate(rows)]
    return pd.DataFrame(records, columns=list(LAB_COLUMNS))


def retrieval() -> Retrieval:
    row = Reading("Observation/o1", "1", "4548-4", "hba1c", 7.1, "%", "2024-03-02T00:00:00")
    hit = FindingHit("kg:f/a1c-high", "hba1c is high", "4548-4", "high", 6.5, None, "%", 1, 0.0,
                     (row,), strength=0.9)
    path = PathStep("kg:f/a1c-high", "supports", "kg:d/dm", "kg:fact/a1c-dm", 0.9)
    return Retrieval("kg-test", [hit], [], [], [path],
                     labels={"kg:f/a1c-high": "hba1c is high", "kg:d/dm": "diabetes"})


NOTES = [Note("DocumentReference/old", "1", datetime(2024, 3, 1, tzinfo=UTC),
              "the patient reports thirst"),
         Note("DocumentReference/new", "1", datetime(2024, 3, 2, tzinfo=UTC),
              "tired no fever today")]


def test_normalise_values_maps_limits_to_plus_minus_one_and_unknown_to_nan() -> None:
    z = normalise_values(np.array([70.0, 100.0, 130.0, 60.0, 5.0]),
                         np.array([70.0, 70.0, np.nan, 60.0, np.nan]),
                         np.array([130.0, 130.0, 130.0, np.nan, np.nan]))
    assert z[:4].tolist() == [-1.0, 0.0, 1.0, -1.0]
    assert np.isnan(z[4])


def test_lab_features_mask_missing_values_and_trends_and_keep_the_newest() -> None:
    frame = lab_frame([("A", 100.0, "2024-01-01", 70, 130), ("A", 130.0, "2024-01-11", 70, 130),
                       ("B", 5.0, "2024-02-01", np.nan, np.nan), ("B", 10.0, "2024-03-01",
                                                                  np.nan, np.nan),
                       ("ZZZ", 1.0, "2024-03-02", 0, 2)])
    vocab = loinc_vocabulary(["A", "B"])
    arrays, refs = featurise_labs(frame, vocab, INDEX, max_labs=4)
    assert [r.observation_id for r in refs] == ["Observation/o1", "Observation/o2",
                                                 "Observation/o3", "Observation/o4"]
    assert arrays["lab_code"].tolist() == [vocab["A"], vocab["B"], vocab["B"], UNK_ID]
    assert arrays["lab_value_mask"].tolist() == [1, 0, 0, 1]  # B has no reference range
    assert arrays["lab_value"][1] == 0.0  # masked, not imputed
    assert arrays["lab_trend_mask"].tolist() == [1, 0, 1, 0]  # first reading has no trend
    assert arrays["lab_trend"][0] == pytest.approx(np.log1p(1.0))  # z 0 -> 1
    assert arrays["lab_trend"][2] == pytest.approx(np.log1p(1.0))  # relative: 5 -> 10
    assert arrays["lab_gap"][0] == pytest.approx(10.0)
    assert (arrays["lab_time"] >= 0).all() and arrays["lab_time"][-1] == pytest.approx(1.0)


def test_notes_newest_first_cut_at_budget_and_redact_hook() -> None:
    ids, spans = featurise_notes(NOTES, tokenizer(), budget=7,
                                 redact=lambda n: n.text.replace("fever", "[redacted]"))
    assert [s[0] for s in spans] == ["DocumentReference/new", "DocumentReference/old"]
    assert len(ids) == 7 and spans[0] == ("DocumentReference/new", 0, 5)
    assert spans[1] == ("DocumentReference/old", 5, 7)
    vocab = tokenizer().get_vocab()
    assert vocab["fever"] not in ids.tolist() and vocab["<unk>"] in ids.tolist()


def test_knowledge_facts_carry_ids_and_links_rank_first() -> None:
    facts = knowledge_facts(retrieval())
    assert [f.id for f in facts] == ["kg:fact/a1c-dm", "kg:f/a1c-high|Observation/o1"]
    assert facts[0].text == "hba1c is high supports diabetes"


def test_collate_pads_and_masks_and_modalities_switch_inputs_off() -> None:
    frame = lab_frame([("A", 100.0, "2024-01-01", 70, 130), ("A", 140.0, "2024-02-01", 70, 130)])
    patient = PatientContext("p", index_time=INDEX)
    vocab = loinc_vocabulary(["A"])
    full = featurise(frame, NOTES, patient, retrieval(), tokenizer(), vocab, Budgets())
    labs_only = featurise(frame, NOTES, patient, retrieval(), tokenizer(), vocab, Budgets(),
                          Modalities(notes=False, knowledge=False))
    assert len(labs_only.note_ids) == 0 and labs_only.fact_ids.shape == (0, 32)
    batch = collate([full, labs_only])
    assert batch["lab_code"].shape == (2, 2)
    assert batch["note_mask"].sum(1).tolist() == [len(full.note_ids), 0]
    assert batch["fact_mask"].tolist() == [[1, 1], [0, 0]]
    assert batch["fact_ids"].shape == (2, 2, 32)
    nothing = featurise(frame.iloc[:0], [], patient, None, tokenizer(), vocab)
    empty = collate([nothing])
    assert all(v.shape[1] == 1 for k, v in empty.items() if k.endswith("mask"))  # one slot
    assert empty["lab_mask"].sum() == empty["note_mask"].sum() == empty["fact_mask"].sum() == 0


def test_features_and_decode_do_not_import_torch() -> None:
    code = ("import sys, clinragen_fhir.encoding.features, clinragen_fhir.predict.diagnosis_line; "
            "assert 'torch' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_diagnosis_line_round_trip_and_robust_parsing() -> None:
    text = format_target("HbA1c 7.1 % is high.", [("44054006", "Diabetes mellitus type 2")])
    assert split_output(text) == ("HbA1c 7.1 % is high.", ["44054006"])
    # last line wins, bad check digits and codes outside the vocabulary are dropped
    messy = ("Diagnosis: 38341003\nmore thinking\n**Diagnoses** - 44054006, 44054007; 38341003 "
             "and 44054006 again")
    assert split_output(messy, vocabulary={"44054006"})[1] == ["44054006"]
    assert split_output(messy)[1] == ["44054006", "38341003"]
    assert split_output("Final diagnosis: hypertension", terms={"hypertension": "38341003"}) \
        == ("", ["38341003"])
    assert split_output("no structured line") == ("no structured line", [])
    assert verhoeff_ok("431855005") and not verhoeff_ok("431855006")


def test_abstain_only_when_the_top_disorder_is_in_the_uncertain_band() -> None:
    assert uncertain_band(0.5, 0.6) == pytest.approx((0.4, 0.6))
    assert uncertain_band(0.3, 0.6) == pytest.approx((0.24, 0.44))
    # one disorder confidently present: answer, whatever the others are
    assert abstain([0.95, 0.02]) == (False, "")
    assert abstain([0.95, 0.45, 0.5]) == (False, "")
    # every disorder confidently absent: answer "none"
    assert abstain([0.1, 0.02, 0.39]) == (False, "")
    # the best candidate is neither clearly present nor clearly absent: abstain
    flag, reason = abstain([0.45, 0.1])
    assert flag and "0.45" in reason and "[0.40, 0.60)" in reason
    assert abstain([0.4, 0.3])[0] and not abstain([0.6, 0.3])[0]  # [low, high)
    assert abstain([])[0] and abstain([float("nan")])[0]
    # the band follows the tuned threshold: 0.35 is uncertain at t=0.3, absent at t=0.5
    assert abstain([0.35, 0.1], threshold=0.3)[0]
    assert not abstain([0.35, 0.1], threshold=0.5)[0]
    assert not abstain([0.9, 0.1], threshold=0.3, min_confidence=0.6)[0]


def test_lab_text_puts_whole_abnormal_readings_ahead_of_the_notes() -> None:
    from tokenizers import Tokenizer as Tok
    from tokenizers import models as m
    from tokenizers import pre_tokenizers as pt

    from clinragen_fhir.encoding.features import featurise_lab_text, lab_readings

    frame = lab_frame([("A", 100.0, "2024-01-01", 70, 130), ("A", 200.0, "2024-02-01", 70, 130),
                       ("B", 5.0, "2024-02-02", 4, 6)])
    readings = lab_readings(frame, {"A": "glucose"})
    # newest reading per test, furthest outside the range first, named by the graph
    assert readings == ["glucose 200 mg/dL on 2024-02-01, high", "B 5 mg/dL on 2024-02-02, normal"]
    chars = Tok(m.WordLevel({"<unk>": 0}, unk_token="<unk>"))
    chars.pre_tokenizer = pt.Split("", "isolated")  # one token per character: budgets in chars
    one = featurise_lab_text(frame, {"A": "glucose"}, chars, 50)
    assert len(one) == len("Labs: glucose 200 mg/dL on 2024-02-01, high") + 2  # whole + ".\n"
    assert len(featurise_lab_text(frame, {"A": "glucose"}, chars, 200)) > len(one)
    assert len(featurise_lab_text(frame, None, chars, 10)) == 0  # no reading fits: nothing

    patient = PatientContext("p", index_time=INDEX)
    vocab = loinc_vocabulary(["A", "B"])
    on = Budgets(max_lab_text_tokens=64)
    plain = featurise(frame, NOTES, patient, retrieval(), tokenizer(), vocab)
    text = featurise(frame, NOTES, patient, retrieval(), tokenizer(), vocab, on)
    extra = len(text.note_ids) - len(plain.note_ids)
    assert extra > 0 and text.note_ids[extra:].tolist() == plain.note_ids.tolist()
    assert [s[1] - extra for s in text.notes] == [s[1] for s in plain.notes]  # spans shifted
    no_labs = featurise(frame, NOTES, patient, retrieval(), tokenizer(), vocab, on,
                        Modalities(labs=False))
    assert no_labs.note_ids.tolist() == plain.note_ids.tolist()  # the text is a lab modality
