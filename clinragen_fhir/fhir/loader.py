"""Load FHIR R4 transaction Bundles and Bulk Data NDJSON folders into a server, idempotently.

Every entry whose resource has an id is sent as `PUT Type/id`, so loading twice changes
nothing; the server resolves `urn:uuid:` references inside a bundle and conditional references
(`Practitioner?identifier=...`) against what is already loaded, which is why shared
organisation/practitioner bundles go first.

A Bulk Data NDJSON folder has no bundles, and its resources reference each other across files,
in cycles too (clinosim: Encounter.diagnosis -> Condition, Condition.encounter -> Encounter).
A server that enforces referential integrity (HAPI) refuses a resource whose reference target
is not there yet, so loading file by file in any type order fails. `plan_ndjson` groups the
resources instead: everything in one patient's compartment (the resources that reference that
patient) is one unit, every other resource (organisations, practitioners, locations) a unit of
its own; units go in waves in reference-dependency order (a unit after every unit it
references), several units per transaction. Inside one transaction the server resolves
references among its entries, forward references and cycles included. A reference to a
resource the export holds but this load leaves out (`keep_types`) is removed, since it could
only dangle (`LoadReport.stripped` counts them); a reference to anything else is left for the
server to resolve (it may hold the target already).

Transaction Bundles (Synthea's) get the same rule under `keep_types`: an entry left out takes
with it every reference to it, by `urn:uuid:` fullUrl or `Type/id` in its own bundle, and, for
the resources of support bundles, by conditional reference (`Practitioner?identifier=...`, the
support entry's `url?ifNoneExist`). Kept, such a reference makes the server refuse the whole
bundle (HAPI-0541: "Unable to satisfy placeholder ID").
"""

from __future__ import annotations

import gzip
import json
from collections import Counter, defaultdict
from collections.abc import Callable, Collection, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from clinragen_fhir.fhir.client import FhirClient
from clinragen_fhir.fhir.errors import FhirError, FhirHTTPError

SUPPORT_PREFIXES = ("hospitalInformation", "practitionerInformation")
NDJSON_BATCH = 250  # entries per transaction (a patient's compartment is never split)


@dataclass
class LoadReport:
    """What a load did: counts per resource type and errors naming the file."""

    counts: Counter[str] = field(default_factory=Counter)
    files: int = 0
    errors: list[tuple[str, str]] = field(default_factory=list)
    stripped: int = 0  # references removed: their target is in the load but left out


def _open_json(path: Path) -> Any:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as fh:
        return json.load(fh)


def entry_keys(entry: dict[str, Any]) -> set[str]:
    """The references that can name a Bundle entry's resource: its fullUrl, `Type/id`, and for
    a conditional create the conditional reference `Type?query` that other bundles use."""
    resource = entry.get("resource") or {}
    request = entry.get("request") or {}
    rtype, rid = resource.get("resourceType"), resource.get("id")
    keys = {str(entry["fullUrl"])} if entry.get("fullUrl") else set()
    if rtype and rid:
        keys.add(f"{rtype}/{rid}")
    if rtype and request.get("ifNoneExist"):
        keys.add(f"{rtype}?{request['ifNoneExist']}")
    return keys


def prepare_bundle(bundle: dict[str, Any], keep_types: set[str] | None = None,
                   left_out: Collection[str] = ()) -> tuple[dict[str, Any], int, set[str]]:
    """`as_idempotent`, with the references removed that name an entry left out (this bundle's,
    or one of `left_out`: the keys of support entries left out); also how many references went
    and the keys of this bundle's entries left out."""
    dropped: set[str] = set()
    kept = []
    for entry in bundle.get("entry", []) or []:
        rtype = (entry.get("resource") or {}).get("resourceType")
        if keep_types is not None and rtype not in keep_types:
            dropped |= entry_keys(entry)
        else:
            kept.append(entry)
    gone = dropped | set(left_out)
    stripped = 0
    entries = []
    for entry in kept:
        resource = entry.get("resource") or {}
        if gone:
            resource, n = strip_references(resource, gone.__contains__)
            stripped += n
        rtype, rid = resource.get("resourceType"), resource.get("id")
        request = dict(entry.get("request") or {})
        if rid and request.get("method", "POST") == "POST" and not request.get("ifNoneExist"):
            request = {"method": "PUT", "url": f"{rtype}/{rid}"}
        entries.append({**entry, "resource": resource, "request": request})
    return {"resourceType": "Bundle", "type": "transaction", "entry": entries}, stripped, dropped


def as_idempotent(bundle: dict[str, Any], keep_types: set[str] | None = None) -> dict[str, Any]:
    """The same transaction with plain POSTs of resources that have ids turned into PUT by id,
    and only the `keep_types` entries (references to the others removed: see the module doc).

    Conditional creates (`ifNoneExist`) stay as they are: they are idempotent already, and they
    match what another loader may have put there under a server-assigned id.
    """
    return prepare_bundle(bundle, keep_types)[0]


def bundle_files(paths: Iterable[Path]) -> list[Path]:
    """Bundle files found under the paths, support bundles first, then by name."""
    found: list[Path] = []
    for path in paths:
        if path.is_dir():
            found += [p for p in sorted(path.rglob("*")) if p.name.endswith((".json", ".json.gz"))]
        elif path.name.endswith((".json", ".json.gz")):
            found.append(path)
    return sorted(set(found), key=lambda p: (not p.name.startswith(SUPPORT_PREFIXES), str(p)))


Unit = tuple[str, str]  # ("patient", id) for a compartment, ("resource", "Type/id") otherwise


@dataclass
class NdjsonPlan:
    """Transactions in waves: every wave after the waves it references, the transactions of
    one wave independent of each other. Each transaction is a list of units (lists of
    resources), so a failed transaction can be retried unit by unit."""

    waves: list[list[list[list[dict[str, Any]]]]] = field(default_factory=list)
    stripped: int = 0
    files: int = 0


def references(value: Any) -> Iterator[str]:
    """Every relative literal reference (`Type/id`, version dropped) inside a resource."""
    if isinstance(value, dict):
        ref = value.get("reference")
        if isinstance(ref, str):
            parts = ref.split("/")
            if len(parts) in (2, 4) and parts[0][:1].isupper() and parts[1]:
                yield f"{parts[0]}/{parts[1]}"
        for v in value.values():
            yield from references(v)
    elif isinstance(value, list):
        for v in value:
            yield from references(v)


def strip_references(value: Any, drop: Callable[[str], bool]) -> tuple[Any, int]:
    """`value` without the Reference objects whose target `drop` names (`Type/id`, version
    dropped, for a relative reference; as written for `urn:uuid:...` or `Type?query`), and
    without the objects and lists that leaves empty; and how many references went."""
    def target(v: Any) -> str | None:  # `Type/id` for a relative reference, else as written
        ref = v.get("reference") if isinstance(v, dict) else None
        if not isinstance(ref, str):
            return None
        refs = list(references({"reference": ref}))
        return refs[0] if refs else ref

    def kept(x: Any) -> tuple[Any, int, bool]:
        """`x` without the dropped references under it, how many went, and whether `x` itself
        stays (not a dropped reference, not left empty)."""
        t = target(x)
        if t is not None and drop(t):
            return None, 1, False
        x, n = walk(x)
        return x, n, x not in ({}, [])

    def walk(v: Any) -> tuple[Any, int]:
        if isinstance(v, dict):
            fields = [(k, *kept(x)) for k, x in v.items()]
            return ({k: x for k, x, _, stays in fields if stays},
                    sum(n for _, _, n, _ in fields))
        if isinstance(v, list):
            items = [kept(x) for x in v]
            return [x for x, _, stays in items if stays], sum(n for _, n, _ in items)
        return v, 0

    return walk(value)


def compartment_of(resource: dict[str, Any]) -> str | None:
    """The patient a resource belongs to: itself for a Patient, else the first Patient it
    references (subject, patient, beneficiary...), None for shared resources."""
    if resource.get("resourceType") == "Patient":
        return str(resource["id"])
    return next((r.split("/", 1)[1] for r in references(resource) if r.startswith("Patient/")),
                None)


def plan_ndjson(folder: Path, keep_types: set[str] | None = None,
                batch: int = NDJSON_BATCH) -> NdjsonPlan:
    """Read a Bulk Data folder and plan its load (see the module docstring)."""
    files = sorted(p for p in folder.iterdir() if p.name.endswith((".ndjson", ".ndjson.gz")))
    exported: set[str] = set()
    resources: list[dict[str, Any]] = []
    for path in files:
        for resource in read_ndjson(path):
            rtype, rid = resource.get("resourceType"), resource.get("id")
            if not rtype or not rid:
                continue
            exported.add(f"{rtype}/{rid}")
            if keep_types is None or rtype in keep_types:
                resources.append(resource)
    loaded = {f"{r['resourceType']}/{r['id']}" for r in resources}
    plan = NdjsonPlan(files=len(files))
    if loaded != exported:
        def left_out(ref: str) -> bool:
            return ref in exported and ref not in loaded

        for i, r in enumerate(resources):
            resources[i], n = strip_references(r, left_out)
            plan.stripped += n
    unit_of: dict[str, Unit] = {}
    members: dict[Unit, list[dict[str, Any]]] = defaultdict(list)
    for r in resources:
        ref = f"{r['resourceType']}/{r['id']}"
        pid = compartment_of(r)
        unit: Unit = ("patient", pid) if pid is not None else ("resource", ref)
        unit_of[ref] = unit
        members[unit].append(r)
    needs: dict[Unit, set[Unit]] = {u: set() for u in members}
    for unit, rs in members.items():
        for r in rs:
            for ref in references(r):
                dep = unit_of.get(ref)
                if dep is not None and dep != unit and dep in members:
                    needs[unit].add(dep)
    # Kahn's algorithm, level by level; units left in a cycle go together in the last wave
    done: set[Unit] = set()
    levels: list[tuple[list[Unit], bool]] = []  # (units, cyclic)
    pending = list(members)
    while pending:
        ready = [u for u in pending if needs[u] <= done]
        if not ready:
            levels.append((pending, True))  # one transaction: the server resolves the cycle
            break
        levels.append((ready, False))
        done.update(ready)
        ready_set = set(ready)
        pending = [u for u in pending if u not in ready_set]
    for level, cyclic in levels:
        limit = sum(len(members[u]) for u in level) if cyclic else batch
        wave: list[list[list[dict[str, Any]]]] = []
        current: list[list[dict[str, Any]]] = []
        size = 0
        for u in level:
            if current and size + len(members[u]) > limit:
                wave.append(current)
                current, size = [], 0
            current.append(members[u])
            size += len(members[u])
        if current:
            wave.append(current)
        plan.waves.append(wave)
    return plan


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
    support_left_out: set[str] = set()  # support entries not loaded, by conditional reference

    def one_file(path: Path) -> tuple[str, Counter[str], str, int]:
        try:
            bundle, stripped, dropped = prepare_bundle(_open_json(path), keep_types,
                                                       support_left_out)
        except (OSError, ValueError, AttributeError, TypeError) as exc:
            return str(path), Counter(), f"cannot read: {exc}", 0
        if path in support:
            support_left_out.update(dropped)
        return (*_send(client, str(path), bundle), stripped)

    def record(result: tuple[str, Counter[str], str, int]) -> None:
        name, counts, error, stripped = result
        report.files += 1
        report.stripped += stripped
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
        load_ndjson(client, folder, report, workers=workers, keep_types=keep_types,
                    progress=progress)
    return report


def load_ndjson(client: FhirClient, folder: Path, report: LoadReport, *, workers: int = 2,
                keep_types: set[str] | None = None, progress: bool = True,
                batch: int = NDJSON_BATCH) -> None:
    """Load one Bulk Data folder by `plan_ndjson`: waves in order, the transactions of a wave
    `workers` at a time. A refused transaction (4xx) is sent again unit by unit, so one bad
    patient does not take the others of its transaction down; errors name the folder, the
    wave and the unit's size, never a patient id."""
    try:
        plan = plan_ndjson(folder, keep_types, batch)
    except (OSError, FhirError) as exc:
        report.errors.append((str(folder), str(exc)))
        return
    report.files += plan.files
    report.stripped += plan.stripped
    bar = tqdm(total=sum(len(w) for w in plan.waves), unit="transaction",
               disable=not progress, desc=folder.name)

    def send(wave: int, units: list[list[dict[str, Any]]]) -> tuple[Counter[str],
                                                                     list[tuple[str, str]]]:
        name = f"{folder} (wave {wave + 1}, {sum(map(len, units))} resources)"
        counts: Counter[str] = Counter()
        try:
            client.transaction(_put_bundle([r for u in units for r in u]))
        except FhirError as exc:
            refused = isinstance(exc, FhirHTTPError) and 400 <= exc.status < 500
            if not refused or len(units) == 1:
                return counts, [(name, str(exc))]
            errors = []
            for unit in units:  # find the unit the server refuses; load the others
                c, e = send(wave, [unit])
                counts.update(c)
                errors += e
            return counts, errors
        counts.update(r["resourceType"] for u in units for r in u)
        return counts, []

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for i, wave in enumerate(plan.waves):
            for counts, errors in pool.map(lambda units, i=i: send(i, units), wave):
                report.counts.update(counts)
                report.errors += errors
                bar.update(1)
    bar.close()
