"""Training examples from FHIR: a patient at an index time, inputs before it, labels after it.

Index times (per patient, seeded):
* **onset**: the recording time of each disorder that is new at that moment (never recorded
  before, or a new episode after the earlier one abated). Inputs end strictly before it, so the
  diagnosing encounter's own labs and note (same timestamp in Synthea) are never inputs: the task
  is to anticipate the diagnosis from the history, not to read it off the visit that made it.
* **random**: a uniformly drawn time after the patient's first `min_prior_labs` lab readings and
  before their last record, so that some follow-up exists. Its labels are whatever is newly
  recorded in the window, often nothing: these are the negatives.

`visit_lab_hours` > 0 relaxes this for labs only, for every index time alike (else the mere
presence of same-visit results would mark onset examples): the results drawn at the index
visit become inputs, the task becomes diagnosing at that visit. Off by default.

Labels: disorders of the graph vocabulary (SNOMED; ICD-10-CM/WHO codes mapped with
`kg.snomed_for_icd10`), plus their IS-A ancestors, first recorded at or after the index time
and before index + `window_days`. A Condition's time is the earlier of onset and recordedDate
(clinosim re-records old problems at its snapshot date; their onset is what dates them).

Chronic conditions known before the index time (recorded earlier and not abated) are *not*
labels: they are context. Their codes go to `meta["prior_disorders"]` and notes naming them are
left alone. Every other disorder named in a note (labels included) is masked
(`training.leakage`, scope "unknown"), so what is hidden depends on the history only and the
placeholder says nothing about the labels; scope "labels" hides the labels only.

Splits are by patient, from a keyed hash of (seed, source, patient id), so adding patients
never moves existing ones between splits.

Over 400 lines because the four `# ---` sections (configuration and results, labels from
Conditions, examples per patient, the build) are one definition of what an example is: index
times, labels and inputs are cut at the same instant and must change together. Reading records
is `training.sources`, the leakage mask `training.leakage`, the encoding `encoding.patient`.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import random
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pandas as pd
from tqdm import tqdm

from clinragen_fhir.encoding.patient import PatientInputs, encode_patient
from clinragen_fhir.encoding.schema import LAB_COLUMNS, Note, PatientContext
from clinragen_fhir.fhir.client import FhirClient
from clinragen_fhir.fhir.resources import to_utc
from clinragen_fhir.knowledge import KnowledgeGraph, load_graph
from clinragen_fhir.knowledge.masking import ROOTS
from training.example import Example, read_examples, write_examples
from training.leakage import mask_notes, masked_codes
from training.sources import (
    PatientRecord,
    file_digest,
    iter_bundle_records,
    iter_ndjson_records,
    iter_server_records,
    ndjson_files,
    patient_bundle_files,
)
from training.synthea import chunk_dirs

log = logging.getLogger(__name__)

SPLITS = ("train", "valid", "test")
SNOMED_SYSTEM = "http://snomed.info/sct"
ICD10_SYSTEMS = ("http://hl7.org/fhir/sid/icd-10-cm", "http://hl7.org/fhir/sid/icd-10")
NOT_A_DIAGNOSIS = {"refuted", "entered-in-error"}


# ---------------------------------------------------------------------------------------------
# configuration and results


@dataclass(frozen=True)
class BuildConfig:
    """How examples are cut. Every field is recorded in the manifest."""

    window_days: int = 365  # labels: recorded in [index, index + window)
    lookback_days: int = 3 * 365  # inputs: dated in [index - lookback, index), as the worker
    seed: int = 0
    split_fractions: tuple[float, float, float] = (0.7, 0.15, 0.15)
    include_ancestors: bool = True  # a label implies its IS-A ancestors in the graph
    leak_policy: str = "mask"  # "mask" the mention | "drop" the note
    mask_scope: str = "unknown"  # hide "labels" only | every disorder "unknown" at index time
    max_onset_per_patient: int = 6  # onset index times kept per patient (seeded sample)
    random_per_patient: int = 1  # random index times per patient
    min_prior_labs: int = 1  # lab readings needed before a random index time
    min_prior_inputs: int = 1  # labs + notes needed before any index time
    vocabulary: tuple[str, ...] | None = None  # SNOMED ids to label; None = all graph disorders
    exclude_labels: tuple[str, ...] = tuple(sorted(ROOTS))  # "Disease": implied by any label
    max_patients: int | None = None  # per source, first N by id (quick runs)
    # > 0: also labs dated in [index, index + h): the results of the visit at the index time
    # ("diagnose with this visit's results"); notes stay strictly before. 0 = strict (default)
    visit_lab_hours: float = 0.0
    # "visit" (default): the worker's question, one example per visit with results (see
    # `visit_examples`); "onset": anticipate a diagnosis from the history before it
    mode: str = "visit"
    visit_gap_hours: float = 12.0  # readings closer than this belong to one visit
    max_visits_per_patient: int = 4  # visits kept per patient (seeded sample)


@dataclass
class Source:
    """Where patients come from: a Bundle file/folder, an NDJSON folder, or a FHIR server."""

    name: str
    kind: str  # "bundles" | "ndjson" | "cohort" (a generated Synthea cohort) | "fhir"
    path: Path | None = None
    client: FhirClient | None = None
    patient_ids: list[str] | None = None

    def records(self) -> Iterator[PatientRecord]:
        if self.kind == "bundles" and self.path is not None:
            return iter_bundle_records([self.path])
        if self.kind == "ndjson" and self.path is not None:
            return iter_ndjson_records(self.path)
        if self.kind == "cohort" and self.path is not None:  # training.synthea, chunk by chunk
            return itertools.chain.from_iterable(iter_ndjson_records(d)
                                                 for d in chunk_dirs(self.path))
        if self.kind == "fhir" and self.client is not None:
            return iter_server_records(self.client, self.patient_ids)
        raise ValueError(f"source {self.name!r} of kind {self.kind!r} has nothing to read")

    def describe(self) -> dict[str, Any]:
        """Name, kind and a content hash (files) or a hash of the base URL (servers)."""
        out: dict[str, Any] = {"name": self.name, "kind": self.kind}
        if self.path is not None:
            files = (ndjson_files(self.path) if self.kind == "ndjson"
                     else [f for d in chunk_dirs(self.path) for f in ndjson_files(d)]
                     if self.kind == "cohort" else patient_bundle_files([self.path]))
            out.update(files=len(files), sha256=file_digest(files))
        if self.client is not None:
            out["server_sha256"] = hashlib.sha256(self.client.base_url.encode()).hexdigest()[:16]
        return out


def source_from_spec(spec: str | Path) -> Source:
    """'NAME=PATH' or 'PATH': a folder with *.ndjson is Bulk Data, else Bundles. The default
    name is the folder name (its parent's for clinosim's 'fhir_r4' subfolder)."""
    text = str(spec)
    name = ""
    if "=" in text and not Path(text).exists():
        name, text = text.split("=", 1)
    path = Path(text)
    if not path.exists():
        raise FileNotFoundError(f"data source not found: {path}")
    kind = ("cohort" if path.is_dir() and (path / "spec.json").is_file()
            else "ndjson" if path.is_dir() and ndjson_files(path) else "bundles")
    if not name:
        base = path.resolve()
        name = (base.parent.name if base.name in ("fhir", "fhir_r4", "ndjson", "output")
                else base.name)
        name = name.removesuffix(".json.gz").removesuffix(".json")
    return Source(name, kind, path=path)


@dataclass
class Manifest:
    """What was built, from what, with which settings; written as manifest.json."""

    seed: int
    config: dict[str, Any]
    knowledge_version: str
    sources: list[dict[str, Any]]
    counts: dict[str, dict[str, int]] = field(default_factory=dict)  # split -> examples, ...
    positives: dict[str, dict[str, Any]] = field(default_factory=dict)  # code -> term, split n
    prevalence: dict[str, dict[str, float]] = field(default_factory=dict)  # split -> code -> p
    index_kinds: dict[str, int] = field(default_factory=dict)
    leakage: dict[str, int] = field(default_factory=dict)
    skipped_patients: dict[str, int] = field(default_factory=dict)  # reason -> n
    unmapped_conditions: dict[str, int] = field(default_factory=dict)  # code -> n (top 30)
    files: dict[str, str] = field(default_factory=dict)  # split -> file name
    build_seconds: float = 0.0
    teacher: dict[str, Any] = field(default_factory=dict)  # set by training.annotate

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Manifest:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


# ---------------------------------------------------------------------------------------------
# conditions -> dated disorder events


@dataclass(frozen=True)
class DisorderEvent:
    """One recorded disorder of the vocabulary, dated; `end` is its abatement if any."""

    snomed: str
    time: pd.Timestamp
    end: pd.Timestamp | None
    code: str  # the code as recorded, "sct|..." or "icd10|..."


def _coded(resource: dict[str, Any], key: str) -> set[str]:
    concept = resource.get(key) or {}
    return {str(c.get("code")) for c in concept.get("coding") or [] if c.get("code")}


def disorder_events(conditions: Iterable[dict[str, Any]], kg: KnowledgeGraph,
                    unmapped: Counter[str] | None = None) -> list[DisorderEvent]:
    """Conditions that are disorders of the graph, dated by min(onset, recordedDate)."""
    disorders = kg.disorders()
    events: list[DisorderEvent] = []
    for c in conditions:
        if _coded(c, "verificationStatus") & NOT_A_DIAGNOSIS:
            continue
        onset = c.get("onsetDateTime") or (c.get("onsetPeriod") or {}).get("start")
        times = [t for t in (to_utc(onset), to_utc(c.get("recordedDate"))) if t is not None]
        if not times:
            continue
        end = to_utc(c.get("abatementDateTime") or (c.get("abatementPeriod") or {}).get("end"))
        for coding in (c.get("code") or {}).get("coding") or []:
            system, code = coding.get("system"), str(coding.get("code") or "")
            snomed: str | None = None
            if system == SNOMED_SYSTEM:
                snomed = code if code in disorders else None
                tag = f"sct|{code}"
            elif system in ICD10_SYSTEMS:
                snomed = kg.snomed_for_icd10(code)
                tag = f"icd10|{code}"
            else:
                continue
            if snomed is None:
                if unmapped is not None:
                    unmapped[tag] += 1
                continue
            events.append(DisorderEvent(snomed, min(times), end, tag))
            break
    events.sort(key=lambda e: (e.time, e.snomed))
    return events


def _closure(kg: KnowledgeGraph, codes: Iterable[str], ancestors: bool) -> set[str]:
    out: set[str] = set()
    for c in codes:
        out.add(c)
        if ancestors:
            out |= kg.ancestors(c)
    return out


def known_at(kg: KnowledgeGraph, events: Sequence[DisorderEvent], t: pd.Timestamp,
             ancestors: bool = True) -> set[str]:
    """Disorders recorded before t and not abated by t: the patient's known problems."""
    return _closure(kg, (e.snomed for e in events
                         if e.time < t and (e.end is None or e.end >= t)), ancestors)


def labels_at(kg: KnowledgeGraph, events: Sequence[DisorderEvent], t: pd.Timestamp,
              window: timedelta, ancestors: bool = True,
              vocabulary: set[str] | None = None) -> dict[str, pd.Timestamp]:
    """New disorders recorded in [t, t + window) that are not known at t -> first time."""
    known = known_at(kg, events, t, ancestors)
    out: dict[str, pd.Timestamp] = {}
    for e in events:
        if t <= e.time < t + window:
            for code in _closure(kg, [e.snomed], ancestors):
                if code not in known and (vocabulary is None or code in vocabulary):
                    out.setdefault(code, e.time)
    return out


# ---------------------------------------------------------------------------------------------
# one patient -> examples


@dataclass
class EncodedPatient:
    """A patient's record, its inputs encoded once (`encoding.patient.encode_patient`, the
    worker's encoding) and its disorder events, sliced per index time."""

    record: PatientRecord
    inputs: PatientInputs
    events: list[DisorderEvent]
    notes: list[Note]  # dated notes only (an undated note cannot be placed before an index)
    n_skips: int
    note_times: list[pd.Timestamp] = field(default_factory=list)  # UTC, parallel to notes

    @property
    def context(self) -> PatientContext:
        return self.inputs.patient

    @property
    def labs(self) -> pd.DataFrame:
        return self.inputs.labs


def encode_record(record: PatientRecord, kg: KnowledgeGraph,
                  unmapped: Counter[str] | None = None) -> EncodedPatient:
    """Lab frame and notes as the worker builds them; reference ranges use age at build time."""
    inputs = encode_patient(record.patient or None, record.observations, record.documents, kg,
                            datetime.now(UTC), patient_id=record.patient_id)
    dated = [n for n in inputs.notes if n.time is not None]
    events = disorder_events(record.conditions, kg, unmapped)
    return EncodedPatient(record, inputs, events, dated,
                          len(inputs.skips) + len(inputs.notes) - len(dated),
                          [pd.Timestamp(n.time) for n in dated if n.time is not None])


def _rng(seed: int, *parts: str) -> random.Random:
    key = hashlib.sha256(":".join([str(seed), *parts]).encode()).digest()
    return random.Random(int.from_bytes(key[:8], "big"))


def split_of(seed: int, source: str, patient_id: str,
             fractions: tuple[float, float, float] = (0.7, 0.15, 0.15)) -> str:
    """train/valid/test by a keyed hash of the patient: stable, order-free, seeded."""
    key = hashlib.sha256(f"split:{seed}:{source}:{patient_id}".encode()).digest()
    u = int.from_bytes(key[:8], "big") / 2**64
    total = sum(fractions)
    if u < fractions[0] / total:
        return "train"
    return "valid" if u < (fractions[0] + fractions[1]) / total else "test"


def index_times(enc: EncodedPatient, kg: KnowledgeGraph,
                cfg: BuildConfig) -> list[tuple[pd.Timestamp, str]]:
    """(index time, kind) for one patient: seeded sample of onsets, plus random times."""
    rng = _rng(cfg.seed, "index", enc.record.patient_id)
    vocab = set(cfg.vocabulary) if cfg.vocabulary is not None else None
    lab_times = sorted(pd.to_datetime(enc.labs["time"], utc=True).unique()) \
        if not enc.labs.empty else []
    note_times = sorted(enc.note_times)
    lookback = timedelta(days=cfg.lookback_days)

    def n_prior(t: pd.Timestamp) -> int:
        lo = t - lookback
        return (sum(1 for x in lab_times if lo <= x < t)
                + sum(1 for x in note_times if lo <= x < t))

    onsets: list[pd.Timestamp] = []
    for t in sorted({e.time for e in enc.events}):
        new_now = set(labels_at(kg, enc.events, t, timedelta(seconds=1),
                                cfg.include_ancestors, vocab)) - set(cfg.exclude_labels)
        if new_now and n_prior(t) >= cfg.min_prior_inputs:
            onsets.append(t)
    if len(onsets) > cfg.max_onset_per_patient:
        onsets = sorted(rng.sample(onsets, cfg.max_onset_per_patient))
    out = [(t, "onset") for t in onsets]
    all_times = lab_times + note_times
    if len(lab_times) >= max(cfg.min_prior_labs, 1) and all_times:
        lo = lab_times[cfg.min_prior_labs - 1] + timedelta(seconds=1) if cfg.min_prior_labs \
            else min(all_times) + timedelta(seconds=1)
        hi = max(all_times)
        taken = set(onsets)
        for _ in range(cfg.random_per_patient):
            if hi <= lo:
                break
            t = lo + timedelta(seconds=rng.randrange(int((hi - lo).total_seconds())))
            t = pd.Timestamp(t).floor("s")
            if t not in taken and n_prior(t) >= cfg.min_prior_inputs:
                taken.add(t)
                out.append((t, "random"))
    return sorted(out)


def visits(enc: EncodedPatient, gap_hours: float) -> list[tuple[pd.Timestamp, pd.Timestamp]]:
    """(first, last) reading time of each visit: readings closer than `gap_hours` to the previous
    one belong to the same visit (Synthea stamps a visit's results at its start)."""
    if enc.labs.empty:
        return []
    times = sorted(pd.to_datetime(enc.labs["time"], utc=True).unique())
    gap = timedelta(hours=gap_hours)
    out: list[tuple[pd.Timestamp, pd.Timestamp]] = []
    start = prev = pd.Timestamp(times[0])
    for t in map(pd.Timestamp, times[1:]):
        if t - prev > gap:
            out.append((start, prev))
            start = t
        prev = t
    out.append((start, prev))
    return out


def active_at(kg: KnowledgeGraph, events: Sequence[DisorderEvent], t: pd.Timestamp,
              vocabulary: set[str], ancestors: bool = True) -> set[str]:
    """Disorders recorded at or before t and not abated before t, within the vocabulary."""
    return _closure(kg, (e.snomed for e in events
                         if e.time <= t and (e.end is None or e.end >= t)),
                    ancestors) & vocabulary


def visit_examples(enc: EncodedPatient, kg: KnowledgeGraph, cfg: BuildConfig,
                   source: str) -> list[Example]:
    """The worker's question: at the end of a visit with results, which disorders does the record
    support? Inputs: that visit's results plus the lookback before it, and the notes up to the
    visit's end, every disorder name in them masked (known problems are labels here, so they are
    hidden too). Labels: the disorders active at the visit's end, in the revealable vocabulary
    (`training.vocabulary`); `meta["new_labels"]` are those first recorded at this visit."""
    from training.vocabulary import revealable_disorders

    vocab = set(cfg.vocabulary) if cfg.vocabulary is not None else revealable_disorders(kg)
    vocab -= set(cfg.exclude_labels)
    lookback = timedelta(days=cfg.lookback_days)
    slack = timedelta(hours=1)  # a diagnosis recorded just after the visit's last result
    split = split_of(cfg.seed, source, enc.record.patient_id, cfg.split_fractions)
    every = visits(enc, cfg.visit_gap_hours)
    rng = _rng(cfg.seed, "visits", enc.record.patient_id)
    chosen = sorted(rng.sample(every, cfg.max_visits_per_patient)) \
        if len(every) > cfg.max_visits_per_patient else every
    times = pd.to_datetime(enc.labs["time"], utc=True) if not enc.labs.empty else None
    mask = masked_codes(kg, [], [], "unknown")  # every disorder of the graph
    out: list[Example] = []
    for start, end in chosen:
        if times is None:
            break
        t = end + slack
        labs = enc.labs[(times >= start - lookback) & (times <= end)].reset_index(drop=True)
        notes = [n for n, nt in zip(enc.notes, enc.note_times, strict=True)
                 if start - lookback <= nt <= t]
        masked = mask_notes(kg, notes, mask, cfg.leak_policy)
        labels = active_at(kg, enc.events, t, vocab, cfg.include_ancestors)
        before = active_at(kg, enc.events, start - slack, vocab, cfg.include_ancestors)
        new = sorted(labels - before)
        ctx = PatientContext(enc.context.patient_id, enc.context.sex, enc.context.birth_date,
                             t.to_pydatetime())
        visit_times = pd.to_datetime(labs["time"], utc=True)
        out.append(Example(
            example_id=f"{source}:{enc.record.patient_id}:{t.isoformat()}", source=source,
            patient=ctx, labs=labs, notes=masked.notes, labels=sorted(labels), split=split,
            meta={"index_kind": "visit", "new_labels": new,
                  "prior_disorders": sorted(before), "n_labs": len(labs),
                  "n_notes": len(masked.notes),
                  "visit_labs": int((visit_times >= start).sum()),
                  "masked_mentions": masked.masked_mentions,
                  "masked_notes": masked.masked_notes, "dropped_notes": masked.dropped_notes,
                  "origin": enc.record.origin, "teacher": None}))
    return out


def examples_for_patient(enc: EncodedPatient, kg: KnowledgeGraph, cfg: BuildConfig,
                         source: str) -> list[Example]:
    """Every example of one patient (see the module docstring for the rules)."""
    if cfg.mode == "visit":
        return visit_examples(enc, kg, cfg, source)
    if cfg.mode != "onset":
        raise ValueError(f"build mode must be 'visit' or 'onset', not {cfg.mode!r}")
    vocab = set(cfg.vocabulary) if cfg.vocabulary is not None else None
    window = timedelta(days=cfg.window_days)
    lookback = timedelta(days=cfg.lookback_days)
    split = split_of(cfg.seed, source, enc.record.patient_id, cfg.split_fractions)
    times = pd.to_datetime(enc.labs["time"], utc=True) if not enc.labs.empty else None
    last_record = max([*(times.tolist() if times is not None else []),
                       *enc.note_times,
                       *(e.time for e in enc.events)], default=None)
    out: list[Example] = []
    for t, kind in index_times(enc, kg, cfg):
        if times is not None:
            until = t + timedelta(hours=cfg.visit_lab_hours)
            labs = enc.labs[(times >= t - lookback) & (times < until)].reset_index(drop=True)
        else:
            labs = pd.DataFrame(columns=list(LAB_COLUMNS))
        notes = [n for n, nt in zip(enc.notes, enc.note_times, strict=True)
                 if t - lookback <= nt < t]
        labels = labels_at(kg, enc.events, t, window, cfg.include_ancestors, vocab)
        for code in cfg.exclude_labels:
            labels.pop(code, None)
        prior = sorted(known_at(kg, enc.events, t, cfg.include_ancestors))
        masked = mask_notes(kg, notes, masked_codes(kg, labels, prior, cfg.mask_scope),
                            cfg.leak_policy)
        if labs.empty and not masked.notes:
            continue
        ctx = PatientContext(enc.context.patient_id, enc.context.sex, enc.context.birth_date,
                             t.to_pydatetime())
        codes = sorted(labels, key=lambda c: (labels[c], c))
        out.append(Example(
            example_id=f"{source}:{enc.record.patient_id}:{t.isoformat()}", source=source,
            patient=ctx, labs=labs, notes=masked.notes, labels=codes, split=split,
            meta={"index_kind": kind, "window_days": cfg.window_days,
                  "label_days": {c: round((labels[c] - t).total_seconds() / 86400, 2)
                                 for c in codes},
                  "prior_disorders": prior, "n_labs": len(labs), "n_notes": len(masked.notes),
                  "visit_labs": int((pd.to_datetime(labs["time"], utc=True) >= t).sum())
                  if not labs.empty else 0,
                  "masked_mentions": masked.masked_mentions,
                  "masked_notes": masked.masked_notes, "dropped_notes": masked.dropped_notes,
                  "followup_days": round((last_record - t).total_seconds() / 86400, 2)
                  if last_record is not None else 0.0,
                  "origin": enc.record.origin, "teacher": None}))
    return out


# ---------------------------------------------------------------------------------------------
# the whole dataset


def iter_examples(sources: Sequence[Source], kg: KnowledgeGraph, cfg: BuildConfig,
                  stats: Manifest | None = None, progress: bool = False) -> Iterator[Example]:
    """Examples of every patient of every source, in source then patient-id order."""
    unmapped: Counter[str] = Counter()
    skipped: Counter[str] = Counter()
    for src in sources:
        records: Iterable[PatientRecord] = src.records()
        if cfg.max_patients is not None:
            records = itertools.islice(records, cfg.max_patients)
        for record in tqdm(records, desc=f"build {src.name}", unit="patient",
                           disable=not progress):
            enc = encode_record(record, kg, unmapped)
            examples = examples_for_patient(enc, kg, cfg, src.name)
            if not examples:
                skipped["no index time with prior inputs" if enc.events or not enc.labs.empty
                        else "no usable labs, notes or disorders"] += 1
            yield from examples
    if stats is not None:
        stats.unmapped_conditions = dict(unmapped.most_common(30))
        stats.skipped_patients = dict(skipped)


def build_dataset(sources: Sequence[Source | str | Path], out_dir: Path, seed: int = 0,
                  window_days: int = 365, config: BuildConfig | None = None,
                  kg: KnowledgeGraph | None = None, progress: bool = True) -> Manifest:
    """Build, split and write `{train,valid,test}.jsonl` and `manifest.json` under out_dir."""
    started = time.perf_counter()
    cfg = config or BuildConfig(seed=seed, window_days=window_days)
    kg = kg or load_graph()
    srcs = [s if isinstance(s, Source) else source_from_spec(s) for s in sources]
    manifest = Manifest(seed=cfg.seed, config=asdict(cfg), knowledge_version=kg.version,
                        sources=[s.describe() for s in srcs])
    out_dir.mkdir(parents=True, exist_ok=True)
    per_split: dict[str, list[Example]] = {s: [] for s in SPLITS}
    for ex in iter_examples(srcs, kg, cfg, manifest, progress):
        per_split[ex.split].append(ex)
    positives: dict[str, Counter[str]] = {s: Counter() for s in SPLITS}
    leakage: Counter[str] = Counter()
    kinds: Counter[str] = Counter()
    for split, examples in per_split.items():
        write_examples(out_dir / f"{split}.jsonl", examples)
        manifest.files[split] = f"{split}.jsonl"
        manifest.counts[split] = {
            "examples": len(examples),
            "patients": len({(e.source, e.patient.patient_id) for e in examples}),
            "with_labels": sum(1 for e in examples if e.labels),
            "labs": sum(len(e.labs) for e in examples),
            "notes": sum(len(e.notes) for e in examples)}
        for e in examples:
            positives[split].update(e.labels)
            kinds[str(e.meta["index_kind"])] += 1
            for key in ("masked_mentions", "masked_notes", "dropped_notes"):
                leakage[key] += int(e.meta[key])
            leakage["examples_with_masking"] += int(bool(e.meta["masked_notes"]
                                                         or e.meta["dropped_notes"]))
        manifest.prevalence[split] = {c: round(n / len(examples), 4)
                                      for c, n in sorted(positives[split].items())} \
            if examples else {}
    codes = sorted(set().union(*positives.values()))
    for code in codes:
        dis = kg.disorder(code)
        manifest.positives[code] = {"term": dis.term if dis else code,
                                    **{s: positives[s][code] for s in SPLITS},
                                    "total": sum(positives[s][code] for s in SPLITS)}
    manifest.index_kinds = dict(kinds)
    manifest.leakage = dict(leakage)
    manifest.build_seconds = round(time.perf_counter() - started, 2)
    (out_dir / "manifest.json").write_text(json.dumps(manifest.to_json(), indent=2) + "\n")
    return manifest


def read_dataset_manifest(out_dir: Path) -> Manifest:
    """A built dataset's manifest.json (the ONNX model's is `inference.manifest.read_manifest`)."""
    return Manifest.from_json(json.loads((out_dir / "manifest.json").read_text()))


def load_split(out_dir: Path, split: str) -> list[Example]:
    """The examples of one split of a built dataset."""
    return list(read_examples(out_dir / f"{split}.jsonl"))
