"""Endpoint auth against real local servers: a token endpoint, a FHIR stub, mutual TLS.

The servers are plain http.server instances on 127.0.0.1 in threads; the client code under test
is the same httpx client the worker uses.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import ssl
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import jwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID
from pydantic import SecretStr

from clinragen_fhir.config import FhirEndpoint
from clinragen_fhir.fhir.auth import ClientCredentialsAuth, SmartBackendAuth, TokenError
from clinragen_fhir.fhir.client import FhirClient
from clinragen_fhir.fhir.errors import FhirHTTPError, FhirUnavailable
from tests.json_http import JsonHandler


class AuthServer:
    """Token endpoint + a FHIR `metadata` that wants a currently valid token."""

    def __init__(self) -> None:
        self.public_keys: dict[str, Any] = {}  # client_id -> public key (SMART)
        self.secrets = {"cc-client": "cc-secret"}  # client_credentials (basic)
        self.valid: set[str] = set()
        self.issued = 0
        self.expires_in = 3600
        self.seen_jti: set[str] = set()
        server = self

        class Handler(JsonHandler):

            def do_POST(self) -> None:
                form = {k: v[0] for k, v in parse_qs(
                    self.rfile.read(int(self.headers["Content-Length"])).decode()).items()}
                if form.get("grant_type") != "client_credentials":
                    return self._send(400, {"error": "unsupported_grant_type"})
                client = server.check_client(self.headers.get("Authorization", ""), form)
                if client is None:
                    return self._send(401, {"error": "invalid_client"})
                server.issued += 1
                token = f"tok-{server.issued}"
                server.valid.add(token)
                self._send(200, {"access_token": token, "token_type": "bearer",
                                 "expires_in": server.expires_in, "scope": form.get("scope")})

            def do_GET(self) -> None:
                token = self.headers.get("Authorization", "").removeprefix("Bearer ")
                if token not in server.valid:
                    return self._send(401, {"resourceType": "OperationOutcome"})
                self._send(200, {"resourceType": "CapabilityStatement", "fhirVersion": "4.0.1"})

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_port}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def check_client(self, authorization: str, form: dict[str, str]) -> str | None:
        if authorization.startswith("Basic "):
            cid, _, secret = base64.b64decode(authorization[6:]).decode().partition(":")
            return cid if self.secrets.get(cid) == secret else None
        if form.get("client_assertion_type") != \
                "urn:ietf:params:oauth:client-assertion-type:jwt-bearer":
            return None
        unverified = jwt.decode(form["client_assertion"], options={"verify_signature": False})
        key = self.public_keys.get(unverified.get("iss", ""))
        if key is None:
            return None
        try:
            claims = jwt.decode(form["client_assertion"], key, algorithms=["RS384", "ES384"],
                                audience=f"{self.url}/token")
        except jwt.InvalidTokenError:
            return None
        if claims["jti"] in self.seen_jti or claims["sub"] != claims["iss"]:
            return None  # replayed assertion
        self.seen_jti.add(claims["jti"])
        return str(claims["iss"])


@pytest.fixture()
def server() -> Iterator[AuthServer]:
    s = AuthServer()
    yield s
    s.httpd.shutdown()


def pem(key: Any) -> str:
    return str(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                 serialization.NoEncryption()).decode())


def test_client_credentials_token_is_cached_and_refreshed_on_401(server: AuthServer) -> None:
    auth = ClientCredentialsAuth(f"{server.url}/token", "cc-client", SecretStr("cc-secret"))
    with FhirClient(f"{server.url}/fhir", auth=auth) as client:
        assert client.capabilities()["fhirVersion"] == "4.0.1"
        client.capabilities()
        assert auth.fetches == 1  # cached
        server.valid.clear()  # the server revokes every token
        assert client.capabilities()["fhirVersion"] == "4.0.1"
        assert auth.fetches == 2
    assert "cc-secret" not in repr(auth.__dict__)


def test_token_is_refetched_when_expired(server: AuthServer) -> None:
    server.expires_in = 1  # below the refresh skew: every request needs a new token
    auth = ClientCredentialsAuth(f"{server.url}/token", "cc-client", SecretStr("cc-secret"))
    with FhirClient(f"{server.url}/fhir", auth=auth) as client:
        client.capabilities()
        client.capabilities()
    assert auth.fetches == 2


def test_wrong_secret_is_a_token_error_without_the_secret(server: AuthServer) -> None:
    auth = ClientCredentialsAuth(f"{server.url}/token", "cc-client", SecretStr("WRONG-x"))
    with FhirClient(f"{server.url}/fhir", auth=auth) as client, \
            pytest.raises(TokenError, match="invalid_client") as info:
        client.capabilities()
    assert "WRONG-x" not in str(info.value)


@pytest.mark.parametrize("alg", ["RS384", "ES384"])
def test_smart_backend_services_signed_assertion(server: AuthServer, alg: str,
                                                 tmp_path: Path) -> None:
    key = (rsa.generate_private_key(public_exponent=65537, key_size=2048) if alg == "RS384"
           else ec.generate_private_key(ec.SECP384R1()))
    server.public_keys["smart-app"] = key.public_key()
    key_file = tmp_path / "key.pem"
    key_file.write_text(pem(key))
    endpoint = FhirEndpoint(base_url=f"{server.url}/fhir", auth="smart-backend",
                            token_url=f"{server.url}/token", client_id="smart-app",
                            private_key_file=key_file, jwt_alg=alg, jwt_kid="k1")  # type: ignore[arg-type]
    with endpoint.client() as client:
        assert client.capabilities()["fhirVersion"] == "4.0.1"
        client.capabilities()
    assert server.issued == 1
    auth = endpoint.http_auth()
    assert isinstance(auth, SmartBackendAuth)
    header = jwt.get_unverified_header(auth.assertion())
    assert header["alg"] == alg and header["kid"] == "k1"


def test_smart_backend_with_an_unknown_key_is_refused(server: AuthServer) -> None:
    server.public_keys["smart-app"] = rsa.generate_private_key(65537, 2048).public_key()
    other = rsa.generate_private_key(65537, 2048)
    auth = SmartBackendAuth(f"{server.url}/token", "smart-app", SecretStr(pem(other)),
                            kid="k1")
    with FhirClient(f"{server.url}/fhir", auth=auth) as client, pytest.raises(TokenError):
        client.capabilities()


def test_missing_auth_settings_are_named(tmp_path: Path) -> None:
    from clinragen_fhir.fhir.errors import FhirConfigError

    with pytest.raises(FhirConfigError, match="token_url"):
        FhirEndpoint(auth="client-credentials").client()
    with pytest.raises(FhirConfigError, match="private_key"):
        FhirEndpoint(auth="smart-backend", token_url="https://t/x", client_id="c").client()


# -- mutual TLS ------------------------------------------------------------------------------

def _cert(subject: str, key: Any, issuer: tuple[x509.Name, Any] | None = None,
          ca: bool = False) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    issuer_name, issuer_key = issuer or (name, key)
    now = dt.datetime.now(dt.UTC)
    builder = (x509.CertificateBuilder().subject_name(name).issuer_name(issuer_name)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - dt.timedelta(minutes=1))
               .not_valid_after(now + dt.timedelta(hours=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if not ca:
        builder = builder.add_extension(x509.SubjectAlternativeName(
            [x509.DNSName("localhost")]), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def test_mutual_tls_and_verification_on_by_default(tmp_path: Path) -> None:
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _cert("test-ca", ca_key, ca=True)
    files: dict[str, Path] = {}
    for who in ("server", "client"):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _cert("localhost" if who == "server" else "worker", key, (ca.subject, ca_key))
        files[f"{who}.pem"] = tmp_path / f"{who}.pem"
        files[f"{who}.pem"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        files[f"{who}.key"] = tmp_path / f"{who}.key"
        files[f"{who}.key"].write_text(pem(key))
    ca_file = tmp_path / "ca.pem"
    ca_file.write_bytes(ca.public_bytes(serialization.Encoding.PEM))

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

        def do_GET(self) -> None:
            body = json.dumps({"resourceType": "CapabilityStatement",
                               "peer": self.connection.getpeercert()["subject"][0][0][1]}).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(files["server.pem"], files["server.key"])
    ctx.load_verify_locations(ca_file)
    ctx.verify_mode = ssl.CERT_REQUIRED
    httpd.socket = ctx.wrap_socket(httpd.socket, server_side=True)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    url = f"https://localhost:{httpd.server_port}/fhir"
    try:
        good = FhirEndpoint(base_url=url, ca_file=ca_file, client_cert=files["client.pem"],
                            client_key=files["client.key"], retries=0)
        with good.client() as client:
            assert client.capabilities()["peer"] == "worker"
        # Default verification: a private CA we were not told about is refused.
        with FhirEndpoint(base_url=url, client_cert=files["client.pem"],
                          client_key=files["client.key"], retries=0).client() as client, \
                pytest.raises(FhirUnavailable, match="CERTIFICATE_VERIFY_FAILED"):
            client.capabilities()
        # No client certificate: the server refuses the handshake.
        with FhirEndpoint(base_url=url, ca_file=ca_file, retries=0).client() as client, \
                pytest.raises((FhirUnavailable, FhirHTTPError)):
            client.capabilities()
    finally:
        httpd.shutdown()
