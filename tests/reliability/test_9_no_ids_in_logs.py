"""7 (cont.). Secrets and patient identifiers never appear in logs.

Runs last (file order): greps every log line of every worker and receiver process the suite
ran in this session (.run/reliability/logs/) for every patient id the suite created and every
secret it handed out (bearer token, webhook secret, log-hash key). The bearer token is handed
out with a trailing newline, as a token file has one. The same grep over a token with a newline,
a failing transport and page-2 errors, at the unit level: tests/unit/test_log_grep.py.
"""

from __future__ import annotations

import pytest

from clinragen_fhir.logs import hash_id
from tests.reliability.stack import LOG_ID_KEY, LOGS, PATIENT_IDS, SECRETS, record

pytestmark = pytest.mark.integration


def test_no_patient_id_or_secret_in_any_log_line(monkeypatch: pytest.MonkeyPatch) -> None:
    files = sorted(LOGS.glob("*.log"))
    if not files or not PATIENT_IDS:
        pytest.fail("no suite logs or patients in this session: run the suite, not this file "
                    "alone (it greps what the other scenarios logged)")
    lines = [line for f in files for line in f.read_text(errors="replace").splitlines()]
    leaks = {s: sum(s in line for line in lines) for s in (*SECRETS, *PATIENT_IDS)}
    leaked = {("secret" if s in SECRETS else "patient id"): n for s, n in leaks.items() if n}
    monkeypatch.setenv("CLINRAGEN_LOG_ID_KEY", LOG_ID_KEY)
    hashed = sum(any(hash_id(p) in line for line in lines) for p in sorted(PATIENT_IDS)[:200])
    record("log_grep", {"files": len(files), "lines": len(lines),
                        "patient_ids_searched": len(PATIENT_IDS), "secrets_searched":
                        len(SECRETS), "hits": sum(leaks.values()),
                        "patients_seen_as_keyed_hash": hashed})
    assert not leaked, f"found in logs: {leaked}"
    assert len(lines) > 100
    assert hashed > 0  # the logs do talk about patients, by keyed hash only
