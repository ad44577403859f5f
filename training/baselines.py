"""Non-SLM systems for the comparison table: the knowledge-rule baseline and two classifiers
(logistic regression, gradient boosting) on lab features plus TF-IDF of the notes.

Every system returns a `SystemOutput`: probabilities and decisions over one disorder list, the
abstentions, and a rationale per example with what kind it is. The classifiers explain nothing by
themselves; their rationale is a *template* (the patient's most abnormal latest readings and the
predicted disorders), written from the record, so its faithfulness is 100 % by construction and
says nothing about the classifier: the table marks it as such.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from clinragen_fhir.encoding.schema import describe_reading
from clinragen_fhir.knowledge import KnowledgeGraph, retrieve
from clinragen_fhir.predict.conclude import conclude_matrix
from clinragen_fhir.predict.diagnosis_line import abstain
from clinragen_fhir.predict.rules import RuleBaseline
from training.example import Example, label_matrix
from training.metrics import base_rates, tune_thresholds


@dataclass
class SystemOutput:
    name: str
    probs: np.ndarray  # [n, D] over the evaluation's disorder list
    pred: np.ndarray  # [n, D] 0/1
    abstained: list[bool]
    rationales: list[str]
    rationale_kind: str  # "generated" | "rule" | "template"
    extra: dict[str, Any] = field(default_factory=dict)


def sexes_and_ages(examples: Sequence[Example]) -> tuple[list[str | None], list[float | None]]:
    """Each example's patient sex and age in years at its index time (None when unknown)."""
    sexes: list[str | None] = []
    ages: list[float | None] = []
    for ex in examples:
        p = ex.patient
        sexes.append(p.sex)
        ages.append((p.index_time - p.birth_date).days / 365.25
                    if p.birth_date is not None and p.index_time is not None else None)
    return sexes, ages


def closure(kg: KnowledgeGraph, concluded: np.ndarray, disorders: Sequence[str]) -> np.ndarray:
    """Concluded codes plus their IS-A ancestors in the list: concluding type 2 diabetes says
    diabetes mellitus too, as the labels do (scoring needs the same closure on both sides)."""
    col = {d: j for j, d in enumerate(disorders)}
    up = np.eye(len(disorders), dtype=int)
    for j, d in enumerate(disorders):
        for a in kg.ancestors(d):
            if a in col:
                up[j, col[a]] = 1
    return ((np.asarray(concluded, dtype=int) @ up) > 0).astype(int)


def decide(kg: KnowledgeGraph, probs: np.ndarray, disorders: Sequence[str],
           examples: Sequence[Example], threshold: float,
           thresholds: dict[str, float] | None = None, max_codes: int = 3,
           base_rates: dict[str, float] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(concluded [n, D] most specific codes as a report lists them, pred = their closure): every
    system's probabilities go through the worker's own rule (`predict.conclude`)."""
    sexes, ages = sexes_and_ages(examples)
    concluded = conclude_matrix(probs, disorders, kg, sexes, ages, threshold, thresholds,
                                max_codes, base_rates).astype(int)
    return concluded, closure(kg, concluded, disorders)


# ---------------------------------------------------------------------------------------------
# the knowledge rules


def rule_outputs(kg: KnowledgeGraph, examples: Sequence[Example],
                 disorders: Sequence[str], min_confidence: float = 0.6,
                 max_codes: int = 3) -> SystemOutput:
    """Decisions = what the rules conclude; probabilities = the graph's support scores (not
    calibrated: they are sums of association strengths, capped at 1). Abstention is the rules'
    own (no input) or the shared rule (`abstain`) on the support scores around the graph's
    conclusion threshold."""
    from clinragen_fhir.knowledge.retrieval import rule_index

    rules = RuleBaseline(kg)
    conclude = rule_index(kg).default_threshold
    index = {d: j for j, d in enumerate(disorders)}
    probs = np.zeros((len(examples), len(disorders)))
    pred = np.zeros((len(examples), len(disorders)), dtype=int)
    abstained, rationales = [], []
    for i, ex in enumerate(examples):
        p = rules.predict(ex.labs, ex.notes, ex.patient)
        if not ((ex.labs is None or ex.labs.empty) and not ex.notes):
            for d in retrieve(kg, ex.labs, ex.notes, ex.patient).disorders:
                if d.snomed in index:
                    probs[i, index[d.snomed]] = max(0.0, min(1.0, d.score))
        for dx in p.diagnoses:
            if dx.snomed in index:
                pred[i, index[dx.snomed]] = 1
        abstained.append(p.abstained or abstain(probs[i].tolist(), conclude, min_confidence)[0])
        rationales.append(p.rationale)
    # what the rules concluded, through the worker's rule (sex/age, most specific, cap)
    support = np.where(pred == 1, np.maximum(probs, 1e-6), 0.0)
    concluded, closed = decide(kg, support, disorders, examples, 1e-6, None, max_codes)
    return SystemOutput("rule baseline", probs, closed, abstained, rationales, "rule",
                        {"concluded": concluded})


# ---------------------------------------------------------------------------------------------
# feature classifiers


def _z(values: np.ndarray, low: np.ndarray, high: np.ndarray) -> np.ndarray:
    from clinragen_fhir.encoding.features import normalise_values

    return np.asarray(normalise_values(values, low, high))


class LabFeatures:
    """Per LOINC seen in training: last, min and max value on the reference-range scale (the raw
    value standardised when there is no range), log count and last-minus-first; plus age, sex."""

    def __init__(self, max_codes: int = 80) -> None:
        self.max_codes = max_codes
        self.codes: list[str] = []
        self.mean: dict[str, float] = {}
        self.std: dict[str, float] = {}

    def fit(self, examples: Sequence[Example]) -> LabFeatures:
        frames = [ex.labs for ex in examples if len(ex.labs)]
        allf = pd.concat(frames) if frames else pd.DataFrame(columns=["loinc", "value"])
        counts = allf.groupby("loinc").size().sort_values(ascending=False)
        self.codes = [str(c) for c in counts.index[:self.max_codes]]
        for c in self.codes:
            v = allf.loc[allf["loinc"] == c, "value"].astype(float)
            mean, std = float(v.mean()), float(v.std())
            self.mean[c] = mean if np.isfinite(mean) else 0.0
            self.std[c] = std if np.isfinite(std) and std > 0 else 1.0
        return self

    def transform(self, examples: Sequence[Example]) -> np.ndarray:
        """[n, 5 * codes + 3]; numpy per example (a pandas groupby per example took minutes
        over ten thousand visits)."""
        out = np.zeros((len(examples), 5 * len(self.codes) + 3), dtype=np.float32)
        col = {c: k for k, c in enumerate(self.codes)}
        mean = np.array([self.mean[c] for c in self.codes] or [0.0])
        std = np.array([self.std[c] for c in self.codes] or [1.0])
        for i, ex in enumerate(examples):
            p = ex.patient
            age = p.age_years()
            out[i, -3] = (age or 0.0) / 100.0
            out[i, -2] = 1.0 if p.sex == "female" else 0.0
            out[i, -1] = 1.0 if age is None else 0.0
            f = ex.labs
            if not len(f):
                continue
            k = np.fromiter((col.get(str(c), -1) for c in f["loinc"].to_numpy()),
                            dtype=np.int64, count=len(f))
            keep = k >= 0
            if not keep.any():
                continue
            k = k[keep]
            v = f["value"].to_numpy(dtype=float)[keep]
            z = _z(v, f["ref_low"].to_numpy(float)[keep], f["ref_high"].to_numpy(float)[keep])
            z = np.clip(np.where(np.isfinite(z), z, (v - mean[k]) / std[k]), -20, 20)
            t = f["time"].to_numpy(dtype="datetime64[ns]").astype(np.int64)[keep]
            order = np.lexsort((np.arange(len(k)), t, k))  # by test, then time (stable)
            ks, zs = k[order], z[order]
            starts = np.flatnonzero(np.r_[True, ks[1:] != ks[:-1]])
            ends = np.r_[starts[1:], len(ks)] - 1
            base = 5 * ks[starts]
            out[i, base] = zs[ends]
            out[i, base + 1] = np.minimum.reduceat(zs, starts)
            out[i, base + 2] = np.maximum.reduceat(zs, starts)
            out[i, base + 3] = np.log1p(ends - starts + 1)
            out[i, base + 4] = zs[ends] - zs[starts]
        return np.nan_to_num(out, nan=0.0, posinf=20.0, neginf=-20.0)


def _note_text(ex: Example) -> str:
    return "\n".join(n.text for n in ex.notes)


def template_rationale(ex: Example, predicted: Sequence[tuple[str, str]], k: int = 3) -> str:
    """The k most out-of-range latest readings, cited with value and date, and the predicted
    disorders: what a clinician would look at, written from the record (not from the model)."""
    f = ex.labs
    parts: list[tuple[float, str]] = []
    if len(f):
        last = f.sort_values("time", kind="stable").groupby("loinc", sort=False).tail(1)
        for r in last.to_dict("records"):
            v, lo, hi = float(r["value"]), float(r["ref_low"]), float(r["ref_high"])
            if np.isfinite(hi) and v > hi:
                word, dist = "high", (v - hi) / (abs(hi) or 1.0)
            elif np.isfinite(lo) and v < lo:
                word, dist = "low", (lo - v) / (abs(lo) or 1.0)
            else:
                continue
            day = pd.Timestamp(r["time"]).date().isoformat()
            name = str(r["display"] or r["loinc"])
            parts.append((dist, f"{describe_reading(name, v, str(r['unit']), day, was=True)} "
                                f"({word})"))
    parts.sort(key=lambda t: -t[0])
    readings = "; ".join(p for _, p in parts[:k]) or "no reading outside its reference range"
    names = ", ".join(term for _, term in predicted) or "no disorder"
    return f"Predicted {names}. Most abnormal latest readings: {readings}."


class FeatureClassifier:
    """One binary classifier per disorder seen in training (scikit-learn), on lab features and
    TF-IDF of the notes; the decision threshold is tuned on the valid split like the SLM's."""

    def __init__(self, kind: str, seed: int = 0) -> None:
        if kind not in ("logistic", "boosting"):
            raise ValueError(kind)
        self.kind = kind
        self.seed = seed
        self.labs = LabFeatures()
        self.models: dict[int, Any] = {}
        self.constant: dict[int, float] = {}
        self.threshold = 0.5
        self.thresholds: dict[str, float] = {}
        self.base_rates: dict[str, float] = {}  # from its training split, as the SLM's

    @property
    def name(self) -> str:
        return ("logistic regression" if self.kind == "logistic" else "gradient boosting") + \
            " (labs + TF-IDF)"

    def matrix(self, examples: Sequence[Example], fit: bool = False) -> Any:
        """The classifiers' inputs: the lab features (the first `lab_columns`), then the note
        text (TF-IDF; for boosting its SVD). `fit` fits the featurisers, not the classifiers."""
        from scipy import sparse
        from sklearn.decomposition import TruncatedSVD
        from sklearn.feature_extraction.text import TfidfVectorizer
        from sklearn.preprocessing import StandardScaler

        texts = [_note_text(ex) for ex in examples]
        if fit:
            self.labs.fit(examples)
            self.tfidf = TfidfVectorizer(max_features=2000, sublinear_tf=True, min_df=2,
                                         ngram_range=(1, 2))
            try:
                self.tfidf.fit(texts)
            except ValueError:  # no vocabulary (no notes at all)
                self.tfidf = TfidfVectorizer(min_df=1).fit([*texts, "empty"])
        raw = self.labs.transform(examples)
        if fit:
            self.scaler = StandardScaler().fit(raw)
        lab = self.scaler.transform(raw)
        text = self.tfidf.transform(texts)
        if self.kind == "logistic":
            return sparse.hstack([sparse.csr_matrix(lab), text]).tocsr()
        if fit:
            k = max(1, min(64, text.shape[1] - 1, len(examples) - 1))
            self.svd = TruncatedSVD(k, random_state=self.seed).fit(text)
        return np.hstack([lab, self.svd.transform(text)])

    @property
    def lab_columns(self) -> int:
        """How many of `matrix`'s first columns are lab features (after `matrix(fit=True)`)."""
        return int(self.scaler.n_features_in_)

    def fit(self, train: Sequence[Example], valid: Sequence[Example],
            disorders: Sequence[str], min_precision: float = 0.8) -> FeatureClassifier:
        from sklearn.ensemble import HistGradientBoostingClassifier
        from sklearn.linear_model import LogisticRegression

        self.disorders = list(disorders)
        x = self.matrix(train, fit=True)
        y = label_matrix(train, disorders)
        self.base_rates = base_rates(y, disorders)
        for j in range(len(disorders)):
            pos = int(y[:, j].sum())
            if pos == 0 or pos == len(y):
                self.constant[j] = float(pos > 0)
                continue
            if self.kind == "logistic":
                m: Any = LogisticRegression(C=1.0, class_weight="balanced", max_iter=2000)
            else:
                m = HistGradientBoostingClassifier(max_iter=100, learning_rate=0.1,
                                                   max_leaf_nodes=15, min_samples_leaf=5,
                                                   random_state=self.seed)
            self.models[j] = m.fit(x, y[:, j])
        if valid:
            yv = label_matrix(valid, disorders)
            cols = yv.sum(0) > 0
            self.threshold, self.thresholds = tune_thresholds(
                yv[:, cols], self.proba(valid)[:, cols],
                [d for d, k in zip(disorders, cols, strict=True) if k], min_precision)
        return self

    def proba(self, examples: Sequence[Example]) -> np.ndarray:
        x = self.matrix(examples)
        out = np.zeros((len(examples), len(self.disorders)))
        for j, c in self.constant.items():
            out[:, j] = c
        for j, m in self.models.items():
            out[:, j] = m.predict_proba(x)[:, 1]
        return out

    def outputs(self, examples: Sequence[Example], kg: KnowledgeGraph,
                min_confidence: float, max_codes: int = 3) -> SystemOutput:
        probs = self.proba(examples)
        concluded, closed = decide(kg, probs, self.disorders, examples, self.threshold,
                                   self.thresholds, max_codes, self.base_rates)
        pred = concluded
        abstained, rationales = [], []
        trained = sorted(self.models)
        for i, ex in enumerate(examples):
            no_input = (ex.labs is None or ex.labs.empty) and not ex.notes
            flag, _ = abstain([float(probs[i, j]) for j in trained], self.threshold,
                              min_confidence) if trained else (True, "")
            abstained.append(no_input or flag)
            names = []
            for j in np.flatnonzero(pred[i]):
                d = kg.disorder(self.disorders[j])
                names.append((self.disorders[j], d.term if d else self.disorders[j]))
            rationales.append(template_rationale(ex, names))
        return SystemOutput(self.name, probs, closed, abstained, rationales, "template",
                            {"threshold": self.threshold, "thresholds": self.thresholds,
                             "concluded": concluded})
