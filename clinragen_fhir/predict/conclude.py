"""Head probabilities -> the codes a report concludes. Pure Python + numpy, no torch.

One rule for the ONNX predictor, the torch model and evaluation, so they cannot drift apart:

1. a disorder the patient's sex or age makes impossible is out first (its probability does not
   count for abstaining either);
2. a disorder is concluded when its head probability reaches its own threshold
   (`thresholds.get(code, threshold)`); the generated `Diagnosis:` line adds nothing, the
   calibrated head decides;
3. a concluded code's IS-A ancestors are dropped (a parent adds nothing beside its child);
4. at most `max_codes`. Which ones: with the model's `base_rates` (each disorder's share of the
   training visits), those whose probability is raised most above their base rate (the lift,
   p / base rate), else the most probable. A report has three places; macro-F1 weighs a CKD
   stage as much as hypertension, and the lift gives the places to what this record says beyond
   what every record says (hypertension, in half of all visits, no longer crowds out the CKD
   stage that only this record shows). The codes kept are listed most probable first; those cut
   stay in `Conclusion.dropped` (OVER_CAP), and the report names them.

Abstention: only a report with no concluded code can abstain ("not confident that nothing is
present"): `decode.abstain`'s band, with each possible disorder's probability scaled to the
global threshold by its own.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from clinragen_fhir.predict.diagnosis_line import abstain, split_output
from clinragen_fhir.predict.types import Diagnosis, Prediction, Withheld

IMPOSSIBLE = "impossible for sex/age"
PARENT = "parent of a concluded code"
OVER_CAP = "over the cap"


class Hierarchy(Protocol):
    """What conclusion needs of the knowledge graph (`KnowledgeGraph` is one)."""

    def possible(self, snomed: str, sex: str | None, age_years: float | None) -> bool: ...

    def most_specific(self, codes: Sequence[str]) -> list[str]: ...


@dataclass(frozen=True)
class Conclusion:
    """The decision for one patient. `codes` is the decision even when `abstained` (evaluation
    scores both); a report shows no diagnosis when abstained."""

    codes: list[str]  # descending probability
    abstained: bool
    abstain_reason: str
    # codes that reached their threshold but are not concluded, and why (IMPOSSIBLE, PARENT,
    # OVER_CAP)
    dropped: dict[str, str] = field(default_factory=dict)


MIN_BASE_RATE = 1e-3  # a disorder no training visit had: its lift is p / this, not infinite


def conclude(probabilities: Sequence[float] | np.ndarray, disorders: Sequence[str],
             kg: Hierarchy | None, *, threshold: float,
             thresholds: Mapping[str, float] | None = None, min_confidence: float,
             sex: str | None, age_years: float | None, max_codes: int = 3,
             base_rates: Mapping[str, float] | None = None) -> Conclusion:
    """The conclusion for one patient's head probabilities (aligned with `disorders`).

    `kg` None applies no sex/age or hierarchy rule (a model used without its graph).
    `base_rates` None (an older model) keeps the most probable codes within the cap."""
    if len(probabilities) != len(disorders):
        raise ValueError(f"{len(probabilities)} probabilities for {len(disorders)} disorders")
    per_code = thresholds or {}
    dropped: dict[str, str] = {}
    possible: list[tuple[float, str]] = []
    above: list[tuple[float, int, str]] = []
    for i, (code, raw) in enumerate(zip(disorders, probabilities, strict=True)):
        p = float(raw)
        reached = p >= per_code.get(code, threshold)  # False for NaN
        if kg is not None and not kg.possible(code, sex, age_years):
            if reached:
                dropped[code] = IMPOSSIBLE
            continue
        possible.append((p, code))
        if reached:
            above.append((p, i, code))
    above.sort(key=lambda t: (-t[0], t[1]))  # by probability, ties in vocabulary order
    codes = [c for _, _, c in above]
    if kg is not None:
        keep = set(kg.most_specific(codes))
        dropped.update((c, PARENT) for c in codes if c not in keep)
        codes = [c for c in codes if c in keep]
    cap = max(0, max_codes)
    if base_rates and len(codes) > cap:
        prob = {c: p for p, _, c in above}
        by_lift = sorted(codes, key=lambda c: -prob[c] / max(base_rates.get(c, 0.0),
                                                             MIN_BASE_RATE))
        kept = set(by_lift[:cap])
        dropped.update((c, OVER_CAP) for c in by_lift[cap:])
        codes = [c for c in codes if c in kept]  # still most probable first
    else:
        dropped.update((c, OVER_CAP) for c in codes[cap:])
        codes = codes[:cap]
    if codes:  # each passed a threshold tuned for precision: the report says so
        return Conclusion(codes, False, "", dropped)
    # nothing concluded: abstain unless the model is confident that nothing is present (each
    # probability measured against its own threshold, on the band `decode.abstain` uses)
    relative = [p * threshold / per_code.get(c, threshold) if per_code.get(c, threshold) > 0
                else p for p, c in possible]
    flag, reason = abstain(relative, threshold, min_confidence)
    return Conclusion([], flag, reason, dropped)


def concluded_prediction(p: Prediction, c: Conclusion, text: str,
                         diagnosis: Callable[[str], Diagnosis]) -> Prediction:
    """`p` (a model's empty prediction) completed from the head's conclusion `c` and the
    generated `text`: the head decides, the text explains. The rationale is the text before any
    `Diagnosis:` line (`split_output`); the diagnoses are `diagnosis(code)` for each concluded
    code, none when abstaining, and the codes the cap cut are `withheld`. The ONNX predictor and
    the torch model both end here."""
    p.abstained, p.abstain_reason = c.abstained, c.abstain_reason
    if not c.abstained:
        p.diagnoses = [diagnosis(code) for code in c.codes]
        cut = [diagnosis(code) for code, why in c.dropped.items() if why == OVER_CAP]
        p.withheld = [Withheld(d.snomed, d.term, d.probability)
                      for d in sorted(cut, key=lambda d: -d.probability)]
    p.rationale = split_output(text)[0]
    return p


def conclude_matrix(P: np.ndarray, disorders: Sequence[str], kg: Hierarchy | None,
                    sexes: Sequence[str | None], ages: Sequence[float | None] | np.ndarray,
                    threshold: float, thresholds: Mapping[str, float] | None = None,
                    max_codes: int = 3, base_rates: Mapping[str, float] | None = None
                    ) -> np.ndarray:
    """Concluded codes for many patients as a [N, D] bool array, by the same rule as `conclude`
    (row i: probabilities P[i], patient sex sexes[i], age ages[i] in years or None/NaN).

    For evaluation and threshold tuning: it does not abstain (score abstention separately with
    `conclude(...).abstained` or `decode.abstain`)."""
    P = np.asarray(P, dtype=float)
    if P.ndim != 2 or P.shape[1] != len(disorders):
        raise ValueError(f"P has shape {P.shape}, want [N, {len(disorders)}]")
    if len(sexes) != len(P) or len(ages) != len(P):
        raise ValueError(f"{len(P)} rows but {len(sexes)} sexes and {len(ages)} ages")
    col = {c: j for j, c in enumerate(disorders)}
    out = np.zeros(P.shape, dtype=bool)
    for i, row in enumerate(P):
        age = ages[i]
        c = conclude(row, disorders, kg, threshold=threshold, thresholds=thresholds,
                     min_confidence=0.5, sex=sexes[i],
                     age_years=None if age is None else float(age), max_codes=max_codes,
                     base_rates=base_rates)
        out[i, [col[code] for code in c.codes]] = True
    return out
