"""Every metric an alert names is exported, and the dedicated alert metrics count what their
alerts say (issue 15, item 5).

The PrometheusRule's expressions are read from the chart's template itself (no helm needed), each
metric name in them is looked up among what clinragen_fhir.metrics registers (its collectors'
names as a scrape shows them: `_total` for counters, `_bucket`/`_sum`/`_count` for histograms),
and the code paths that feed them are run: a token endpoint failing or refusing, the FHIR server
answering 401/403, a task dead-lettered, the webhook refusing, queueing and failing to queue.
tests/unit/test_deploy_static.py checks the rendered chart with helm.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import prometheus_client
import pytest
from pydantic import SecretStr
from starlette.testclient import TestClient

from clinragen_fhir import metrics
from clinragen_fhir.fhir.auth import ClientCredentialsAuth, TokenError
from clinragen_fhir.webhook import WebhookConfig, make_app

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "deploy" / "helm" / "clinragen" / "templates" / "metrics.yaml"
SECRET = b"0123456789abcdef-secret"
# PromQL words that are not metric names
PROMQL = {"sum", "max", "min", "avg", "count", "rate", "increase", "irate", "clamp_min",
          "clamp_max", "by", "without", "on", "ignoring", "group_left", "group_right", "and",
          "or", "unless", "bool", "offset", "vector", "absent", "histogram_quantile", "e"}


def alert_expressions() -> dict[str, str]:
    """alert name -> its `expr`, one line or a folded (`>-`) block, template parts removed."""
    text = RULES.read_text()
    out: dict[str, str] = {}
    for block in re.split(r"\n\s*- alert: ", text)[1:]:
        name, body = block.split("\n", 1)
        lines = body.splitlines()
        i = next(n for n, line in enumerate(lines) if line.strip().startswith("expr:"))
        first = lines[i].split("expr:", 1)[1].strip()
        if first in (">-", ">", "|", "|-"):
            indent = len(lines[i + 1]) - len(lines[i + 1].lstrip())
            expr = " ".join(line.strip() for line in _block(lines[i + 1:], indent))
        else:
            expr = first
        out[name.strip()] = re.sub(r"\{\{.*?\}\}", "0", expr)
    return out


def _block(lines: list[str], indent: int) -> list[str]:
    taken = []
    for line in lines:
        if line.strip() and len(line) - len(line.lstrip()) < indent:
            break
        taken.append(line)
    return taken


def metric_names(expr: str) -> set[str]:
    """The metric names in a PromQL expression: identifiers that are not functions, keywords,
    label names, label values, ranges or numbers."""
    expr = re.sub(r'"[^"]*"', "", expr)  # label values
    expr = re.sub(r"\{[^}]*\}", "", expr)  # label matchers
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # ranges
    expr = re.sub(r"\b(by|without|on|ignoring)\s*\([^)]*\)", "", expr)  # grouping labels
    names = set()
    for match in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", expr):
        word, rest = match.group(0), expr[match.end():].lstrip()
        if word in PROMQL or rest.startswith("(") or expr[match.start() - 1:match.start()
                                                            ].isdigit():
            continue  # a function, a keyword, or a number's exponent (1e-9)
        names.add(word)
    return names


def exported() -> set[str]:
    """Every sample name clinragen_fhir.metrics makes a scrape show (the worker's registry:
    its module-level metrics and the queue depth collector)."""
    families = list(prometheus_client.REGISTRY.collect())
    families += list(metrics.QueueDepth("memory://", "clinragen").describe())
    names = set()
    for family in families:
        if not family.name.startswith("clinragen_"):
            continue
        if family.type == "counter":
            names.add(f"{family.name}_total")
        elif family.type == "histogram":
            names |= {f"{family.name}_{s}" for s in ("bucket", "sum", "count")}
        else:
            names.add(family.name)
    return names


def test_the_expression_parser_finds_metric_names() -> None:
    assert metric_names('sum(rate(a_total{outcome=~"x|y"}[10m])) / clamp_min(sum(rate(b[10m])),'
                        ' 1e-9) > 0') == {"a_total", "b"}
    assert metric_names("max(q{queue=\"clinragen\"}) > 0") == {"q"}


def test_every_metric_an_alert_names_is_exported() -> None:
    rules = alert_expressions()
    assert set(rules) >= {"ClinragenQueueDepthHigh", "ClinragenDeadLetters",
                          "ClinragenTaskFailures", "ClinragenTokenFailures"}
    known = exported()
    for alert, expr in rules.items():
        used = metric_names(expr)
        assert used, (alert, expr)
        assert used <= known, (alert, used - known)
    # each alert watches its own, dedicated metric
    assert "clinragen_queue_depth" in metric_names(rules["ClinragenQueueDepthHigh"])
    assert metric_names(rules["ClinragenDeadLetters"]) == {"clinragen_dead_letters_total"}
    assert metric_names(rules["ClinragenTaskFailures"]) == {"clinragen_tasks_total"}
    assert metric_names(rules["ClinragenTokenFailures"]) == {"clinragen_token_failures_total"}
    assert metric_names(rules["ClinragenWebhookEnqueueFailures"]) == {
        "clinragen_webhook_enqueue_failures_total"}
    assert metric_names(rules["ClinragenWebhookAuthFailures"]) == {
        "clinragen_webhook_auth_failures_total"}


def value(name: str, **labels: str) -> float:
    return prometheus_client.REGISTRY.get_sample_value(name, labels) or 0.0


Answer = Callable[[httpx.Request], httpx.Response]


@pytest.mark.parametrize(("answer", "reason"), [
    (lambda r: (_ for _ in ()).throw(httpx.ConnectError("down", request=r)), "unreachable"),
    (lambda r: httpx.Response(503), "unavailable"),
    (lambda r: httpx.Response(401, json={"error": "invalid_client"}), "refused"),
    (lambda r: httpx.Response(200, json={"token_type": "bearer"}), "invalid")])
def test_token_endpoint_failures_are_counted(answer: Answer, reason: str) -> None:
    auth = ClientCredentialsAuth("http://127.0.0.1:9/token", "cc", SecretStr("cc-secret-value"),
                                 transport=httpx.MockTransport(answer))
    before = value("clinragen_token_failures_total", reason=reason)
    with pytest.raises(TokenError):
        auth.token()
    assert value("clinragen_token_failures_total", reason=reason) == before + 1


def test_a_refused_token_at_the_fhir_server_is_a_token_failure() -> None:
    before = {s: value("clinragen_token_failures_total", reason=f"fhir-{s}") for s in (401, 403)}
    for status in (200, 401, 403, 500, None):
        metrics.observe_fhir("GET", status)
    for status in (401, 403):
        assert value("clinragen_token_failures_total", reason=f"fhir-{status}") == \
            before[status] + 1


def test_a_dead_lettered_task_is_counted(monkeypatch: pytest.MonkeyPatch) -> None:
    from clinragen_fhir.config import Settings
    from clinragen_fhir.worker import tasks
    from tests.unit.test_log_grep import FakeState

    state = FakeState()
    monkeypatch.setattr(tasks, "load_runtime", lambda: (Settings(), None, None))
    monkeypatch.setattr(tasks, "WorkerState", lambda url: state)

    def fails(*_: Any, **__: Any) -> None:
        raise ValueError("boom")

    monkeypatch.setattr(tasks, "diagnose_patient", fails)
    before = value("clinragen_dead_letters_total", task="clinragen.diagnose")
    assert tasks.diagnose.apply(("p-1",)).failed()
    assert value("clinragen_dead_letters_total", task="clinragen.diagnose") == before + 1
    assert len(state.letters) == 1


class Seen:
    def add(self, key: str, ttl_s: int) -> bool:
        return key != "event:dup"  # nothing else repeats here


def test_the_webhook_counts_outcomes_refusals_and_enqueue_failures() -> None:
    queued: list[str] = []
    broker_up = [True]

    def enqueue(pid: str, countdown: int) -> None:
        if not broker_up[0]:
            raise ConnectionError("broker down")
        queued.append(pid)

    client = TestClient(make_app(WebhookConfig(secret=SECRET), Seen(), enqueue))
    ok = {"X-Clinragen-Secret": SECRET.decode()}
    names = ("accepted", "unauthorised", "unavailable", "empty", "delete", "invalid")
    before = {n: value("clinragen_webhook_requests_total", outcome=n) for n in names}
    auth_before = {r: value("clinragen_webhook_auth_failures_total", reason=r)
                   for r in ("wrong-secret", "no-credentials")}
    enqueue_before = value("clinragen_webhook_enqueue_failures_total", task="diagnose")

    assert client.post("/notify", json={"resourceType": "Patient", "id": "p1"},
                       headers=ok).status_code == 202
    assert client.post("/notify", content=b"{}", headers={
        "X-Clinragen-Secret": "wrong-secret-0123456"}).status_code == 401
    assert client.post("/notify", content=b"{}").status_code == 401
    assert client.post("/notify", content=b"", headers=ok).status_code == 200
    assert client.post("/notify", content=b"[1", headers=ok).status_code == 400
    assert client.delete("/notify/Patient/p1", headers=ok).status_code == 200
    broker_up[0] = False
    assert client.put("/notify/Patient/p2", json={"resourceType": "Patient", "id": "p2"},
                      headers=ok).status_code == 503

    assert queued == ["p1"]
    counts = {n: value("clinragen_webhook_requests_total", outcome=n) - before[n]
              for n in names}
    assert counts == {"accepted": 1, "unauthorised": 2, "unavailable": 1, "empty": 1,
                      "delete": 1, "invalid": 1}
    assert value("clinragen_webhook_auth_failures_total", reason="wrong-secret") == \
        auth_before["wrong-secret"] + 1
    assert value("clinragen_webhook_auth_failures_total", reason="no-credentials") == \
        auth_before["no-credentials"] + 1
    assert value("clinragen_webhook_enqueue_failures_total", task="diagnose") == \
        enqueue_before + 1
