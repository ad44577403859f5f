"""What a saved model's config.json says that prediction needs: one dataclass for both sides.

The ONNX runtime reads it as plain JSON (`ModelConfig.read`, no torch); the torch model's
`model.clinragen.ClinRaGenConfig` extends it with what only training needs (backbone, prompt,
LoRA, fusion sizes), so the defaults below are declared once. Fields absent from an older
config.json take these defaults.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from clinragen_fhir.encoding.features import Budgets
from clinragen_fhir.encoding.schema import PatientContext
from clinragen_fhir.inference.errors import ModelUnavailable
from clinragen_fhir.predict.conclude import Conclusion, Hierarchy, conclude


@dataclass
class ModelConfig:
    """Vocabularies, budgets, calibration and the conclusion rule's settings of one model."""

    loinc_codes: list[str]
    disorders: list[str]  # SNOMED ids, in the diagnosis head's output order
    disorder_terms: list[str]
    knowledge_version: str = ""
    budgets: Budgets = field(default_factory=Budgets)
    temperature: float = 1.0  # fitted on held-out logits (`ClinRaGen.fit_temperature`)
    threshold: float = 0.5
    min_confidence: float = 0.6
    max_new_tokens: int = 160
    method_version: str = "1"
    # per-disorder thresholds (SNOMED id -> threshold; the others use `threshold`)
    thresholds: dict[str, float] = field(default_factory=dict)
    max_codes: int = 3  # the most codes a report concludes
    # each disorder's share of the training visits (SNOMED id -> rate): which codes the cap
    # keeps (`predict.conclude`, the lift); empty in an older model (the most probable)
    base_rates: dict[str, float] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ModelConfig:
        """The fields this class knows of a config.json's dict (a torch model's has more)."""
        known = {f.name for f in fields(ModelConfig)}
        kw: dict[str, Any] = {k: v for k, v in d.items() if k in known}
        kw["loinc_codes"], kw["disorders"] = list(d["loinc_codes"]), list(d["disorders"])
        kw["disorder_terms"] = list(d["disorder_terms"])
        kw["budgets"] = Budgets(**d["budgets"])
        kw["thresholds"] = {str(k): float(v) for k, v in (d.get("thresholds") or {}).items()}
        kw["base_rates"] = {str(k): float(v) for k, v in (d.get("base_rates") or {}).items()}
        for name, kind in (("knowledge_version", str), ("temperature", float),
                           ("threshold", float), ("min_confidence", float),
                           ("max_new_tokens", int), ("method_version", str), ("max_codes", int)):
            if name in kw:
                kw[name] = kind(kw[name])
        return cls(**kw)

    @classmethod
    def read(cls, path: Path) -> ModelConfig:
        """config.json at `path`; an unreadable one is `ModelUnavailable`."""
        try:
            return cls.from_dict(json.loads(path.read_text()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ModelUnavailable(path, f"unreadable model config ({type(exc).__name__}: "
                                   f"{exc})") from exc

    def term(self, code: str) -> str:
        """The display term of a disorder the head predicts."""
        return self.disorder_terms[self.disorders.index(code)]

    def conclude(self, probabilities: Sequence[float] | np.ndarray, kg: Hierarchy | None,
                 patient: PatientContext) -> Conclusion:
        """`predict.conclude` with this model's settings, for one patient."""
        return self.conclude_for(probabilities, kg, patient.sex, patient.age_years())

    def conclude_for(self, probabilities: Sequence[float] | np.ndarray, kg: Hierarchy | None,
                     sex: str | None, age_years: float | None) -> Conclusion:
        """`predict.conclude` with this model's thresholds, cap, base rates and abstention
        band: the one place that passes them (the runtime, evaluation and the int8 check)."""
        return conclude(probabilities, self.disorders, kg, threshold=self.threshold,
                        thresholds=self.thresholds, min_confidence=self.min_confidence,
                        sex=sex, age_years=age_years, max_codes=self.max_codes,
                        base_rates=self.base_rates)

    def terms(self, c: Conclusion) -> list[str]:
        """The terms the rationale is written for: the concluded codes', none when abstaining."""
        return [] if c.abstained else [self.term(code) for code in c.codes]
