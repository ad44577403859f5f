"""The StructureDefinitions of what this software writes, shipped as package data.

`profiles/*.json`: one Extension definition for every extension URL under `build.EXT_BASE` that
the report, its Provenance or the audit write, and the DiagnosticReport profile
(`build.PROFILE`) that every written report claims in `meta.profile`. `install` PUTs them onto
the FHIR server by id (`clinragen-fhir install-profiles`), so the server's `$validate` knows
them; PUT by id makes it idempotent (HAPI adds no version when nothing changed).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from clinragen_fhir.fhir.client import FhirClient

PROFILE_DIR = Path(__file__).with_name("profiles")


def structure_definitions() -> Iterator[dict[str, Any]]:
    """Every shipped StructureDefinition, sorted by id."""
    for path in sorted(PROFILE_DIR.glob("*.json")):
        sd: dict[str, Any] = json.loads(path.read_text())
        if sd.get("resourceType") != "StructureDefinition" or sd.get("id") != path.stem:
            raise ValueError(f"{path.name}: not a StructureDefinition with id {path.stem!r}")
        yield sd


def defined_urls() -> set[str]:
    return {str(sd["url"]) for sd in structure_definitions()}


def install(client: FhirClient) -> list[str]:
    """PUT every shipped StructureDefinition by id; returns their canonical URLs."""
    done = []
    for sd in structure_definitions():
        client.update(sd)
        done.append(str(sd["url"]))
    return done
