"""SMART Backend Services done properly (issue 15, item 3): keys, JWKS, discovery, rotation.

A real token endpoint on loopback (http.server in a thread, like a hospital's authorization
server): it holds the JWKS registered for the client (the output of `clinragen-fhir keys
jwks`), finds the assertion's key by its `kid`, verifies the RS384/ES384 signature with PyJWT
(iss = sub = client_id, aud = its token URL, exp at most 5 minutes ahead, jti never seen
before) and issues a token with the granted scope. The same server publishes the FHIR base's
`.well-known/smart-configuration` and a `metadata` that wants a valid token.
"""

from __future__ import annotations

import json
import stat
import threading
import time
from collections.abc import Iterator
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import httpx
import jwt
import pytest
from click.testing import CliRunner
from cryptography.hazmat.primitives import serialization

from clinragen_fhir.cli import main
from clinragen_fhir.config import FhirEndpoint
from clinragen_fhir.fhir import auth as auth_module
from clinragen_fhir.fhir import keys
from clinragen_fhir.fhir.auth import WORKER_SCOPE, SmartBackendAuth, TokenError
from clinragen_fhir.fhir.errors import FhirConfigError
from tests.json_http import JsonHandler

CLIENT_ID = "clinragen-fhir"
ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
ALLOWED = set(WORKER_SCOPE.split()) - {"system/AuditEvent.cu"}  # what the hospital grants


class TokenServer:
    """An authorization server that verifies private_key_jwt client assertions."""

    def __init__(self) -> None:
        self.jwks: dict[str, Any] = {"keys": []}  # registered for CLIENT_ID
        self.seen_jti: set[str] = set()
        self.kids: list[str] = []  # kid of each verified assertion
        self.refusals: list[str] = []
        self.valid: set[str] = set()
        self.smart_config: dict[str, Any] | None = None  # None: the default below
        self.discoveries = 0  # GETs of the SMART configuration
        server = self

        class Handler(JsonHandler):

            def do_GET(self) -> None:
                if self.path == "/fhir/.well-known/smart-configuration":
                    server.discoveries += 1
                    return self._send(200, server.smart_config or {
                        "token_endpoint": server.token_url,
                        "token_endpoint_auth_methods_supported": ["private_key_jwt"],
                        "token_endpoint_auth_signing_alg_values_supported": ["RS384", "ES384"],
                        "grant_types_supported": ["client_credentials"]})
                token = self.headers.get("Authorization", "").removeprefix("Bearer ")
                if self.path != "/fhir/metadata" or token not in server.valid:
                    return self._send(401, {"resourceType": "OperationOutcome"})
                self._send(200, {"resourceType": "CapabilityStatement", "fhirVersion": "4.0.1"})

            def do_POST(self) -> None:
                if self.path != "/token":
                    return self._send(404, {"error": "not_found"})
                form = {k: v[0] for k, v in parse_qs(
                    self.rfile.read(int(self.headers["Content-Length"])).decode()).items()}
                problem = server.check(form)
                if problem:
                    server.refusals.append(problem)
                    return self._send(401, {"error": "invalid_client",
                                            "error_description": problem})
                token = f"tok-{len(server.valid) + 1}"
                server.valid.add(token)
                granted = [s for s in form.get("scope", "").split() if s in ALLOWED]
                self._send(200, {"access_token": token, "token_type": "bearer",
                                 "expires_in": 3600, "scope": " ".join(granted)})

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_port}"
        self.token_url = f"{self.url}/token"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def check(self, form: dict[str, str]) -> str | None:
        """Why the client assertion is refused, or None (SMART Backend Services, section
        'Signature verification' of the authorization server)."""
        if form.get("grant_type") != "client_credentials":
            return "grant_type"
        if form.get("client_assertion_type") != ASSERTION_TYPE:
            return "client_assertion_type"
        assertion = form.get("client_assertion", "")
        try:
            header = jwt.get_unverified_header(assertion)
            jwk = next((k for k in jwt.PyJWKSet.from_dict(self.jwks).keys
                        if k.key_id == header.get("kid")), None)
            if jwk is None:
                return f"no registered key with kid {header.get('kid')!r}"
            if header.get("alg") not in ("RS384", "ES384") or header["alg"] != jwk.algorithm_name:
                return "alg"
            claims = jwt.decode(assertion, jwk.key, algorithms=[jwk.algorithm_name],
                                audience=self.token_url, issuer=CLIENT_ID,
                                options={"require": ["iss", "sub", "aud", "exp", "jti"]})
        except (jwt.InvalidTokenError, jwt.PyJWKError) as exc:
            return f"invalid assertion: {type(exc).__name__}"
        if claims["sub"] != CLIENT_ID:
            return "sub"
        if claims["exp"] > time.time() + 300 + 5:  # at most five minutes ahead (5 s of skew)
            return "exp too far ahead"
        if claims["jti"] in self.seen_jti:
            return "jti replayed"
        self.seen_jti.add(claims["jti"])
        self.kids.append(header["kid"])
        return None

    def register(self, *directories: Path) -> dict[str, Any]:
        """What the hospital does with `clinragen-fhir keys jwks DIR...`."""
        result = CliRunner().invoke(main, ["keys", "jwks", *map(str, directories)])
        assert result.exit_code == 0, result.output
        self.jwks = json.loads(result.output)
        return self.jwks


@pytest.fixture()
def server() -> Iterator[TokenServer]:
    auth_module._discovered.clear()  # a port used again must not find an earlier server's endpoint
    s = TokenServer()
    yield s
    s.httpd.shutdown()


def generate(alg: str, directory: Path) -> str:
    """`clinragen-fhir keys generate`; returns the kid it printed."""
    result = CliRunner().invoke(main, ["keys", "generate", "--alg", alg, "--out", str(directory)])
    assert result.exit_code == 0, result.output
    return result.output.split()[1]


def endpoint(server: TokenServer, **kw: Any) -> FhirEndpoint:
    return FhirEndpoint(base_url=f"{server.url}/fhir", auth="smart-backend", client_id=CLIENT_ID,
                        retries=0, **kw)


def test_thumbprint_is_rfc_7638() -> None:
    """The example of RFC 7638, section 3.1."""
    jwk = {"kty": "RSA", "e": "AQAB", "alg": "RS256", "kid": "2011-04-29",
           "n": "0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1"
                "L6tSoc_BJECPebWKRXjBZCiFV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4"
                "QyQ5v-65YGjQR0_FDW2QvzqY368QQMicAtaSqzs8KJZgnYb9c7d0zgdAZHzu6qMQvRL5hajrn1n91CbO"
                "pbISD08qNLyrdkt-bFTWhAI4vMQFh6WeZu0fM4lFd2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-csF"
                "Cur-kEgU8awapJzKnqDKgw"}
    assert keys.thumbprint(jwk) == "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs"


@pytest.mark.parametrize("alg", ["RS384", "ES384"])
def test_generate_writes_a_0600_private_key_and_its_public_jwk(alg: str, tmp_path: Path) -> None:
    kid = generate(alg, tmp_path / "keys")
    assert stat.S_IMODE((tmp_path / "keys").stat().st_mode) == 0o700
    (private,) = (tmp_path / "keys").glob("*.key.pem")
    (public,) = (tmp_path / "keys").glob("*.jwk.json")
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert private.name.endswith(f"-{kid[:8]}.key.pem")
    jwk = json.loads(public.read_text())
    assert jwk["kid"] == kid == keys.thumbprint(jwk) and jwk["alg"] == alg
    assert jwk["use"] == "sig" and "d" not in jwk
    loaded = keys.load_private(private)
    assert (loaded.kid, loaded.alg) == (kid, alg)
    # the public JWK is the private key's: a signature by one verifies with the other
    token = jwt.encode({"x": 1}, loaded.pem.get_secret_value(), algorithm=alg)
    assert jwt.decode(token, jwt.PyJWK(jwk).key, algorithms=[alg]) == {"x": 1}
    key = serialization.load_pem_private_key(private.read_bytes(), None)
    assert keys.public_jwk(key.public_key())["kid"] == kid


def test_jwks_holds_every_key_newest_first_and_nothing_private(tmp_path: Path) -> None:
    first = generate("RS384", tmp_path / "a")
    second = generate("ES384", tmp_path / "a")
    third = generate("RS384", tmp_path / "b")
    result = CliRunner().invoke(main, ["keys", "jwks", str(tmp_path / "a"), str(tmp_path / "b")])
    assert result.exit_code == 0, result.output
    listed = json.loads(result.output)["keys"]
    assert [k["kid"] for k in listed] == [third, second, first]
    for jwk in listed:
        assert not {"d", "p", "q", "dp", "dq", "qi"} & set(jwk)
        assert jwk["use"] == "sig" and jwk["alg"] in ("RS384", "ES384")
    # a public JWK file alone (the private half kept elsewhere) is still served; a private one
    # that a JWK file claims to be public is refused
    (tmp_path / "c").mkdir()
    (public,) = (tmp_path / "b").glob("*.jwk.json")
    (tmp_path / "c" / public.name).write_text(public.read_text())
    assert [k["kid"] for k in keys.jwks([tmp_path / "c"])["keys"]] == [third]
    (tmp_path / "c" / public.name).write_text(json.dumps({**listed[0], "d": "secret"}))
    with pytest.raises(FhirConfigError, match="private key"):
        keys.jwks([tmp_path / "c"])


@pytest.mark.parametrize("alg", ["RS384", "ES384"])
def test_a_real_token_endpoint_verifies_the_assertion_against_the_jwks(
        server: TokenServer, alg: str, tmp_path: Path) -> None:
    kid = generate(alg, tmp_path / "keys")
    server.register(tmp_path / "keys")
    (key_file,) = (tmp_path / "keys").glob("*.key.pem")
    # a key file with its kid, the token endpoint discovered (no token_url configured)
    with endpoint(server, private_key_file=key_file, jwt_alg=alg, jwt_kid=kid).client() as c:
        assert c.capabilities()["fhirVersion"] == "4.0.1"
    assert server.kids == [kid] and not server.refusals
    auth = endpoint(server, private_key_dir=tmp_path / "keys").http_auth()
    assert isinstance(auth, SmartBackendAuth)
    assert auth.token_url is None  # not configured: discovered at the first token
    auth.token()
    assert auth.token_url == server.token_url
    assert auth.granted_scope == " ".join(s for s in WORKER_SCOPE.split() if s in ALLOWED)
    header = jwt.get_unverified_header(auth.assertion())
    assert header == {"alg": alg, "kid": kid, "typ": "JWT"}
    assert server.kids == [kid, kid]
    assert server.discoveries == 1  # the second client (a worker's next task) kept the answer


def test_rotation_two_keys_served_the_newer_signs(server: TokenServer, tmp_path: Path) -> None:
    keydir = tmp_path / "keys"
    old = generate("RS384", keydir)
    server.register(keydir)
    auth = endpoint(server, private_key_dir=keydir).http_auth()
    assert isinstance(auth, SmartBackendAuth)
    auth.token()
    assert server.kids == [old]
    # rotate: a second key, the two-key JWKS registered, then the worker signs with the new one
    new = generate("ES384", keydir)
    assert [k["kid"] for k in server.register(keydir)["keys"]] == [new, old]
    auth.token(force=True)  # the directory is read again at each token fetch
    assert server.kids == [old, new] and auth.kid == new and auth.algorithm == "ES384"
    assert jwt.get_unverified_header(auth.assertion())["kid"] == new
    # a worker not yet given the new key still gets tokens with the old one
    (old_file,) = keydir.glob(f"*-{old[:8]}.key.pem")
    kept = tmp_path / "old.pem"
    kept.write_bytes(old_file.read_bytes())
    stale = endpoint(server, private_key_file=kept, jwt_kid=old).http_auth()
    assert isinstance(stale, SmartBackendAuth)
    stale.token()
    assert server.kids[-1] == old
    # the old key retired: removed from the JWKS, it is refused, the new one still works
    for path in keydir.glob(f"*-{old[:8]}.*"):
        path.unlink()
    assert [k["kid"] for k in server.register(keydir)["keys"]] == [new]
    with pytest.raises(TokenError, match="no registered key"):
        stale.token(force=True)
    auth.token(force=True)
    assert server.kids[-1] == new


def test_the_endpoint_refuses_unregistered_keys_and_replays(server: TokenServer,
                                                            tmp_path: Path) -> None:
    registered = generate("RS384", tmp_path / "registered")
    generate("RS384", tmp_path / "unregistered")
    server.register(tmp_path / "registered")
    with pytest.raises(TokenError, match="no registered key"):
        endpoint(server, private_key_dir=tmp_path / "unregistered").http_auth().token()  # type: ignore[union-attr]
    auth = endpoint(server, private_key_dir=tmp_path / "registered").http_auth()
    assert isinstance(auth, SmartBackendAuth)
    assertion = auth.assertion()
    form = {"grant_type": "client_credentials", "client_assertion_type": ASSERTION_TYPE,
            "client_assertion": assertion}
    assert httpx.post(server.token_url, data=form).status_code == 200
    replay = httpx.post(server.token_url, data=form)
    assert replay.status_code == 401 and "replayed" in replay.json()["error_description"]
    assert server.kids == [registered]


def test_kid_is_required(tmp_path: Path) -> None:
    generate("RS384", tmp_path)
    (key_file,) = tmp_path.glob("*.key.pem")
    base = {"auth": "smart-backend", "token_url": "https://auth.example/token", "client_id": "c",
            "private_key_file": key_file}
    with pytest.raises(FhirConfigError, match="needs jwt_kid"):
        FhirEndpoint(**base).http_auth()
    with pytest.raises(FhirConfigError, match="jwt_kid holds the example configs' placeholder"):
        FhirEndpoint(**base, jwt_kid="replace-with-the-kid").http_auth()
    with pytest.raises(FhirConfigError, match="leave private_key_file"):
        FhirEndpoint(**base, private_key_dir=tmp_path).http_auth()
    with pytest.raises(FhirConfigError, match="kid"):
        SmartBackendAuth("https://auth.example/token", "c", keys.load_private(key_file).pem)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FhirConfigError, match="holds no"):
        FhirEndpoint(auth="smart-backend", client_id="c", private_key_dir=empty).http_auth()


def test_discovery_follows_the_tls_rules_and_names_what_is_missing(server: TokenServer,
                                                                   tmp_path: Path) -> None:
    generate("ES384", tmp_path)
    server.register(tmp_path)
    server.smart_config = {"token_endpoint": "http://auth.hospital.example/token"}
    with pytest.raises(FhirConfigError, match=r"plain http .*token_endpoint of \.well-known"):
        endpoint(server, private_key_dir=tmp_path).http_auth().token()  # type: ignore[union-attr]
    server.smart_config = {"issuer": "no token endpoint here"}
    with pytest.raises(TokenError, match="names no token_endpoint: set token_url") as info:
        endpoint(server, private_key_dir=tmp_path).http_auth().token()  # type: ignore[union-attr]
    assert not info.value.retryable
    # the base URL itself: plain http off loopback is refused before anything is sent
    with pytest.raises(FhirConfigError, match=r"plain http .*token endpoint discovery"):
        FhirEndpoint(base_url="http://fhir.hospital.example/fhir", auth="smart-backend",
                     client_id="c", private_key_dir=tmp_path).http_auth()
    # a configured token_url is used as is: no discovery request
    server.smart_config = {"token_endpoint": "https://elsewhere.example/token"}
    auth = endpoint(server, private_key_dir=tmp_path, token_url=server.token_url).http_auth()
    assert isinstance(auth, SmartBackendAuth)
    auth.token()
    assert auth.token_url == server.token_url
