"""Load FHIR R4 transaction Bundles and Bulk Data NDJSON folders into a server, idempotently.

Every entry whose resource has an id is sent as `PUT Type/id`, so loading twice changes
nothing; the server resolves `urn:uuid:` references inside a bundle and conditional references
(`Practitioner?identifier=...`) against what is already loaded, which is why shared
organisation/practitioner bundles go first.
"""

from __future__ import annotations

import gzip
import json
from collections import Counter
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from clinragen_fhir.fhir.client import FhirClient
from clinragen_fhir.fhir.errors import FhirError

SUPPORT_PREFIXES = ("hospitalInformation", "practitionerInformation")
# Bulk NDJSON goes in this order so references point at resources already loaded.
TYPE_ORDER = ("Organization", "Location", "Practitioner", "PractitionerRole", "Patient",
              "Encounter", "Device", "Medication", "Condition", "Observation")
NDJSON_BATCH = 250


@dataclass
class LoadReport:
    """What a load did: counts per resource type and errors naming the file."""

    counts: Counter[str] = field(default_factory=Counter)
    files: int = 0
    errors: list[tuple[str, str]] = field(default_factory=list)


def _open_json(path: Path) -> Any:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as fh:
        return json.load(fh)


def as_idempotent(bundle: dict[str, Any], keep_types: set[str] | None = None) -> dict[str, Any]:
    """The same transaction with plain POSTs of resources that have ids turned into PUT by id.

    Conditional creates (`ifNoneExist`) stay as they are: they are idempotent already, and they
    match what another loader may have put there under a server-assigned id.
    """
    entries = []
    for entry in bundle.get("entry", []) or []:
        resource = entry.get("resource") or {}
        rtype, rid = resource.get("resourceType"), resource.get("id")
        if keep_types is not None and rtype not in keep_types:
            continue
        request = dict(entry.get("request") or {})
        if rid and request.get("method", "POST") == "POST" and not request.get("ifNoneExist"):
            request = {"method": "PUT", "url": f"{rtype}/{rid}"}
        entries.append({**entry, "request": request})
    return {"resourceType": "Bundle", "type": "transaction", "entry": entries}


def bundle_files(paths: Iterable[Path]) -> list[Path]:
    """Bundle files found under the paths, support bundles first, then by name."""
    found: list[Path] = []
    for path in paths:
        if path.is_dir():
            found += [p for p in sorted(path.rglob("*")) if p.name.endswith((".json", ".json.gz"))]
        elif path.name.endswith((".json", ".json.gz")):
            found.append(path)
    return sorted(set(found), key=lambda p: (not p.name.startswith(SUPPORT_PREFIXES), str(p)))


def ndjson_batches(folder: Path, keep_types: set[str] | None = None
                   ) -> Iterator[tuple[str, dict[str, Any]]]:
    """(file name, transaction of PUTs) batches from a Bulk Data export folder."""
    files = [p for p in folder.iterdir() if p.name.endswith((".ndjson", ".ndjson.gz"))]

    def rank(p: Path) -> tuple[int, str]:
        rtype = p.name.split(".")[0]
        return (TYPE_ORDER.index(rtype) if rtype in TYPE_ORDER else len(TYPE_ORDER), p.name)

    for path in sorted(files, key=rank):
        batch: list[dict[str, Any]] = []
        for resource in read_ndjson(path):
            if keep_types is not None and resource.get("resourceType") not in keep_types:
                continue
            batch.append(resource)
            if len(batch) >= NDJSON_BATCH:
                yield path.name, _put_bundle(batch)
                batch = []
        if batch:
            yield path.name, _put_bundle(batch)


def read_ndjson(path: Path) -> Iterator[dict[str, Any]]:
    """The resources of one NDJSON file (`.ndjson` or `.ndjson.gz`); a bad line names file:line."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as fh:
        for line_no, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                resource = json.loads(line)
            except json.JSONDecodeError as exc:
                raise FhirError(f"{path}:{line_no}: not JSON ({exc.msg})") from exc
            if not isinstance(resource, dict):
                raise FhirError(f"{path}:{line_no}: not a JSON object")
            yield resource


def _put_bundle(resources: list[dict[str, Any]]) -> dict[str, Any]:
    return {"resourceType": "Bundle", "type": "transaction", "entry": [
        {"resource": r, "request": {"method": "PUT", "url": f"{r['resourceType']}/{r['id']}"}}
        for r in resources if r.get("resourceType") and r.get("id")]}


def _send(client: FhirClient, name: str, bundle: dict[str, Any]) -> tuple[str, Counter[str], str]:
    counts: Counter[str] = Counter()
    try:
        client.transaction(bundle)
    except FhirError as exc:
        return name, counts, str(exc)
    for entry in bundle["entry"]:
        counts[entry["resource"]["resourceType"]] += 1
    return name, counts, ""


def load(client: FhirClient, paths: Iterable[Path], *, workers: int = 2,
         keep_types: set[str] | None = None, progress: bool = True) -> LoadReport:
    """Load everything under `paths`; one failed file never stops the others."""
    paths = list(paths)
    report = LoadReport()
    files = bundle_files(paths)
    support = [f for f in files if f.name.startswith(SUPPORT_PREFIXES)]
    patients = [f for f in files if f not in support]
    folders = [p for p in paths if p.is_dir() and any(
        q.name.endswith((".ndjson", ".ndjson.gz")) for q in p.iterdir())]
    bar = tqdm(total=len(files), unit="bundle", disable=not progress)

    def one_file(path: Path) -> tuple[str, Counter[str], str]:
        try:
            bundle = as_idempotent(_open_json(path), keep_types)
        except (OSError, ValueError) as exc:
            return str(path), Counter(), f"cannot read: {exc}"
        return _send(client, str(path), bundle)

    def record(result: tuple[str, Counter[str], str]) -> None:
        name, counts, error = result
        report.files += 1
        report.counts.update(counts)
        if error:
            report.errors.append((name, error))
        bar.update(1)

    for path in support:  # sequential: patients' conditional references point at these
        record(one_file(path))
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for result in pool.map(one_file, patients):
            record(result)
    bar.close()
    for folder in folders:
        try:
            batches = list(ndjson_batches(folder, keep_types))
        except (OSError, FhirError) as exc:
            report.errors.append((str(folder), str(exc)))
            continue
        report.files += len({name for name, _ in batches})
        for name, bundle in tqdm(batches, unit="batch", disable=not progress,
                                 desc=folder.name):
            _, counts, error = _send(client, str(folder / name), bundle)
            report.counts.update(counts)
            if error:
                report.errors.append((str(folder / name), error))
    return report
