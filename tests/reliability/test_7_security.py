"""7. Security at the suite level, against a running receiver (`clinragen-fhir webhook`, uvicorn)
and a real worker: unauthenticated, forged, replayed and oversized notifications are refused;
an authentic one ends as a report; plain http to a non-loopback FHIR host is refused by the
real CLI before any connection. The log grep over every process the suite ran is
tests/reliability/test_9_no_ids_in_logs.py (it runs last).

Unit tests that cover the same ground at the function level: tests/unit/test_webhook.py
(header secret, HMAC, stale/forged, duplicates, size limits), tests/unit/test_fhir_client.py::
test_plain_http_to_remote_host_refused_unless_allowed and ::test_tls_verification_is_on_by_default,
tests/unit/test_auth.py::test_mutual_tls_and_verification_on_by_default.
"""

from __future__ import annotations

import base64
import json
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import httpx
import pytest
import redis as redis_lib

from clinragen_fhir.config import FhirEndpoint
from clinragen_fhir.fhir.errors import FhirConfigError
from clinragen_fhir.webhook import (
    MAX_BODY_BYTES,
    SECRET_HEADER,
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    sign,
)
from tests.reliability.stack import (
    LOGS,
    PATIENT_IDS,
    ROOT,
    WEBHOOK_SECRET,
    Hapi,
    Redis,
    Worker,
    base_env,
    make_patients,
    record,
    reports_by_patient,
    wait_until,
)

pytestmark = pytest.mark.integration
KEY = WEBHOOK_SECRET.encode()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture()
def receiver(hapi: Hapi, clean_redis: Redis) -> Iterator[str]:
    port = _free_port()
    LOGS.mkdir(parents=True, exist_ok=True)
    env = base_env(hapi.url, clean_redis, CLINRAGEN_WEBHOOK_SECRET=WEBHOOK_SECRET,
                   CLINRAGEN_WEBHOOK__DEBOUNCE_S="1")
    with open(LOGS / "webhook.log", "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "clinragen_fhir.cli", "webhook",
                                 "--host", "127.0.0.1", "--port", str(port)], env=env,
                                stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    base = f"http://127.0.0.1:{port}"

    def up() -> bool:
        if proc.poll() is not None:
            raise RuntimeError((LOGS / "webhook.log").read_text()[-2000:])
        try:
            return httpx.get(f"{base}/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False
    wait_until("webhook receiver", up, 60, 0.3)
    yield base
    proc.terminate()
    proc.wait(30)


def _queued(redis: Redis) -> list[str]:
    """Patient ids of the diagnose tasks waiting in the broker queue."""
    r = redis_lib.Redis.from_url(redis.url(0))
    out = []
    for raw in r.lrange("clinragen", 0, -1):  # type: ignore[union-attr]
        message = json.loads(raw)
        args = json.loads(base64.b64decode(message["body"]))[0]
        out.append(str(args[0]))
    return out


def obs_for(pid: str, oid: str = "o1") -> bytes:
    return json.dumps({"resourceType": "Observation", "id": oid, "status": "final",
                       "subject": {"reference": f"Patient/{pid}"}}).encode()


def test_receiver_refuses_unauthenticated_forged_replayed_and_oversized(
        receiver: str, clean_redis: Redis) -> None:
    figures: dict[str, object] = {}
    body = obs_for("rel-sec-nobody")
    PATIENT_IDS.add("rel-sec-nobody")
    with httpx.Client(timeout=30) as http:
        def post(content: object, headers: dict[str, str], path: str = "/notify",
                 method: str = "POST") -> httpx.Response:
            return http.request(method, receiver + path, content=content,  # type: ignore[arg-type]
                                headers={"Content-Type": "application/fhir+json", **headers})

        now = str(int(time.time()))
        cases = {
            "unauthenticated": post(body, {}),
            "unauthenticated_hapi_put": post(body, {}, "/notify/Observation/o1", "PUT"),
            "wrong_secret": post(body, {SECRET_HEADER: "x" * len(WEBHOOK_SECRET)}),
            "forged_signature_other_key": post(body, {
                SIGNATURE_HEADER: sign(b"not-the-key-0123456789", now, body),
                TIMESTAMP_HEADER: now}),
            "tampered_body": post(body.replace(b"nobody", b"someone"), {
                SIGNATURE_HEADER: sign(KEY, now, body), TIMESTAMP_HEADER: now}),
            "stale_timestamp": post(body, {
                SIGNATURE_HEADER: sign(KEY, str(int(time.time()) - 3600), body),
                TIMESTAMP_HEADER: str(int(time.time()) - 3600)}),
        }
        for name, answer in cases.items():
            assert answer.status_code == 401, (name, answer.status_code, answer.text)
            assert WEBHOOK_SECRET not in answer.text
        figures.update({k: v.status_code for k, v in cases.items()})
        assert _queued(clean_redis) == []

        # authentic and signed: accepted once; the very same request replayed: not queued again
        signed_headers = {SIGNATURE_HEADER: sign(KEY, now, body), TIMESTAMP_HEADER: now}
        first = post(body, signed_headers)
        replay = post(body, signed_headers)
        replay_header_secret = post(body, {SECRET_HEADER: WEBHOOK_SECRET})
        assert first.status_code == 202 and first.json()["accepted"] == 1
        assert replay.status_code == 200 and replay.json()["reason"] == "duplicate"
        assert replay_header_secret.json()["reason"] == "duplicate"
        figures.update({"signed_first": first.status_code, "signed_replay": replay.status_code})
        assert _queued(clean_redis) == ["rel-sec-nobody"]

        # oversized: declared by Content-Length, and streamed (chunked) without one
        big = b"{" + b" " * MAX_BODY_BYTES + b"}"
        declared = post(big, {SECRET_HEADER: WEBHOOK_SECRET})

        def chunks() -> Iterator[bytes]:
            for _ in range(MAX_BODY_BYTES // 65536 + 2):
                yield b" " * 65536
        streamed = post(chunks(), {SECRET_HEADER: WEBHOOK_SECRET})
        unauthenticated_big = post(big, {})
        assert declared.status_code == 413 and streamed.status_code == 413
        assert unauthenticated_big.status_code == 413  # refused before reading it whole
        figures.update({"oversized_declared": declared.status_code,
                        "oversized_chunked": streamed.status_code})
        assert _queued(clean_redis) == ["rel-sec-nobody"]
    record("security_webhook", {"answers": figures, "queued_after_all": 1})


def test_authentic_notification_ends_as_a_report(hapi: Hapi, receiver: str,
                                                  clean_redis: Redis) -> None:
    (pid,) = make_patients(hapi.url, "sec", 1)
    worker = Worker("security", base_env(hapi.url, clean_redis))
    try:
        worker.start()
        worker.ready()
        answer = httpx.put(f"{receiver}/notify/Observation/{pid}-a1c-0",
                           content=obs_for(pid, f"{pid}-a1c-0"),
                           headers={SECRET_HEADER: WEBHOOK_SECRET,
                                    "Content-Type": "application/fhir+json"}, timeout=30)
        assert answer.status_code == 200 and answer.json()["resourceType"] == "OperationOutcome"
        wait_until("the report", lambda: reports_by_patient(hapi.url, [pid])[pid] == 1, 120, 1)
    finally:
        worker.stop()


def test_plain_http_to_a_remote_host_is_refused_before_any_connection(
        clean_redis: Redis) -> None:
    """The real CLI, configured with http:// to a non-loopback host (TEST-NET-1, never
    contacted): refused by configuration; allowed only when the endpoint says so."""
    env = base_env("http://192.0.2.10/fhir", clean_redis)
    done = subprocess.run([sys.executable, "-m", "clinragen_fhir.cli", "diagnose", "p-x",
                           "--local"], env=env, capture_output=True, text=True, timeout=120,
                          cwd=ROOT)
    assert done.returncode != 0
    assert "refusing plain http to non-loopback host 192.0.2.10" in done.stdout + done.stderr
    with pytest.raises(FhirConfigError):
        FhirEndpoint(base_url="http://192.0.2.10/fhir").client()
    FhirEndpoint(base_url="http://192.0.2.10/fhir", allow_insecure_http=True).client().close()
    verify = FhirEndpoint(base_url="https://fhir.example.org/fhir").verify()
    assert not isinstance(verify, bool) and verify.verify_mode.name == "CERT_REQUIRED"
    assert verify.check_hostname
