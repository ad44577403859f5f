"""`OnnxPredictor`: the pipeline's Predictor on the exported model (no torch).

It reads the notes as training did, every disorder name masked. Diagnoses are what
`predict.conclude` makes of the calibrated head (per-disorder thresholds,
sex/age, most specific, a cap); the generated text gives the rationale only. Each carries the
head's probability. Without the SLM's attention (that needs the torch `explain` pass), evidence
comes from the lab frame through the knowledge graph: the readings that triggered findings
supporting the disorder, else the newest readings of its supporting tests; facts are ranked by the
prefix graph's knowledge attention.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd

from clinragen_fhir.encoding.features import Features, collate, featurise
from clinragen_fhir.encoding.schema import Note, PatientContext, Reading
from clinragen_fhir.identity import model_identity
from clinragen_fhir.inference.errors import InputTooLong
from clinragen_fhir.inference.grounding import evidence
from clinragen_fhir.inference.runtime import OnnxModel, Precision
from clinragen_fhir.inference.session import Provider
from clinragen_fhir.knowledge import KnowledgeGraph, retrieve
from clinragen_fhir.knowledge.masking import mask_disorder_names
from clinragen_fhir.knowledge.retrieval import Retrieval, supporting_tests
from clinragen_fhir.predict.conclude import Conclusion, concluded_prediction
from clinragen_fhir.predict.types import (
    Diagnosis,
    Evidence,
    Prediction,
    abstain_without_inputs,
    has_inputs,
)

METHOD = "clinragen-onnx"
Item = tuple[pd.DataFrame, Sequence[Note], PatientContext]


class OnnxPredictor:
    """Rationale + diagnoses for one patient or a batch, on onnxruntime."""

    name = METHOD

    def __init__(self, model: OnnxModel, kg: KnowledgeGraph, batch_size: int = 4,
                 constrained: bool = False, max_new_tokens: int | None = None,
                 top_facts: int = 5, grounded: bool = True,
                 on_probabilities: Callable[[np.ndarray], None] | None = None) -> None:
        self.model = model
        # evaluation's view of every disorder's calibrated probability ([batch, disorders], per
        # graph call): a Prediction carries only its conclusions' (training.runtime_eval)
        self.on_probabilities = on_probabilities
        # every reading the rationale writes is one of this patient's (inference.grounding)
        self.grounded = grounded
        self.kg = kg
        self.batch_size = max(1, batch_size)
        self.constrained = constrained
        self.max_new_tokens = max_new_tokens
        self.top_facts = top_facts
        cfg = model.config
        # the report's, the backfill's and the audit's name for this model (identity.py)
        model_dir = getattr(model, "model_dir", None)
        self.model_id = model_identity(model_dir) if model_dir is not None else ""
        self._index = {c: i for i, c in enumerate(cfg.disorders)}
        self._code = dict(zip(cfg.disorder_terms, cfg.disorders, strict=True))

    @classmethod
    def load(cls, model_dir: Path | str, kg: KnowledgeGraph, precision: Precision = "fp32",
             provider: Provider = "auto", threads: int = 0, batch_size: int = 4,
             constrained: bool = False, max_new_tokens: int | None = None,
             verify_hashes: bool = True) -> OnnxPredictor:
        model = OnnxModel(model_dir, precision, provider, threads, verify_hashes)
        return cls(model, kg, batch_size, constrained, max_new_tokens)

    # -- inputs -------------------------------------------------------------------------------
    def featurise(self, labs: pd.DataFrame, notes: Sequence[Note], patient: PatientContext
                  ) -> tuple[Features, Retrieval]:
        """The model's view of one patient: the notes with every disorder name masked, as every
        training example had them (knowledge.masking), then retrieval and features."""
        notes = mask_disorder_names(self.kg, notes)
        retrieval = retrieve(self.kg, labs, notes, patient)
        feats = featurise(labs, notes, patient, retrieval, self.model.tokenizer,
                          self.model.loinc_vocab, self.model.config.budgets,
                          supports=evidence(self.kg, patient.sex))
        return feats, retrieval

    # -- Predictor ----------------------------------------------------------------------------
    def predict(self, labs: pd.DataFrame, notes: Sequence[Note],
                patient: PatientContext) -> Prediction:
        return self.predict_batch([(labs, notes, patient)])[0]

    def predict_batch(self, items: Sequence[Item]) -> list[Prediction]:
        """Patients are featurised one by one, then run `batch_size` at a time."""
        results: list[Prediction | None] = [None] * len(items)
        work: list[tuple[int, Features, Retrieval, PatientContext]] = []
        for i, (labs, notes, patient) in enumerate(items):
            if not has_inputs(labs, notes):
                results[i] = abstain_without_inputs(self._empty())
                continue
            feats, retrieval = self.featurise(labs if labs is not None else pd.DataFrame(),
                                              notes, patient)
            work.append((i, feats, retrieval, patient))
        for start in range(0, len(work), self.batch_size):
            chunk = work[start:start + self.batch_size]
            conclusions: list[Conclusion] = []
            patients = [patient for _, _, _, patient in chunk]
            try:
                gen = self.model.generate(
                    collate([f for _, f, _, _ in chunk]), self.max_new_tokens,
                    constrained=self.constrained, grounded=self.grounded,
                    conclude=partial(self._conclude_rows, patients, conclusions),
                    readings=[f.readings for _, f, _, _ in chunk],
                    reading_supports=[f.reading_supports for _, f, _, _ in chunk],
                    code_of=self._code.__getitem__)
            except InputTooLong as exc:
                if len(chunk) == 1:  # the baseline that takes over reuses this retrieval
                    exc.retrieval = chunk[0][2]
                raise
            for row, (i, feats, retrieval, _) in enumerate(chunk):
                results[i] = self._prediction(gen.texts[row], conclusions[row],
                                              gen.probabilities[row],
                                              gen.prefix.knowledge_attention[row], feats,
                                              retrieval)
        return [r for r in results if r is not None]

    def _conclude_rows(self, patients: Sequence[PatientContext], out: list[Conclusion],
                       probs: np.ndarray) -> list[list[str]]:
        """The head concludes first (into `out`); the rationale is then generated for the terms
        returned (none when abstaining)."""
        if self.on_probabilities is not None:
            self.on_probabilities(probs)
        out[:] = [self._conclude(probs[row], patient) for row, patient in enumerate(patients)]
        return [self.model.config.terms(c) for c in out]

    def _conclude(self, probs: np.ndarray, patient: PatientContext) -> Conclusion:
        return self.model.config.conclude(probs, self.kg, patient)

    def _empty(self) -> Prediction:
        cfg = self.model.config
        return Prediction(METHOD, cfg.method_version, cfg.knowledge_version, [], "",
                          model_id=self.model_id)

    def _prediction(self, text: str, c: Conclusion, probs: np.ndarray, katt: np.ndarray,
                    feats: Features, retrieval: Retrieval) -> Prediction:
        p = self._empty()
        p.facts_used = self._ranked_facts(katt, feats)
        return concluded_prediction(p, c, text, lambda code: self._diagnosis(
            code, float(probs[self._index[code]]), feats, retrieval))

    def _ranked_facts(self, katt: np.ndarray, feats: Features) -> list[str]:
        """Fact ids by the knowledge attention lab and note tokens paid them (slot 0 = none)."""
        if not feats.facts:
            return []
        weight = katt.mean(0)[:, 1:1 + len(feats.facts)].sum(0)  # [K]
        order = np.argsort(-weight, kind="stable")[:self.top_facts]
        return [feats.facts[k].id for k in order]

    def _diagnosis(self, code: str, prob: float, feats: Features,
                   retrieval: Retrieval) -> Diagnosis:
        term = self.model.config.disorder_terms[self._index[code]]
        support = next((d for d in retrieval.disorders if d.snomed == code), None)
        findings = {f.id: f for f in retrieval.findings}
        evidence: list[Evidence] = []
        knowledge: list[str] = []
        read = {f.id for f in feats.facts}
        for s in support.supporting if support is not None else []:
            if s.fact in read:
                knowledge.append(s.fact)
            hit = findings.get(s.evidence)
            if hit is not None:
                evidence.extend(Evidence.of_reading(r, f"{r.describe()} ({hit.label})")
                                for r in hit.rows[-3:])
        if not evidence:
            evidence = [Evidence.of_reading(r, f"{r.describe()} (a test that bears on {term})")
                        for r in supporting_readings(feats.labs, supporting_tests(self.kg, code))]
        return Diagnosis(code, term, prob, tuple(dict.fromkeys(evidence))[:5],
                         tuple(dict.fromkeys(knowledge)))


def supporting_readings(labs: Sequence[Reading], tests: frozenset[str],
                        k: int = 3) -> list[Reading]:
    """The newest reading of each of the disorder's supporting tests, newest first: when no
    finding fired, the values a clinician should check are the ones the rationale may cite
    (`knowledge.retrieval.supporting_tests`), not whatever is most abnormal (an HbA1c shown as
    the evidence for hypertension); none when the record has no such reading."""
    newest: dict[str, Reading] = {}
    for r in labs:
        if r.loinc in tests and (r.loinc not in newest or r.time > newest[r.loinc].time):
            newest[r.loinc] = r
    return sorted(newest.values(), key=lambda r: r.time, reverse=True)[:k]
