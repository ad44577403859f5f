"""The CDS Hooks JWT: the EHR signs a bearer token with its own key (RS384/ES384), checked here
against the configured issuer and public keys, this service's URL as audience, an expiry at
most five minutes ahead, and a `jti` not seen before. Reasons for a refusal never quote the
token."""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from typing import Any

import jwt

from clinragen_fhir.cds.store import Store

JWT_ALGORITHMS = ["RS384", "ES384", "RS256", "ES256", "PS384"]  # asymmetric only: no HS/none


MAX_TOKEN_LIFE_S = 300  # CDS Hooks: exp no more than five minutes in the future


LEEWAY_S = 30




def load_keys(text: str) -> dict[str, Any]:
    """Verification keys by kid ("" for a lone PEM key): a JWKS document or one PEM public key.

    Private or symmetric keys are refused: the service only ever needs the EHR's public key, and
    an `oct` key would let whoever holds it (not only the EHR) sign requests."""
    text = text.strip()
    if text.startswith("{"):
        keys: dict[str, Any] = {}
        for jwk in jwt.PyJWKSet.from_json(text).keys:
            if jwk.key_type == "oct":
                raise ValueError("the CDS JWT key set holds a symmetric (oct) key: refused")
            if getattr(jwk, "_jwk_data", {}).get("d"):
                raise ValueError("the CDS JWT key set holds a private key: give public keys")
            keys[jwk.key_id or ""] = jwk.key
        if not keys:
            raise ValueError("the CDS JWT key set is empty")
        return keys
    if "PRIVATE KEY" in text:
        raise ValueError("the CDS JWT key file holds a private key: give the EHR's public key")
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    return {"": load_pem_public_key(text.encode())}


@dataclass
class JwtAuth:
    """What a CDS client's token must match: one issuer and its public keys."""

    issuer: str
    keys: dict[str, Any]  # kid -> public key ("" matches a token without kid)


def check_token(header: str | None, auth: JwtAuth, audiences: list[str], seen: Store,
                now: float | None = None) -> str | None:
    """None if the bearer JWT is the EHR's and fresh, else the reason (no token content)."""
    if not header or not header.lower().startswith("bearer "):
        return "no bearer token"
    token = header[7:].strip()
    try:
        head = jwt.get_unverified_header(token)
    except jwt.InvalidTokenError:
        return "malformed token"
    if head.get("alg") not in JWT_ALGORITHMS:
        return "algorithm not allowed"
    kid = head.get("kid") or ""
    key = auth.keys[kid] if kid in auth.keys else auth.keys.get("")  # "": a lone PEM key
    if key is None:
        return "unknown key"
    now = time.time() if now is None else now
    try:
        claims = jwt.decode(token, key, algorithms=JWT_ALGORITHMS, audience=audiences,
                            issuer=auth.issuer, leeway=LEEWAY_S,
                            options={"require": ["iss", "aud", "exp", "iat", "jti"],
                                     "verify_iat": False, "verify_exp": False,
                                     "verify_nbf": False})
    except jwt.InvalidAudienceError:
        return "wrong audience"
    except jwt.InvalidIssuerError:
        return "wrong issuer"
    except jwt.MissingRequiredClaimError as exc:
        return f"token lacks {exc.claim}"
    except jwt.InvalidTokenError:
        return "bad signature or claims"
    exp = claims.get("exp")
    if not isinstance(exp, int | float) or isinstance(exp, bool):
        return "bad exp"
    if exp < now - LEEWAY_S:  # checked here against `now`, so tests (and replays) are exact
        return "token expired"
    if exp > now + MAX_TOKEN_LIFE_S + LEEWAY_S:
        return "token lives longer than five minutes"
    jti = claims.get("jti")
    if not isinstance(jti, str) or not 0 < len(jti) <= 256:
        return "bad jti"
    digest = hashlib.sha256(f"{auth.issuer}\n{jti}".encode()).hexdigest()
    if not seen.add(f"jti:{digest}", int(exp - now) + 2 * LEEWAY_S):
        return "token replayed (jti seen)"
    return None
