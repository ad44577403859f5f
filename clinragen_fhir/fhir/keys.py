"""SMART Backend Services keys: generate a key pair, load the signing key, build the JWKS.

`keys generate --alg RS384|ES384 --out DIR` writes two files per key, named
`<created>-<kid[:8]>`, where `<created>` is the UTC creation time (`20261202T012200123456Z`):

* `<stem>.key.pem`: the private key, PKCS#8 PEM, mode 0600 (RSA 3072 for RS384, EC P-384 for
  ES384);
* `<stem>.jwk.json`: its public JWK, with `kid` the RFC 7638 thumbprint (SHA-256, base64url) of
  the key, `alg` and `use: sig`.

The kid is a function of the key, so it is recomputed from the private key wherever it is read
and cannot drift from it. Rotation: a directory may hold several keys; the JWKS (`keys jwks`)
serves all of them, newest first, and the newest one signs. "Newest" is the creation time in the
file name, which survives copying into a Kubernetes Secret (where every file's mtime is the
mount's); a key file without one is dated by its mtime.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from pydantic import SecretStr

from clinragen_fhir.fhir.errors import FhirConfigError

__all__ = ["PRIVATE_SUFFIX", "PUBLIC_SUFFIX", "SigningKey", "generate", "jwks", "load_private",
           "newest", "public_jwk", "signing_keys", "thumbprint"]

Alg = Literal["RS384", "ES384"]
PRIVATE_SUFFIX = ".key.pem"
PUBLIC_SUFFIX = ".jwk.json"
RSA_BITS = 3072  # NIST's size for keys used past 2030; SMART asks for at least 2048
_STAMP = "%Y%m%dT%H%M%S%fZ"
_CREATED = re.compile(r"^(\d{8}T\d{12}Z)-")
# RFC 7638 section 3.2: the members a thumbprint is computed over, by key type
_REQUIRED = {"RSA": ("e", "kty", "n"), "EC": ("crv", "kty", "x", "y")}


@dataclass(frozen=True)
class SigningKey:
    """A private key as read from a key directory or file, with what the assertion needs."""

    kid: str
    alg: Alg
    pem: SecretStr
    created: dt.datetime
    path: Path
    public: dict[str, Any]  # its public JWK


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _uint(value: int, length: int | None = None) -> str:
    return _b64(value.to_bytes(length or max(1, (value.bit_length() + 7) // 8), "big"))


def thumbprint(jwk: dict[str, Any]) -> str:
    """The RFC 7638 JWK thumbprint: SHA-256 of the required members in lexicographic order,
    without whitespace, base64url without padding."""
    members = _REQUIRED.get(str(jwk.get("kty")))
    if members is None:
        raise ValueError(f"no thumbprint for key type {jwk.get('kty')!r}")
    canonical = json.dumps({m: jwk[m] for m in members}, separators=(",", ":"),
                           sort_keys=True)
    return _b64(hashlib.sha256(canonical.encode()).digest())


def _alg_of(public: Any) -> Alg:
    if isinstance(public, rsa.RSAPublicKey):
        if public.key_size < 2048:
            raise FhirConfigError(f"an RSA key of {public.key_size} bits is too short for RS384 "
                                  "(at least 2048)")
        return "RS384"
    if isinstance(public, ec.EllipticCurvePublicKey) and isinstance(public.curve, ec.SECP384R1):
        return "ES384"
    raise FhirConfigError("a SMART key must be RSA (RS384) or EC P-384 (ES384)")


def public_jwk(public: Any) -> dict[str, Any]:
    """The public JWK of an RSA or EC P-384 public key, with kid (RFC 7638), alg and use."""
    alg = _alg_of(public)
    if isinstance(public, rsa.RSAPublicKey):
        numbers = public.public_numbers()
        jwk: dict[str, Any] = {"kty": "RSA", "n": _uint(numbers.n), "e": _uint(numbers.e)}
    else:
        point = public.public_numbers()
        jwk = {"kty": "EC", "crv": "P-384", "x": _uint(point.x, 48), "y": _uint(point.y, 48)}
    return {"kid": thumbprint(jwk), "alg": alg, "use": "sig", **jwk}


def _created(path: Path) -> dt.datetime:
    m = _CREATED.match(path.name)
    if m:
        return dt.datetime.strptime(m.group(1), _STAMP).replace(tzinfo=dt.UTC)
    return dt.datetime.fromtimestamp(path.stat().st_mtime, dt.UTC)


def load_private(path: Path) -> SigningKey:
    """A PEM private key file (unencrypted PKCS#8 or traditional), its kid, alg and date. Errors
    name the file, never its content."""
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (ValueError, TypeError, OSError) as exc:
        raise FhirConfigError(f"{path}: not a readable unencrypted PEM private key "
                              f"({type(exc).__name__})") from None
    public = public_jwk(key.public_key())
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption()).decode()
    return SigningKey(public["kid"], public["alg"], SecretStr(pem), _created(path), path, public)


def signing_keys(directory: Path) -> list[SigningKey]:
    """The private keys in a `keys generate` directory, newest first."""
    found = [load_private(p) for p in sorted(directory.glob(f"*{PRIVATE_SUFFIX}"))]
    return sorted(found, key=lambda k: (k.created, k.path.name), reverse=True)


def newest(directory: Path) -> SigningKey:
    """The key that signs: the newest in the directory."""
    if not directory.is_dir():
        raise FhirConfigError(f"private_key_dir {directory} is not a directory")
    found = signing_keys(directory)
    if not found:
        raise FhirConfigError(f"private_key_dir {directory} holds no *{PRIVATE_SUFFIX} key: "
                              "make one with `clinragen-fhir keys generate`")
    return found[0]


def _public_file(path: Path) -> tuple[dt.datetime, dict[str, Any]]:
    try:
        jwk = json.loads(path.read_text())
        members = {m: jwk[m] for m in ("kid", "alg", "kty", *_REQUIRED[jwk["kty"]])}
    except (ValueError, KeyError, TypeError) as exc:
        raise FhirConfigError(f"{path}: not a public JWK ({type(exc).__name__})") from None
    if "d" in jwk:
        raise FhirConfigError(f"{path} holds a private key: refusing to publish it")
    if thumbprint(members) != members["kid"]:
        raise FhirConfigError(f"{path}: its kid is not the key's RFC 7638 thumbprint")
    return _created(path), {"kid": members["kid"], "alg": members["alg"], "use": "sig",
                            **{m: members[m] for m in _REQUIRED[members["kty"]]}}


def jwks(directories: Iterable[Path]) -> dict[str, list[dict[str, Any]]]:
    """The public JWKS of every key in the directories (private keys and public JWK files, one
    entry per kid), newest first: what the hospital registers for the client."""
    by_kid: dict[str, tuple[dt.datetime, dict[str, Any]]] = {}
    for directory in directories:
        for path in sorted(directory.glob(f"*{PUBLIC_SUFFIX}")):
            created, jwk = _public_file(path)
            by_kid.setdefault(jwk["kid"], (created, jwk))
        for key in signing_keys(directory):
            by_kid[key.kid] = (key.created, key.public)
    ordered = sorted(by_kid.values(), key=lambda cj: (cj[0], cj[1]["kid"]), reverse=True)
    return {"keys": [jwk for _, jwk in ordered]}


def generate(alg: Alg, out_dir: Path, now: dt.datetime | None = None,
             rsa_bits: int = RSA_BITS) -> tuple[SigningKey, Path]:
    """A new key pair in `out_dir` (created 0700 if missing): the private key (0600, never
    overwritten) and its public JWK. Returns the key and the public file's path."""
    private: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey
    if alg == "RS384":
        private = rsa.generate_private_key(public_exponent=65537, key_size=rsa_bits)
    elif alg == "ES384":
        private = ec.generate_private_key(ec.SECP384R1())
    else:
        raise ValueError(f"alg must be RS384 or ES384, not {alg!r}")
    public = public_jwk(private.public_key())
    created = (now or dt.datetime.now(dt.UTC)).astimezone(dt.UTC)
    stem = f"{created:{_STAMP}}-{public['kid'][:8]}"
    out_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    key_path = out_dir / f"{stem}{PRIVATE_SUFFIX}"
    pem = private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        os.fchmod(f.fileno(), 0o600)  # whatever the umask
        f.write(pem)
    public_path = out_dir / f"{stem}{PUBLIC_SUFFIX}"
    public_path.write_text(json.dumps(public, indent=2) + "\n")
    return SigningKey(public["kid"], alg, SecretStr(pem.decode()), created, key_path,
                      public), public_path
