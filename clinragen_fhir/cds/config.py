"""The CDS Hooks service's settings as it runs them: `[cds_hooks]` (config.CdsHooksSettings)
checked and loaded at start, so a missing or unsafe one stops the service instead of refusing
requests later; without JWT auth it serves loopback only (`check_bind`)."""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from typing import Any

from clinragen_fhir.cds.auth import JwtAuth, load_keys
from clinragen_fhir.config import CdsHooksSettings
from clinragen_fhir.fhir.urls import is_loopback

MAX_BODY_BYTES = 2 * 1024 * 1024  # a hook request with prefetched resources stays far below
CARD_TTL_S = 7 * 24 * 3600  # feedback on a card is accepted this long after it was shown
LINK_TTL_S = 12 * 3600  # a signed report link works for one shift


def _read(path: str) -> str:
    with open(path, encoding="utf-8") as fh:
        return fh.read()


@dataclass
class CdsConfig:
    """The service's settings as it runs them (`from_settings`: `[cds_hooks]` checked)."""

    auth: JwtAuth | None  # None: no auth, refused off loopback (`check_bind`)
    base_url: str = ""  # public URL the EHR calls, e.g. https://cds.example.org: JWT audience
    link_secret: bytes = field(default_factory=lambda: secrets.token_bytes(32))
    report_url: str = ""  # optional template with {id} (and {version}): the link target
    cors_origins: list[str] = field(default_factory=list)
    max_body_bytes: int = MAX_BODY_BYTES
    card_ttl_s: int = CARD_TTL_S
    link_ttl_s: int = LINK_TTL_S

    def __post_init__(self) -> None:
        self.base_url = self.base_url.rstrip("/")
        if self.auth is not None and not self.base_url:
            raise ValueError("CDS JWT auth needs cds_hooks.base_url (CLINRAGEN_CDS_HOOKS__BASE_URL"
                             ": the audience the EHR signs for)")
        if self.report_url and "{id}" not in self.report_url:
            raise ValueError("cds_hooks.report_url (CLINRAGEN_CDS_HOOKS__REPORT_URL) must hold "
                             "{id}")

    @classmethod
    def from_settings(cls, settings: CdsHooksSettings) -> CdsConfig:
        """The service's settings (`[cds_hooks]`, CLINRAGEN_CDS_HOOKS__*) checked and loaded: a
        missing or unsafe one is an error here, at start, not a refused request later."""
        auth: JwtAuth | None = None
        if settings.auth == "jwt":
            if not settings.jwt_issuer or settings.jwt_keys_file is None:
                raise ValueError("set cds_hooks.jwt_issuer and cds_hooks.jwt_keys_file "
                                 "(CLINRAGEN_CDS_HOOKS__JWT_ISSUER, _JWT_KEYS_FILE: the EHR's "
                                 "public key or JWKS), or cds_hooks.auth = \"none\" for a "
                                 "loopback-only test service")
            auth = JwtAuth(settings.jwt_issuer, load_keys(_read(str(settings.jwt_keys_file))))
        secret = settings.link_secret()  # FhirConfigError: unreadable, short, a placeholder
        extra: dict[str, Any] = {"link_secret": secret.get_secret_value().encode()} \
            if secret is not None else {}
        return cls(auth=auth, base_url=settings.base_url, report_url=settings.report_url,
                   cors_origins=settings.origins(), **extra)

    @classmethod
    def from_env(cls) -> CdsConfig:
        """`from_settings` of the settings as configured now (the TOML and the environment)."""
        from clinragen_fhir.config import Settings

        return cls.from_settings(Settings().cds_hooks)

    def check_bind(self, host: str) -> None:
        """Refuse to serve without auth anywhere but loopback (an open service would hand any
        caller on the network every patient's diagnoses)."""
        if self.auth is None and not is_loopback(host):
            raise ValueError(f"the CDS Hooks service binds {host} without JWT auth: set "
                             "cds_hooks.jwt_issuer and cds_hooks.jwt_keys_file")
