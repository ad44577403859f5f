"""Which predictor the worker runs: the ONNX model when a model directory is configured, the
rule baseline otherwise, and the baseline (saying so in the report) when the model cannot be
used for the whole worker or for one patient."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from clinragen_fhir.encoding.schema import Note, PatientContext
from clinragen_fhir.identity import RULE_BASELINE
from clinragen_fhir.inference.errors import InputTooLong, ModelUnavailable
from clinragen_fhir.knowledge import KnowledgeGraph, Retrieval
from clinragen_fhir.predict.rules import RuleBaseline
from clinragen_fhir.predict.types import Identity, Prediction, Predictor

if TYPE_CHECKING:
    from clinragen_fhir.config import InferenceSettings
    from clinragen_fhir.inference.predictor import OnnxPredictor

log = logging.getLogger(__name__)


def fallback_note(reason: str) -> str:
    return (f"Note: the ClinRaGen model was not used ({reason}); this report was written by the "
            "knowledge-rule baseline.")


class ModelOrBaseline:
    """The ONNX predictor, or the rule baseline with the reason written into the rationale."""

    def __init__(self, model: OnnxPredictor | None, baseline: RuleBaseline,
                 reason: str = "") -> None:
        self.model = model
        self.baseline = baseline
        self.reason = reason
        self.name = model.name if model is not None else baseline.name
        # seconds per stage of the last predict / predict_batch call (the pipeline shares them
        # out over the batch's patients: Outcome.timings): featurise_s (knowledge retrieval and
        # the model's input arrays), prefix_s (the prefix graph: encoders, knowledge attention,
        # diagnosis head), prefill_s (the decoder over the prefix), decode_s (cached steps)
        self.stage_seconds: dict[str, float] = {}
        if model is not None:
            _time_stages(model, self.stage_seconds)

    def identity(self) -> Identity:
        """The maker its predictions name (`predict.types.declared_identity`): the model's, or
        the baseline's when there is no model (a patient the model refuses, `InputTooLong`, is
        the baseline's too, under the baseline's report key)."""
        if self.model is None:
            return self.baseline.identity()
        cfg = self.model.model.config
        return (self.model.name, cfg.method_version, cfg.knowledge_version,
                self.model.model_id or RULE_BASELINE)

    def predict_batch(self, items: Sequence[tuple[pd.DataFrame, Sequence[Note],
                                                  PatientContext]]) -> list[Prediction]:
        """`OnnxPredictor.predict_batch` (`inference.batch_size` patients per graph call); a
        batch with a patient over the model's limits is run again one at a time, so only that
        patient gets the baseline."""
        self.stage_seconds.clear()
        if self.model is None:
            return [self.predict(*item) for item in items]
        try:
            return self.model.predict_batch(items)
        except InputTooLong:
            self.stage_seconds.clear()
            return [self._predict(*item) for item in items]

    def predict(self, labs: pd.DataFrame, notes: Sequence[Note],
                patient: PatientContext) -> Prediction:
        self.stage_seconds.clear()
        return self._predict(labs, notes, patient)

    def _predict(self, labs: pd.DataFrame, notes: Sequence[Note],
                 patient: PatientContext) -> Prediction:
        if self.model is not None:
            try:
                return self.model.predict(labs, notes, patient)
            except InputTooLong as exc:
                log.warning("model input too long, rule baseline used", extra={"fields": {
                    "error": str(exc)}})
                return self._baseline(labs, notes, patient, exc.short, exc.retrieval)
        return self._baseline(labs, notes, patient, self.reason)

    def _baseline(self, labs: pd.DataFrame, notes: Sequence[Note], patient: PatientContext,
                  reason: str, retrieval: Retrieval | None = None) -> Prediction:
        p = self.baseline.predict(labs, notes, patient, retrieval)
        p.rationale = f"{fallback_note(reason)}\n{p.rationale}".strip()
        return p


def _time_stages(model: OnnxPredictor, into: dict[str, float]) -> None:
    """Add each stage's seconds to `into` as the predictor runs (wrapping the bound methods of
    this one predictor and its session object; nothing else changes)."""
    def timed(fn: Callable[..., Any], stage: Callable[..., str]) -> Callable[..., Any]:
        def run(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                name = stage(*args, **kwargs)
                into[name] = into.get(name, 0.0) + time.perf_counter() - started
        return run

    onnx = getattr(model, "model", None)  # absent on stand-ins for the model (tests)
    if hasattr(model, "featurise"):
        model.featurise = timed(model.featurise, lambda *a, **k: "featurise_s")  # type: ignore
    if hasattr(onnx, "run_prefix") and hasattr(onnx, "step"):
        onnx.run_prefix = timed(onnx.run_prefix, lambda *a, **k: "prefix_s")  # type: ignore
        onnx.step = timed(onnx.step, lambda *a, **k:  # type: ignore  # step(embeds, mask,
                          "prefill_s" if (a[3] if len(a) > 3 else k.get("past")) is None
                          else "decode_s")  # positions, past): past None is the prefill


def build_predictor(model_dir: Path | None, kg: KnowledgeGraph,
                    settings: InferenceSettings | None = None) -> Predictor:
    """The worker's predictor. A configured but unusable model is logged as an error once and
    every report says the baseline wrote it; an unconfigured one is the plain baseline."""
    baseline = RuleBaseline(kg)
    if model_dir is None:
        return baseline
    from clinragen_fhir.config import InferenceSettings
    from clinragen_fhir.inference.predictor import OnnxPredictor

    s = settings or InferenceSettings()
    try:
        model = OnnxPredictor.load(model_dir, kg, s.precision, s.provider, s.threads,
                                   s.batch_size, s.constrained, s.max_new_tokens,
                                   s.verify_hashes)
    except ModelUnavailable as exc:
        log.error("model unavailable, rule baseline used", extra={"fields": {"error": str(exc)}})
        return ModelOrBaseline(None, baseline, exc.short)
    if model.model.config.knowledge_version != kg.version:
        log.warning("knowledge graph differs from the model's", extra={"fields": {
            "graph": kg.version, "model": model.model.config.knowledge_version}})
    return ModelOrBaseline(model, baseline)
