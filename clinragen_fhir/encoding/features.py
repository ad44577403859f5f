"""Patient inputs -> plain integer/float arrays the prefix builder reads.

numpy, pandas and a `tokenizers` tokenizer only (no torch): it lives in the runtime so that the
onnxruntime worker featurises exactly as training did.
Nothing is imputed: a reading without a reference range, or without an earlier reading to give a
trend, gets value 0 and a mask of 0, and the encoder sees the mask.

Over 400 lines because every array the prefix graph reads is made here, in its `# ---` sections
(labs, notes, knowledge, one patient then a batch): one module, so that training and the worker
cannot featurise differently. A reading's text is `encoding.schema.describe_reading`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, NamedTuple, Protocol

import numpy as np
import pandas as pd

from clinragen_fhir.encoding.schema import Note, PatientContext, Reading, describe_reading
from clinragen_fhir.encoding.times import DAY_SECONDS, epoch_seconds, instant_seconds

if TYPE_CHECKING:
    from clinragen_fhir.knowledge import Retrieval

PAD_ID = 0  # LOINC vocabulary: padding
UNK_ID = 1  # LOINC vocabulary: a code the vocabulary does not know

# The names of the arrays `collate` returns, in the order the prefix builder takes them (and the
# ONNX graph's input names).
BATCH_KEYS: tuple[str, ...] = (
    "lab_code", "lab_value", "lab_value_mask", "lab_time", "lab_trend", "lab_trend_mask",
    "lab_gap", "lab_mask", "note_ids", "note_mask", "fact_ids", "fact_token_mask", "fact_mask",
    "test_code", "test_stats", "test_mask", "patient_stats",
    "note_bag_ids", "note_bag_weight", "note_bag_mask",
)
# What every prefix graph takes; the record summary (`test_*`, `patient_stats`) only a model
# trained with `Budgets.max_tests > 0` reads, the notes' vocabulary (`note_bag_*`) only one with
# `Budgets.max_note_bag > 0`, and an ONNX graph declares only what it reads.
CORE_BATCH_KEYS: tuple[str, ...] = BATCH_KEYS[:13]
TEST_STATS = 8  # columns of `test_stats` (see `featurise_tests`)
PATIENT_STATS = 4  # columns of `patient_stats` (see `featurise_patient`)


class Encoding(Protocol):
    @property
    def ids(self) -> list[int]: ...


class TextTokenizer(Protocol):
    """What we need of a `tokenizers.Tokenizer` (the runtime has no transformers)."""

    def encode(self, sequence: str, pair: str | None = None, is_pretokenized: bool = False,
               add_special_tokens: bool = True) -> Encoding: ...


@dataclass(frozen=True)
class Budgets:
    """Token budgets; small by default (2 CPU cores): prefix length is what costs latency."""

    max_labs: int = 64  # most recent readings kept
    max_facts: int = 32  # highest-ranked knowledge facts kept
    max_fact_tokens: int = 32  # tokens per fact text
    max_note_tokens: int = 384  # over all notes, most recent note first
    # The newest reading of each test as text ("HbA1c 7.2 % on 2024-03-01, high"), ahead of
    # the notes: lab tokens are embeddings the SLM cannot copy, so without this its rationales
    # cannot cite a value. 0 = off (models trained before this existed).
    max_lab_text_tokens: int = 0
    # The same readings as text after the prefix, in the decoder's prompt (`encoding.prompt`):
    # the rationale copies from there, and the fusion and head never pay for these tokens.
    prompt_reading_tokens: int = 0
    # The record summary for the diagnosis head: one token per test over the whole lookback
    # (newest, lowest, highest, mean...), the tests read most recently first, plus one token for
    # age and sex. The readings budget keeps a few readings per test, and a diagnosis often rests
    # on the history (the highest HbA1c in three years). 0 = off (models trained before this).
    max_tests: int = 0
    # The notes' vocabulary for the diagnosis head: each distinct token of all the visit's notes
    # once, with log1p(its count). The decoder reads only `max_note_tokens` of the newest note,
    # and a disorder is often written down (a medication, a finding) in an older one. When
    # there are more, the highest token ids are kept: a BPE merges frequent strings first, so a
    # high id is a rare word. 0 = off (models trained before this).
    max_note_bag: int = 0


@dataclass(frozen=True)
class Modalities:
    """Which inputs the model sees (training stages and ablations switch these per call)."""

    labs: bool = True
    notes: bool = True
    knowledge: bool = True


@dataclass(frozen=True)
class Fact:
    """One retrieved knowledge fact as the model reads it, with the id it is cited by."""

    id: str
    subject: str
    relation: str
    object: str
    score: float

    @property
    def text(self) -> str:
        return f"{self.subject} {self.relation} {self.object}"


@dataclass
class Features:
    """One patient's arrays (unpadded) plus the references that make attention explainable."""

    lab_code: np.ndarray  # int64 [L]: LOINC vocabulary ids
    lab_value: np.ndarray  # float32 [L]: value against the reference range, squashed
    lab_value_mask: np.ndarray  # float32 [L]: 1 where the value could be normalised
    lab_time: np.ndarray  # float32 [L]: days before the index time (>= 0)
    lab_trend: np.ndarray  # float32 [L]: change since the previous reading of the same code
    lab_trend_mask: np.ndarray  # float32 [L]: 1 where there was a previous reading
    lab_gap: np.ndarray  # float32 [L]: days since the previous reading of the same code
    note_ids: np.ndarray  # int64 [N]: note tokens, most recent note first
    fact_ids: np.ndarray  # int64 [K, T]: fact text tokens
    fact_token_mask: np.ndarray  # float32 [K, T]
    labs: list[Reading] = field(default_factory=list)
    facts: list[Fact] = field(default_factory=list)
    notes: list[tuple[str, int, int]] = field(default_factory=list)  # (document id, start, end)
    # each reading the prompt shows (`citable_readings`), in the prompt's order
    shown: list[Shown] = field(default_factory=list)
    test_code: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # [S]
    test_stats: np.ndarray = field(  # float32 [S, TEST_STATS]
        default_factory=lambda: np.zeros((0, TEST_STATS), np.float32))
    patient_stats: np.ndarray = field(  # float32 [PATIENT_STATS]
        default_factory=lambda: np.zeros(PATIENT_STATS, np.float32))
    note_bag_ids: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # [U]
    note_bag_weight: np.ndarray = field(  # float32 [U]: log1p(count)
        default_factory=lambda: np.zeros(0, np.float32))

    @property
    def readings(self) -> list[str]:
        """The texts of `shown`: what the prompt writes and the rationale may cite."""
        return [r.text for r in self.shown]

    @property
    def reading_supports(self) -> list[frozenset[str]]:
        """Per reading of `shown`, the disorders it is evidence for (grounding: which lines may
        cite it)."""
        return [r.supports for r in self.shown]


# ---------------------------------------------------------------------------------------------
# labs


def squash(x: np.ndarray) -> np.ndarray:
    """sign(x)·log(1+|x|): keeps order, tames outliers (a glucose of 900 is not 10x news)."""
    out: np.ndarray = np.sign(x) * np.log1p(np.abs(x))
    return out


def normalise_values(value: np.ndarray, low: np.ndarray, high: np.ndarray) -> np.ndarray:
    """Value on the reference-range scale: -1 at the low limit, +1 at the high limit.

    With one limit only, that limit maps to ±1 and the scale is the limit itself; with none the
    result is NaN (unknown), which the caller turns into a mask, not a guess.
    """
    both = np.isfinite(low) & np.isfinite(high) & (high > low)
    only_high = ~both & np.isfinite(high) & (high != 0)
    only_low = ~both & ~only_high & np.isfinite(low) & (low != 0)
    z = np.full(value.shape, np.nan)
    mid, half = (low + high) / 2.0, (high - low) / 2.0
    z[both] = (value[both] - mid[both]) / half[both]
    z[only_high] = 1.0 + (value[only_high] - high[only_high]) / np.abs(high[only_high])
    z[only_low] = -1.0 + (value[only_low] - low[only_low]) / np.abs(low[only_low])
    return z


def featurise_labs(frame: pd.DataFrame, vocab: dict[str, int], index_time: datetime | None,
                   max_labs: int) -> tuple[dict[str, np.ndarray], list[Reading]]:
    """The lab frame -> per-reading arrays; trends use the whole history, then the newest kept."""
    n = len(frame)
    if n == 0 or max_labs <= 0:
        empty_f = np.zeros(0, dtype=np.float32)
        return ({"lab_code": np.zeros(0, dtype=np.int64), "lab_value": empty_f,
                 "lab_value_mask": empty_f, "lab_time": empty_f, "lab_trend": empty_f,
                 "lab_trend_mask": empty_f, "lab_gap": empty_f}, [])
    f = frame.sort_values(["time", "loinc"], kind="stable").reset_index(drop=True)
    value = f["value"].to_numpy(dtype=float)
    z = normalise_values(value, f["ref_low"].to_numpy(dtype=float),
                         f["ref_high"].to_numpy(dtype=float))
    seconds = epoch_seconds(f["time"])
    index_s = instant_seconds(index_time) if index_time is not None else float(seconds.max())
    days_before = np.maximum(index_s - seconds, 0.0) / DAY_SECONDS

    # trend and gap against the previous reading of the same code
    trend = np.zeros(n)
    trend_mask = np.zeros(n)
    gap = np.zeros(n)
    last: dict[str, int] = {}
    codes = f["loinc"].astype(str).to_numpy()
    for i, code in enumerate(codes):
        j = last.get(code)
        last[code] = i
        if j is None:
            continue
        gap[i] = (seconds[i] - seconds[j]) / DAY_SECONDS
        if np.isfinite(z[i]) and np.isfinite(z[j]):
            trend[i], trend_mask[i] = z[i] - z[j], 1.0
        elif value[j] != 0 and np.isfinite(value[i]) and np.isfinite(value[j]):
            trend[i], trend_mask[i] = (value[i] - value[j]) / abs(value[j]), 1.0  # relative
    keep = _kept_readings(codes, seconds, max_labs)
    known = np.isfinite(z)
    arrays = {
        "lab_code": np.array([vocab.get(c, UNK_ID) for c in codes[keep]], dtype=np.int64),
        "lab_value": squash(np.where(known, z, 0.0))[keep].astype(np.float32),
        "lab_value_mask": known[keep].astype(np.float32),
        "lab_time": days_before[keep].astype(np.float32),
        "lab_trend": squash(trend)[keep].astype(np.float32),
        "lab_trend_mask": trend_mask[keep].astype(np.float32),
        "lab_gap": gap[keep].astype(np.float32),
    }
    refs = [Reading(str(r["observation_id"]), str(r["version_id"]), str(r["loinc"]),
                   str(r["display"]), float(r["value"]), str(r["unit"]),
                   pd.Timestamp(r["time"]).isoformat())
            for r in f.iloc[keep].to_dict("records")]
    return arrays, refs


def _kept_readings(codes: np.ndarray, seconds: np.ndarray, max_labs: int) -> np.ndarray:
    """Indices (in time order) of the readings that fit the budget: the newest reading of every
    test first, then the next newest of each, and so on. Keeping simply the newest readings let
    one visit's vital signs push an older HbA1c out of the input."""
    n = len(codes)
    if n <= max_labs:
        return np.arange(n)
    rank = np.zeros(n, dtype=np.int64)  # 0 = the newest reading of its test
    seen: dict[str, int] = {}
    for i in range(n - 1, -1, -1):
        rank[i] = seen.get(codes[i], 0)
        seen[codes[i]] = rank[i] + 1
    order = np.lexsort((-seconds, rank))[:max_labs]
    return np.sort(order)


def featurise_tests(frame: pd.DataFrame, vocab: dict[str, int], index_time: datetime | None,
                    max_tests: int) -> tuple[np.ndarray, np.ndarray]:
    """One row per test over the whole frame: ([S] LOINC ids, [S, TEST_STATS] stats), the tests
    read most recently first, at most `max_tests`.

    Stats: newest, lowest, highest and mean value, newest minus oldest, 1 if those are on the
    reference-range scale (else the raw value, for tests without a range such as body weight),
    log1p(readings), log1p(days since the newest)/8. Values are squashed after aggregating, so
    the order of readings is kept. Tests the vocabulary does not know are left out: their one
    shared embedding would say nothing about which test it was.
    """
    empty = (np.zeros(0, np.int64), np.zeros((0, TEST_STATS), np.float32))
    if len(frame) == 0 or max_tests <= 0:
        return empty
    codes = frame["loinc"].astype(str).to_numpy()
    ids = np.fromiter((vocab.get(c, UNK_ID) for c in codes), dtype=np.int64, count=len(codes))
    value = frame["value"].to_numpy(dtype=float)
    z = normalise_values(value, frame["ref_low"].to_numpy(dtype=float),
                         frame["ref_high"].to_numpy(dtype=float))
    keep = (ids != UNK_ID) & np.isfinite(value)
    if not keep.any():
        return empty
    seconds = epoch_seconds(frame["time"])
    ids, value, z, seconds = ids[keep], value[keep], z[keep], seconds[keep]
    index_s = instant_seconds(index_time) if index_time is not None else float(seconds.max())
    order = np.lexsort((seconds, ids))  # by test, then time
    ids, value, z, seconds = ids[order], value[order], z[order], seconds[order]
    starts = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1]])
    ends = np.r_[starts[1:], len(ids)] - 1
    on_range = np.array([bool(np.isfinite(z[a:b + 1]).all()) for a, b in zip(starts, ends,
                                                                             strict=True)])
    v = np.where(np.repeat(on_range, ends - starts + 1), z, value)
    stats = np.stack([
        squash(v[ends]), squash(np.minimum.reduceat(v, starts)),
        squash(np.maximum.reduceat(v, starts)),
        squash(np.add.reduceat(v, starts) / (ends - starts + 1)),
        squash(v[ends] - v[starts]), on_range.astype(float), np.log1p(ends - starts + 1),
        np.log1p(np.maximum(index_s - seconds[ends], 0.0) / DAY_SECONDS) / 8.0], 1)
    newest_first = np.argsort(-seconds[ends], kind="stable")[:max_tests]
    return ids[starts][newest_first], stats[newest_first].astype(np.float32)


def featurise_patient(patient: PatientContext) -> np.ndarray:
    """[age/100, age known, female, male]: what the classifiers get, and what makes a reading
    mean something (an HbA1c of 6.0 % at 25 is not the same news as at 75)."""
    age = patient.age_years()
    return np.array([(age or 0.0) / 100.0, float(age is not None),
                     float(patient.sex == "female"), float(patient.sex == "male")],
                    dtype=np.float32)


# ---------------------------------------------------------------------------------------------
# notes


def featurise_notes(notes: Sequence[Note], tokenizer: TextTokenizer, budget: int,
                    redact: Callable[[Note], str] | None = None
                    ) -> tuple[np.ndarray, list[tuple[str, int, int]]]:
    """Note tokens, most recent note first, cut at the budget; `redact` may rewrite a note's text
    first (training uses it to strip what would leak the label)."""
    ids: list[int] = []
    spans: list[tuple[str, int, int]] = []
    newest_first = sorted(notes, key=lambda n: (n.time is not None, n.time), reverse=True)
    for note in newest_first:
        if len(ids) >= budget:
            break
        text = redact(note) if redact is not None else note.text
        date = note.time.date().isoformat() if note.time is not None else "undated"
        tokens = tokenizer.encode(f"[{date}] {text.strip()}\n", add_special_tokens=False).ids
        tokens = tokens[:budget - len(ids)]
        spans.append((note.document_id, len(ids), len(ids) + len(tokens)))
        ids.extend(tokens)
    return np.array(ids, dtype=np.int64), spans


def featurise_note_bag(notes: Sequence[Note], tokenizer: TextTokenizer, budget: int,
                       redact: Callable[[Note], str] | None = None
                       ) -> tuple[np.ndarray, np.ndarray]:
    """([U] distinct token ids of all the notes, ascending, [U] log1p(count)), at most `budget`
    of them: the highest ids (the rarest words) when there are more."""
    if budget <= 0 or not notes:
        return np.zeros(0, np.int64), np.zeros(0, np.float32)
    texts = [redact(n) if redact is not None else n.text for n in notes]
    ids = np.fromiter((t for text in texts
                       for t in tokenizer.encode(text, add_special_tokens=False).ids),
                      dtype=np.int64)
    unique, counts = np.unique(ids, return_counts=True)
    unique, counts = unique[-budget:], counts[-budget:]
    return unique, np.log1p(counts).astype(np.float32)


def lab_readings(frame: pd.DataFrame, names: dict[str, str] | None = None) -> list[str]:
    """The newest reading of each test, furthest outside its reference range first, written as
    the teacher writes readings ("Systolic blood pressure 145 mm[Hg] on 2022-09-04, high")."""
    return [text for _, text in reading_texts(frame, names)]


class Shown(NamedTuple):
    """A reading the prompt shows: its test, its text and the disorders it is evidence for
    (`knowledge.retrieval.supported_by`; empty where no graph was asked)."""

    loinc: str
    text: str
    supports: frozenset[str] = frozenset()


Supports = Callable[[str, float], frozenset[str]]  # (LOINC, value) -> disorders it supports
MAX_EARLIER_PER_TEST = 2  # earlier readings a test may add to what the prompt shows


def _z(f: pd.DataFrame) -> np.ndarray:
    """Each row's value against its reference range (`normalise_values`)."""
    return normalise_values(f["value"].to_numpy(dtype=float), f["ref_low"].to_numpy(dtype=float),
                            f["ref_high"].to_numpy(dtype=float))


def _texts(f: pd.DataFrame, names: dict[str, str] | None, z: np.ndarray) -> list[str]:
    """Each row of `f` as the teacher writes a reading, flagged by its `_z`."""
    out = []
    for i in range(len(f)):
        r = f.iloc[i]
        flag = "" if not np.isfinite(z[i]) else \
            "high" if z[i] > 1 else "low" if z[i] < -1 else "normal"
        name = (names or {}).get(str(r["loinc"])) or r["display"] or r["loinc"]
        out.append(describe_reading(name, float(r["value"]), str(r["unit"]),
                                    pd.Timestamp(r["time"]), flag))
    return out


def reading_texts(frame: pd.DataFrame, names: dict[str, str] | None = None
                  ) -> list[tuple[str, str]]:
    """(LOINC, text) of `lab_readings`, in order: what the prompt shows and the teacher cites."""
    if frame.empty:
        return []
    f = frame.sort_values(["time", "loinc"], kind="stable").groupby("loinc", sort=False).tail(1)
    z = _z(f)
    order = np.argsort(-np.nan_to_num(np.abs(z), nan=0.0), kind="stable")
    return list(zip(f["loinc"].astype(str).iloc[order], _texts(f.iloc[order], names, z[order]),
                    strict=True))


def citable_readings(frame: pd.DataFrame, names: dict[str, str] | None = None,
                   supports: Supports | None = None) -> list[Shown]:
    """What the prompt shows and a rationale line may cite: `reading_texts` (the newest reading
    of each test), each with the disorders it is evidence for; and, where a test's newest
    reading is no evidence for a disorder an earlier one is, the newest such earlier reading
    right after it (at most `MAX_EARLIER_PER_TEST`): a treated hypertensive's blood pressure is
    normal now, and the 145 of two years ago is what supports the diagnosis."""
    newest = reading_texts(frame, names)
    if supports is None:
        return [Shown(c, t) for c, t in newest]
    f = frame.sort_values(["time", "loinc"], kind="stable")
    values = f["value"].to_numpy(dtype=float)
    loincs = f["loinc"].astype(str).to_numpy()
    out: list[Shown] = []
    for loinc, text in newest:
        rows = np.nonzero(loincs == loinc)[0][::-1]  # newest first
        covered = supports(loinc, float(values[rows[0]]))
        out.append(Shown(loinc, text, covered))
        earlier: list[tuple[int, frozenset[str]]] = []  # (row, what it supports)
        for i in rows[1:]:
            if len(earlier) == MAX_EARLIER_PER_TEST:
                break
            support = supports(loinc, float(values[i]))
            if support - covered:
                earlier.append((int(i), support))
                covered |= support
        if earlier:
            picked = f.iloc[[i for i, _ in earlier]]
            out.extend(Shown(loinc, t, support) for (_, support), t in
                       zip(earlier, _texts(picked, names, _z(picked)), strict=True))
    return out


def featurise_lab_text(frame: pd.DataFrame, names: dict[str, str] | None,
                       tokenizer: TextTokenizer, budget: int) -> np.ndarray:
    """"Labs: a; b; c.\n" with as many whole readings as fit in `budget` tokens."""
    ids: list[int] = []
    for k, part in enumerate(lab_readings(frame, names)):
        piece = tokenizer.encode(("Labs: " if k == 0 else "; ") + part,
                                 add_special_tokens=False).ids
        if len(ids) + len(piece) + 2 > budget:
            break
        ids.extend(piece)
    if ids:
        ids.extend(tokenizer.encode(".\n", add_special_tokens=False).ids)
    return np.array(ids[:budget], dtype=np.int64)


# ---------------------------------------------------------------------------------------------
# knowledge


def knowledge_facts(retrieval: Retrieval) -> list[Fact]:
    """Retrieval -> facts with ids, strongest first: finding->disorder links, then readings.

    Same triples as `Retrieval.facts()`, plus the id each is cited by: the association's URI for a
    lab link, "<source>|<note span>" for a note mention, "<finding>|<Observation>" for a reading.
    """
    facts: list[Fact] = []
    for p in retrieval.paths:
        fid = p.fact if p.relation in ("supports", "opposes") else f"{p.fact}|{p.source}"
        facts.append(Fact(fid, retrieval.labels.get(p.source, p.source), p.relation,
                          retrieval.labels.get(p.target, p.target), p.strength))
    for hit in retrieval.findings:
        for r in hit.rows[-3:]:
            facts.append(Fact(f"{hit.id}|{r.observation_id}", hit.label, "observed as",
                              r.describe(), hit.strength))
    unique: dict[str, Fact] = {}
    for f in facts:
        unique.setdefault(f.id, f)
    return sorted(unique.values(), key=lambda f: -f.score)  # stable: links before readings


def featurise_facts(facts: Sequence[Fact], tokenizer: TextTokenizer, max_facts: int,
                    max_tokens: int) -> tuple[np.ndarray, np.ndarray]:
    """Fact texts -> [K, T] token ids and mask (K <= max_facts, T = max_tokens)."""
    kept = list(facts)[:max_facts]
    ids = np.zeros((len(kept), max_tokens), dtype=np.int64)
    mask = np.zeros((len(kept), max_tokens), dtype=np.float32)
    for k, fact in enumerate(kept):
        tokens = tokenizer.encode(fact.text, add_special_tokens=False).ids[:max_tokens]
        ids[k, :len(tokens)] = tokens
        mask[k, :len(tokens)] = 1.0
    return ids, mask


# ---------------------------------------------------------------------------------------------
# one patient, then a batch


def featurise(labs: pd.DataFrame, notes: Sequence[Note], patient: PatientContext,
              retrieval: Retrieval | None, tokenizer: TextTokenizer, loinc_vocab: dict[str, int],
              budgets: Budgets = Budgets(), modalities: Modalities = Modalities(),
              redact: Callable[[Note], str] | None = None,
              lab_names: dict[str, str] | None = None,
              supports: Supports | None = None) -> Features:
    """Everything one patient contributes; a switched-off modality gives zero-length arrays.
    `lab_names` (LOINC -> the graph's short name) names the prompt's readings when no retrieval
    ran (knowledge off); `supports` (this patient's `knowledge.retrieval.supported_by`) says
    which disorders each shown reading is evidence for."""
    index_time = patient.index_time
    lab_arrays, lab_refs = featurise_labs(labs if modalities.labs else labs.iloc[:0],
                                          loinc_vocab, index_time, budgets.max_labs)
    note_ids, spans = featurise_notes(notes if modalities.notes else [], tokenizer,
                                      budgets.max_note_tokens, redact)
    if modalities.labs and budgets.max_lab_text_tokens > 0 and len(labs):
        text_ids = featurise_lab_text(labs, retrieval.lab_names if retrieval else None,
                                      tokenizer, budgets.max_lab_text_tokens)
        note_ids = np.concatenate([text_ids, note_ids])
        spans = [(doc, a + len(text_ids), b + len(text_ids)) for doc, a, b in spans]
    facts = knowledge_facts(retrieval) if retrieval is not None and modalities.knowledge else []
    facts = facts[:budgets.max_facts]
    fact_ids, fact_mask = featurise_facts(facts, tokenizer, budgets.max_facts,
                                          budgets.max_fact_tokens)
    names = retrieval.lab_names if retrieval is not None else lab_names
    shown = citable_readings(labs, names, supports) \
        if modalities.labs and budgets.prompt_reading_tokens > 0 and len(labs) else []
    test_code, test_stats = featurise_tests(labs if modalities.labs else labs.iloc[:0],
                                            loinc_vocab, index_time, budgets.max_tests)
    bag_ids, bag_weight = featurise_note_bag(notes if modalities.notes else [], tokenizer,
                                             budgets.max_note_bag, redact)
    return Features(**lab_arrays, note_ids=note_ids, fact_ids=fact_ids,
                    fact_token_mask=fact_mask, labs=lab_refs, facts=facts, notes=spans,
                    shown=shown,
                    test_code=test_code, test_stats=test_stats,
                    patient_stats=featurise_patient(patient) if budgets.max_tests > 0
                    else np.zeros(PATIENT_STATS, np.float32),
                    note_bag_ids=bag_ids, note_bag_weight=bag_weight)


def _pad(rows: Sequence[np.ndarray], length: int, dtype: type[np.generic]) -> np.ndarray:
    out = np.zeros((len(rows), length, *rows[0].shape[1:]), dtype=dtype)
    for i, r in enumerate(rows):
        out[i, :len(r)] = r
    return out


def collate(batch: Sequence[Features]) -> dict[str, np.ndarray]:
    """Right-pad to the longest patient (at least 1 slot each, masked) and add presence masks."""
    n_labs = max(1, *(len(f.lab_code) for f in batch))
    n_notes = max(1, *(len(f.note_ids) for f in batch))
    n_facts = max(1, *(len(f.fact_ids) for f in batch))
    out: dict[str, np.ndarray] = {}
    for key in ("lab_code", "lab_value", "lab_value_mask", "lab_time", "lab_trend",
                "lab_trend_mask", "lab_gap"):
        rows = [getattr(f, key) for f in batch]
        out[key] = _pad(rows, n_labs, np.int64 if key == "lab_code" else np.float32)
    out["lab_mask"] = _pad([np.ones(len(f.lab_code), np.float32) for f in batch], n_labs,
                           np.float32)
    out["note_ids"] = _pad([f.note_ids for f in batch], n_notes, np.int64)
    out["note_mask"] = _pad([np.ones(len(f.note_ids), np.float32) for f in batch], n_notes,
                            np.float32)
    out["fact_ids"] = _pad([f.fact_ids for f in batch], n_facts, np.int64)
    out["fact_token_mask"] = _pad([f.fact_token_mask for f in batch], n_facts, np.float32)
    out["fact_mask"] = _pad([np.ones(len(f.fact_ids), np.float32) for f in batch], n_facts,
                            np.float32)
    n_tests = max(1, *(len(f.test_code) for f in batch))
    out["test_code"] = _pad([f.test_code for f in batch], n_tests, np.int64)
    out["test_stats"] = _pad([f.test_stats for f in batch], n_tests, np.float32)
    out["test_mask"] = _pad([np.ones(len(f.test_code), np.float32) for f in batch], n_tests,
                            np.float32)
    out["patient_stats"] = np.stack([f.patient_stats for f in batch]).astype(np.float32)
    n_bag = max(1, *(len(f.note_bag_ids) for f in batch))
    out["note_bag_ids"] = _pad([f.note_bag_ids for f in batch], n_bag, np.int64)
    out["note_bag_weight"] = _pad([f.note_bag_weight for f in batch], n_bag, np.float32)
    out["note_bag_mask"] = _pad([np.ones(len(f.note_bag_ids), np.float32) for f in batch],
                                n_bag, np.float32)
    return {k: out[k] for k in BATCH_KEYS}


def loinc_vocabulary(codes: Sequence[str]) -> dict[str, int]:
    """LOINC code -> id; 0 is padding and 1 unknown, so a new code never shifts the others."""
    return {c: i + 2 for i, c in enumerate(sorted(set(codes)))}
