"""Trigger: backfill with `clinragen-fhir diagnose-all --query`, resumable from a checkpoint."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable

import pytest

from clinragen_fhir.config import Settings
from clinragen_fhir.fhir.client import FhirClient
from clinragen_fhir.worker.state import WorkerState, backfill_key
from tests.integration.hospital import cli, new_patient, our_reports, wait_for  # noqa: F401

pytestmark = pytest.mark.integration
NewPatient = Callable[[list[tuple[float, int]]], str]


def state() -> WorkerState:
    return WorkerState(Settings().state_url)


def test_local_backfill_resumes_where_it_stopped(fhir: FhirClient,
                                                 new_patient: NewPatient) -> None:  # noqa: F811
    pids = [new_patient([(7.0 + i / 10, 15)]) for i in range(3)]
    query = f"Patient?_id={','.join(pids)}"
    run = backfill_key(os.environ["CLINRAGEN_FHIR__BASE_URL"], query)
    state().reset_backfill(run)
    state().mark_done(run, pids[0])  # as if an earlier run had finished the first patient
    first = cli("diagnose-all", "--query", query, "--local")
    assert first.returncode == 0, first.stderr
    assert "1 already done by an earlier run" in first.stdout
    assert "| reports written | 2 |" in first.stdout
    assert our_reports(fhir, pids[0]) == []  # skipped: the checkpoint said it was done
    assert state().backfill_done(run) == set(pids)
    again = cli("diagnose-all", "--query", query, "--local")
    assert "3 already done" in again.stdout and "| patients | 0 |" in again.stdout
    redo = cli("diagnose-all", "--query", query, "--local", "--restart")
    assert "| patients | 3 |" in redo.stdout
    assert "| reports written | 1 |" in redo.stdout  # pids[0], never diagnosed before
    assert "| reports already present | 2 |" in redo.stdout


def test_queued_backfill_is_checkpointed_by_the_worker(
        fhir: FhirClient, worker: subprocess.Popen[bytes],
        new_patient: NewPatient) -> None:  # noqa: F811
    pids = [new_patient([(6.8, 40)]) for _ in range(2)]
    query = f"Patient?_id={','.join(pids)}"
    run = backfill_key(os.environ["CLINRAGEN_FHIR__BASE_URL"], query)
    state().reset_backfill(run)
    queued = cli("diagnose-all", "--query", query)  # no --wait: the worker records progress
    assert queued.returncode == 0 and "queued 2 tasks" in queued.stdout, queued.stderr
    wait_for("the worker to checkpoint both patients",
             lambda: state().backfill_done(run) == set(pids), 120)
    assert all(len(our_reports(fhir, p)) == 1 for p in pids)
    rerun = cli("diagnose-all", "--query", query, "--wait")
    assert "2 already done" in rerun.stdout and "| patients | 0 |" in rerun.stdout
