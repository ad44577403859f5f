"""Soft/hard Celery time limits come from the config, in a safe order."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from clinragen_fhir.config import Settings, WorkerSettings
from clinragen_fhir.worker.app import make_app


def test_time_limits_reach_the_celery_app(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CLINRAGEN_WORKER__SOFT_TIME_LIMIT_S", "20")
    monkeypatch.setenv("CLINRAGEN_WORKER__TIME_LIMIT_S", "30")
    monkeypatch.setenv("CLINRAGEN_WORKER__VISIBILITY_TIMEOUT_S", "90")
    app = make_app(Settings())
    assert (app.conf.task_soft_time_limit, app.conf.task_time_limit) == (20, 30)
    assert app.conf.broker_transport_options["visibility_timeout"] == 90


@pytest.mark.parametrize("soft,hard,visibility", [(30, 30, 90), (40, 30, 90), (20, 90, 90),
                                                  (0, 30, 90)])
def test_limits_out_of_order_are_refused(soft: int, hard: int, visibility: int) -> None:
    with pytest.raises(ValidationError, match="soft_time_limit_s < time_limit_s"):
        WorkerSettings(soft_time_limit_s=soft, time_limit_s=hard,
                       visibility_timeout_s=visibility)
