"""The worker's /metrics binds the configured address (loopback unless a site says otherwise)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import prometheus_client
import pytest
from click.testing import CliRunner

from clinragen_fhir import metrics
from clinragen_fhir.cli import main
from clinragen_fhir.config import Settings, WorkerSettings
from clinragen_fhir.worker import app as app_module


def test_the_default_bind_is_loopback() -> None:
    assert WorkerSettings().metrics_host == "127.0.0.1"


def test_serve_passes_the_host_to_the_server(monkeypatch: pytest.MonkeyPatch,
                                             tmp_path: Path) -> None:
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    calls: list[tuple[int, str]] = []

    def start(port: int, addr: str = "0.0.0.0", **_: Any) -> None:
        calls.append((port, addr))

    monkeypatch.setattr(prometheus_client, "start_http_server", start)
    metrics.serve(9808, "memory://", "clinragen", host="10.0.0.5")
    metrics.serve(9809, "memory://", "clinragen")
    assert calls == [(9808, "10.0.0.5"), (9809, "127.0.0.1")]


def test_the_worker_command_binds_the_configured_host(monkeypatch: pytest.MonkeyPatch,
                                                      tmp_path: Path) -> None:
    served: list[tuple[int, str]] = []
    monkeypatch.setattr(metrics, "serve", lambda port, broker, queue, host="?":
                        served.append((port, host)))
    monkeypatch.setattr(app_module.app, "worker_main", lambda argv: None)
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    monkeypatch.setenv("CLINRAGEN_BROKER_URL", "memory://")
    monkeypatch.setenv("CLINRAGEN_WORKER__METRICS_PORT", "9808")
    monkeypatch.setenv("CLINRAGEN_WORKER__METRICS_HOST", "0.0.0.0")
    assert Settings().worker.metrics_host == "0.0.0.0"
    result = CliRunner().invoke(main, ["worker"])
    assert result.exit_code == 0, result.output
    assert served == [(9808, "0.0.0.0")]


@pytest.mark.parametrize("command", ["webhook", "cds-hooks"])
def test_the_webhook_and_cds_hooks_metrics_bind_like_the_workers(
        command: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """`--metrics-port` serves this process's metrics on `--metrics-host`, or else on
    `worker.metrics_host` (loopback unless a site sets it): no hard-coded 127.0.0.1."""
    import uvicorn

    from clinragen_fhir import cds_hooks

    served: list[tuple[int, str]] = []
    monkeypatch.setattr(prometheus_client, "start_http_server",
                        lambda port, addr="0.0.0.0", **_: served.append((port, addr)))
    monkeypatch.setattr(uvicorn, "run", lambda *a, **k: None)
    monkeypatch.setattr(cds_hooks, "create_app", lambda host: None)
    monkeypatch.setenv("CLINRAGEN_BROKER_URL", "memory://")
    assert CliRunner().invoke(main, [command, "--metrics-port", "9810"]).exit_code == 0
    monkeypatch.setenv("CLINRAGEN_WORKER__METRICS_HOST", "0.0.0.0")
    assert CliRunner().invoke(main, [command, "--metrics-port", "9811"]).exit_code == 0
    result = CliRunner().invoke(main, [command, "--metrics-port", "9812",
                                       "--metrics-host", "10.0.0.7"])
    assert result.exit_code == 0, result.output
    assert CliRunner().invoke(main, [command]).exit_code == 0  # no port: no server
    assert served == [(9810, "127.0.0.1"), (9811, "0.0.0.0"), (9812, "10.0.0.7")]


@pytest.mark.parametrize(("command", "section"), [("webhook", "WEBHOOK"),
                                                  ("cds-hooks", "CDS_HOOKS")])
def test_the_webhook_and_cds_hooks_metrics_are_settings_the_options_override(
        command: str, section: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """`[webhook]` / `[cds_hooks]` metrics_port and metrics_host (check-config reports them);
    `--metrics-port/--metrics-host` still override them, `--metrics-port 0` turns it off."""
    import uvicorn

    from clinragen_fhir import cds_hooks

    served: list[tuple[int, str]] = []
    monkeypatch.setattr(prometheus_client, "start_http_server",
                        lambda port, addr="0.0.0.0", **_: served.append((port, addr)))
    monkeypatch.setattr(uvicorn, "run", lambda *a, **k: None)
    monkeypatch.setattr(cds_hooks, "create_app", lambda host: None)
    monkeypatch.setenv("CLINRAGEN_BROKER_URL", "memory://")
    monkeypatch.delenv("CLINRAGEN_WORKER__METRICS_HOST", raising=False)
    monkeypatch.setenv(f"CLINRAGEN_{section}__METRICS_PORT", "9813")
    assert CliRunner().invoke(main, [command]).exit_code == 0
    monkeypatch.setenv(f"CLINRAGEN_{section}__METRICS_HOST", "10.0.0.8")
    assert CliRunner().invoke(main, [command]).exit_code == 0
    assert CliRunner().invoke(main, [command, "--metrics-port", "9814", "--metrics-host",
                                     "10.0.0.9"]).exit_code == 0
    assert CliRunner().invoke(main, [command, "--metrics-port", "0"]).exit_code == 0
    assert served == [(9813, "127.0.0.1"), (9813, "10.0.0.8"), (9814, "10.0.0.9")]
