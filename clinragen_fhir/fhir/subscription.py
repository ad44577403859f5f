"""The R4 rest-hook Subscriptions `clinragen-fhir subscribe` registers: one per search criteria,
PUT by an id from the endpoint and criteria (so registering again changes nothing), carrying the
receiver's shared secret as a channel header (`webhook.SECRET_HEADER`, what HAPI can send)."""

from __future__ import annotations

import hashlib
from typing import Any

DEFAULT_CRITERIA = ("Observation?category=laboratory", "Observation?category=vital-signs",
                    "DocumentReference?status=current")


def subscription_id(endpoint: str, criteria: str) -> str:
    """The fixed id of the Subscription for `criteria` notifying `endpoint`."""
    return "clinragen-" + hashlib.sha256(f"{endpoint}|{criteria}".encode()).hexdigest()[:24]


def rest_hook_subscription(endpoint: str, criteria: str, secret: str) -> dict[str, Any]:
    """The Subscription resource: `requested`, full resource payload, the secret as a header."""
    return {"resourceType": "Subscription", "id": subscription_id(endpoint, criteria),
            "status": "requested",
            "reason": "ClinRaGen-FHIR: diagnose when labs or notes change",
            "criteria": criteria,
            "channel": {"type": "rest-hook", "endpoint": endpoint,
                        "payload": "application/fhir+json",
                        "header": [f"X-Clinragen-Secret: {secret}"]}}
