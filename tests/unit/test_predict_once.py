"""A run whose current report was written from the very same inputs by the very same model
makes no prediction (issue 16, item 7): a redelivered task or an unchanged re-run costs reads,
not a generation. Anything the prediction depends on changing predicts again."""

from __future__ import annotations

from typing import Any

import httpx

from clinragen_fhir.config import ReportSettings
from clinragen_fhir.fhir.client import FhirClient
from clinragen_fhir.identity import RULE_BASELINE
from clinragen_fhir.pipeline import diagnose_patient
from clinragen_fhir.predict.rules import RuleBaseline
from clinragen_fhir.predict.types import Identity, Prediction
from clinragen_fhir.report.fingerprint import INPUTS_EXT
from tests.fhir_batch import batching
from tests.unit.test_report_lifecycle import KG, PID, VersionedServer


class Counted:
    """The rule baseline, counting its predictions; `version` stands for a retrained model."""

    name = "knowledge-rule-baseline"

    def __init__(self, version: str = "1") -> None:
        self.inner, self.version, self.calls = RuleBaseline(KG), version, 0

    def identity(self) -> Identity:
        return self.name, self.version, KG.version, RULE_BASELINE

    def predict(self, *args: Any) -> Prediction:
        self.calls += 1
        p = self.inner.predict(*args)
        p.method_version = self.version
        return p


def run(server: VersionedServer, predictor: Any) -> Any:
    with FhirClient("http://127.0.0.1:9/fhir",
                    transport=httpx.MockTransport(batching(server.handler)),
                    retries=0) as client:
        return diagnose_patient(client, KG, predictor, PID, ReportSettings(audit_events=False))


def test_the_same_inputs_and_model_predict_once() -> None:
    server, predictor = VersionedServer(), Counted()
    first = run(server, predictor)
    assert (first.status, predictor.calls) == ("written", 1)
    (report,) = server.current("DiagnosticReport")
    assert any(e["url"] == INPUTS_EXT for e in report["extension"])
    again = run(server, predictor)  # redelivered: the report is there, nothing to generate
    assert (again.status, predictor.calls, len(server.transactions)) == ("exists", 1, 1)
    assert (again.report_id, again.version, again.identifier, again.diagnoses) == (
        first.report_id, first.version, first.identifier, first.diagnoses)


def test_a_changed_input_or_model_predicts_again() -> None:
    server, predictor = VersionedServer(), Counted()
    run(server, predictor)
    server.a1c = 5.0  # the reading corrected
    assert run(server, predictor).status == "written" and predictor.calls == 2
    retrained = Counted("2")
    assert run(server, retrained).status == "written" and retrained.calls == 1


def test_a_predictor_that_does_not_say_who_it_is_always_predicts() -> None:
    server, predictor = VersionedServer(), Counted()
    run(server, predictor)

    class Anonymous:
        name = predictor.name

        def __init__(self) -> None:
            self.calls = 0

        def predict(self, *args: Any) -> Prediction:
            self.calls += 1
            return predictor.predict(*args)

    anonymous = Anonymous()
    assert run(server, anonymous).status == "exists" and anonymous.calls == 1
