"""Faithfulness: do a rationale's factual lab claims match the patient's own record?

A claim is anchored by a lab test named in the text (the graph's lab names, the record's display
texts, or a LOINC code). The clause after the name (up to the next test, `;`, a sentence end or a
parenthesis) gives the claim's parts: a value (optionally `on YYYY-MM-DD`), a date, and a
direction word (high/low for the level against the reference range, rising/falling for the
trend). A claim matches when one reading of that test satisfies every part it states:

* value: equal to the reading's canonical or as-sent value within the precision written
  (7.1 matches 7.14) or 0.5 % relative;
* date: the reading's UTC date;
* direction: above `ref_high` / below `ref_low`, or higher/lower than the previous reading of the
  same test; a level word on a reading without a range is left unchecked (not counted either way).

A test the record does not have is a failed claim. A name alone ("HbA1c was checked") is no claim.
The share of matching claims, pooled over rationales, is the faithfulness score.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date

import numpy as np
import pandas as pd

from clinragen_fhir.knowledge import KnowledgeGraph
from clinragen_fhir.report.lexicon import LabLexicon as LabLexicon  # the checker's test names

_DATE = re.compile(r"\b(\d{4})-(\d{2})-(\d{2})(?:T[\d:.+Z-]*)?")
_LOINC = re.compile(r"\(?\bLOINC\s+\d{1,7}-\d\)?|\b\d{3,7}-\d\b")
_SCTID = re.compile(r"(?<![\d.])\d{6,18}(?![\d.])")
# a number token; not part of a longer number (no backtracking into "30.0"), a range ("60-89",
# "5.7\u20136.4"), a unit ("10*3/uL", "{1.73_m2}") or an open bound ("30+"). The number is an
# atomic group: a shorter digit run is always refused by the lookaheads, and backtracking into
# it made a digit run quadratic (a 32k-digit Observation display took 64 s).
_NUMBER = re.compile(r"(?<!\d-)(?<![\w./{^*])(?>-?\d+(?:\.\d+)?)(?![\w.]*\d{2}-)(?![_}*^\d])"
                     r"(?!\.\d)(?!\s?[-\u2013\u2014]\s?\d)(?!\s?\+)")
# what makes a number a criterion, not a reading: a comparator or bound word right before it
# (">= 126 mg/dL", "threshold of 6.5 %", "above 6.5", "stage 3"), the far end of a range
# ("5.7\u20136.4", "between 5.7 and 6.4")
_CRITERION = re.compile(
    r"(?:[<>\u2264\u2265]=?|=>|=<|\b(?:above|below|over|under|exceed(?:s|ing)?|at least|at most|"
    r"more than|less than|greater than|fewer than|threshold(?: of)?|cut-?off(?: of)?|"
    r"target(?: of)?|goal(?: of)?|limit(?: of)?|stage|grade|type|class|between)|"
    r"\d\s?[-\u2013\u2014]|\bbetween\s+-?\d+(?:\.\d+)?\s*\S{0,8}\s+and)\s*$",
    re.IGNORECASE)
# matched at the number's end (`match(text, pos)`: no slice copied per number)
_NOT_A_VALUE = re.compile(r"\s*(?:readings?|results?|tests?|days?|times?|weeks?|months?|"
                          r"years?|hours?|h\b|hrs?\b|x\b|fold|occasions?)", re.IGNORECASE)
_ON_DATE = re.compile(r"^\s*[^\s;,]{0,24}\s*(?:on|dated|at|,|from)?\s*$", re.IGNORECASE)
_HIGH = {"high", "elevated", "raised", "above", "increased level", "hyper"}
_LOW = {"low", "below", "reduced", "decreased level"}
_UP = {"rising", "rose", "increased", "increasing", "upward", "worsening"}
_DOWN = {"falling", "fell", "decreased", "decreasing", "declining", "dropped", "improving"}
_NORMAL = {"normal", "within range", "within the reference range", "unremarkable"}
_DIRECTION = re.compile(r"\b(" + "|".join(sorted(_HIGH | _LOW | _UP | _DOWN | _NORMAL, key=len,
                                                     reverse=True)) + r")\b", re.IGNORECASE)
# Bounds on the work per rationale: it may quote server-controlled text (display names), and a
# check must not be what makes a task hit its time limit. Past them the rest goes unchecked.
MAX_CHECKED_CHARS = 20_000  # of one rationale or line (a model's is a few hundred words)
MAX_CLAIMS = 200  # per rationale or line: each check is a frame lookup (about 1 ms)
_CRITERION_LOOKBACK = 64  # characters before a number (past blanks) where a comparator counts


@dataclass(frozen=True)
class Claim:
    """One factual statement about a lab test; None where the text says nothing of that part."""

    test: str  # the name as written
    loincs: tuple[str, ...]
    value: float | None
    decimals: int
    day: date | None
    direction: str | None  # "high" | "low" | "normal" | "up" | "down"
    span: tuple[int, int]


@dataclass(frozen=True)
class ClaimCheck:
    claim: Claim
    matched: bool
    reason: str  # "" when matched, else what failed


def _direction(word: str) -> str:
    w = word.lower()
    if w in _HIGH:
        return "high"
    if w in _LOW:
        return "low"
    if w in _NORMAL:
        return "normal"
    return "up" if w in _UP else "down"


def _criterion_before(text: str, end: int) -> bool:
    """`_CRITERION` right before `end`, searched in a short stretch (past blanked codes) instead
    of the whole prefix: one search per number over the prefix was quadratic."""
    start = end
    while start > 0 and text[start - 1].isspace():
        start -= 1
    return _CRITERION.search(text, max(0, start - _CRITERION_LOOKBACK), end) is not None


def extract_claims(text: str, lexicon: LabLexicon) -> list[Claim]:
    """Every (test, value?, date?, direction?) statement in the text with at least one part
    (within the first MAX_CHECKED_CHARS characters, at most MAX_CLAIMS)."""
    if lexicon.pattern is None:
        return []
    if len(text) > MAX_CHECKED_CHARS:  # cut at a blank: a number cut short is a made-up claim
        head = text[:MAX_CHECKED_CHARS]
        text = head[:max(head.rfind(" "), head.rfind("\n"), 0)]
    # disorder names, SNOMED codes and LOINC codes ("4548-4") are blanked (offsets kept)
    def blank(m: re.Match[str]) -> str:
        return " " * len(m.group(0))

    plain = lexicon.disorders.sub(blank, text) if lexicon.disorders is not None else text
    plain = _SCTID.sub(blank, plain)
    masked = _LOINC.sub(blank, plain)
    mentions = list(lexicon.pattern.finditer(plain))
    claims: list[Claim] = []
    for i, m in enumerate(mentions):
        if len(claims) >= MAX_CLAIMS:
            break
        if _LOINC.fullmatch(m.group(0)) and i + 1 < len(mentions) \
                and mentions[i + 1].start() - m.end() <= 3:
            continue  # "4548-4 HbA1c": the code names the same test as the next mention
        end = mentions[i + 1].start() if i + 1 < len(mentions) else len(text)
        window = masked[m.end():end]
        stop = re.search(r";|\n|\.\s|\.$", window)
        if stop:
            window = window[:stop.start()]
        first_number = _NUMBER.search(_DATE.sub(lambda d: " " * len(d.group(0)), window))
        paren = window.find("(", first_number.end() if first_number else 0)
        if paren >= 0:
            window = window[:paren]
        # a direction word before the name counts only within the same clause ("elevated HbA1c")
        start = mentions[i - 1].end() if i > 0 else 0
        before = re.split(r"[;,\n]|\.\s", masked[max(start, m.start() - 30):m.start()])[-1]
        # ... and only right before it: "low ferritin", not "Ferritin low (...) supports iron"
        near = [w.group(1) for w in _DIRECTION.finditer(before)
                if len(before[w.end():].split()) <= 1 and not re.search(r"[():]", before[w.end():])]
        # a word right before the next test's name is that test's ("HbA1c, elevated glucose")
        tail = masked[m.end():end]
        after = (w.group(1) for w in _DIRECTION.finditer(window)
                 if i + 1 >= len(mentions) or len(tail[w.end():].split()) > 1
                 or re.search(r"[():,;]", tail[w.end():]))
        word = near[0] if near else next(after, None)  # lazily: each test scans the tail
        direction = _direction(word) if word else None
        loincs = tuple(sorted(lexicon.codes(m.group(0))))
        # value tokens (not dates, not counts like "2 readings"), each with the date after it
        dates = [(d.start(), date(int(d.group(1)), int(d.group(2)), int(d.group(3))))
                 for d in _DATE.finditer(window)]
        no_dates = _DATE.sub(lambda d: " " * len(d.group(0)), window)
        values = [(n.start(), n.group(0)) for n in _NUMBER.finditer(no_dates)
                  if not _NOT_A_VALUE.match(no_dates, n.end())
                  and not _criterion_before(no_dates, n.start())]
        used: set[int] = set()
        made = 0
        for k, (pos, token) in enumerate(values):
            if len(claims) >= MAX_CLAIMS:
                break
            nxt = values[k + 1][0] if k + 1 < len(values) else len(window)
            day = next((d for p, d in dates if pos < p < nxt and p not in used
                        and _ON_DATE.match(no_dates[pos + len(token):p])), None)
            used.update(p for p, d in dates if d == day)
            decimals = len(token.split(".")[1]) if "." in token else 0
            claims.append(Claim(m.group(0), loincs, float(token), decimals, day,
                                direction if k == 0 else None,
                                (m.start(), m.end() + pos + len(token))))
            made += 1
        for p, d in dates:
            if p not in used and len(claims) < MAX_CLAIMS:
                claims.append(Claim(m.group(0), loincs, None, 0, d,
                                    direction if made == 0 else None, (m.start(), m.end() + p)))
                made += 1
        if made == 0 and direction is not None and len(claims) < MAX_CLAIMS:
            claims.append(Claim(m.group(0), loincs, None, 0, None, direction,
                                (m.start(), m.end())))
    return claims


def _value_ok(claim: Claim, values: np.ndarray) -> np.ndarray:
    assert claim.value is not None
    tol = np.maximum(0.5 * 10.0 ** -claim.decimals, 0.005 * np.abs(values))
    return np.asarray(np.abs(values - claim.value) <= tol + 1e-9)


def check_claim(claim: Claim, labs: pd.DataFrame) -> ClaimCheck:
    """Whether one reading of the claimed test satisfies every part of the claim."""
    rows = labs[labs["loinc"].astype(str).isin(claim.loincs)] if len(labs) else labs
    if rows is None or len(rows) == 0:
        return ClaimCheck(claim, False, "test not in the record")
    rows = rows.sort_values("time", kind="stable")
    keep = np.ones(len(rows), dtype=bool)
    if claim.day is not None:
        days = pd.to_datetime(rows["time"], utc=True).dt.date.to_numpy()
        keep &= days == claim.day
        if not keep.any():
            return ClaimCheck(claim, False, "no reading on that date")
    if claim.value is not None:
        v = _value_ok(claim, rows["value"].to_numpy(dtype=float))
        raw = _value_ok(claim, rows["raw_value"].to_numpy(dtype=float))
        keep &= v | raw
        if not keep.any():
            return ClaimCheck(claim, False, "value differs")
    if claim.direction is not None:
        value = rows["value"].to_numpy(dtype=float)
        if claim.direction in ("high", "low", "normal"):
            low = rows["ref_low"].to_numpy(float)
            high = rows["ref_high"].to_numpy(float)
            if claim.direction == "high":
                known, ok = np.isfinite(high), value > high
            elif claim.direction == "low":
                known, ok = np.isfinite(low), value < low
            else:  # a missing limit does not make a value abnormal on that side
                known = np.isfinite(low) | np.isfinite(high)
                ok = ~(value > np.where(np.isfinite(high), high, np.inf)) & \
                    ~(value < np.where(np.isfinite(low), low, -np.inf))
            if not (keep & known).any():
                return ClaimCheck(claim, True, "")  # no range: the level word is not checkable
            if not (keep & known & ok).any():
                return ClaimCheck(claim, False, f"not {claim.direction}")
        else:
            codes = rows["loinc"].astype(str).to_numpy()
            prev = np.full(len(rows), np.nan)
            last: dict[str, float] = {}
            for j, c in enumerate(codes):
                prev[j] = last.get(c, np.nan)
                last[c] = value[j]
            if claim.day is None and claim.value is None:  # "HbA1c is rising": the latest one
                keep &= np.arange(len(rows)) == len(rows) - 1
            ok = value > prev if claim.direction == "up" else value < prev
            if not (keep & np.isfinite(prev) & ok).any():
                word = "rising" if claim.direction == "up" else "falling"
                return ClaimCheck(claim, False, f"not {word}")
    return ClaimCheck(claim, True, "")


def check_rationale(text: str, labs: pd.DataFrame, lexicon: LabLexicon) -> list[ClaimCheck]:
    return [check_claim(c, labs) for c in extract_claims(text, lexicon)]


def check_report_rationale(text: str, labs: pd.DataFrame, kg: KnowledgeGraph,
                           lexicon: LabLexicon | None = None) -> list[ClaimCheck]:
    """What the worker runs on every generated rationale before writing it back: each lab claim
    checked against this patient's own frame, so the report can say which ones hold.
    `lexicon`: the one built for this graph and frame, when the caller has it."""
    if not text.strip():
        return []
    return check_rationale(text, labs, lexicon or LabLexicon.build(
        kg, [labs] if len(labs) else []))


def claim_text(check: ClaimCheck, rationale: str) -> str:
    """The claim as written, for a person reading the report."""
    a, b = check.claim.span
    return " ".join(rationale[a:b].split())


@dataclass(frozen=True)
class FaithfulnessSummary:
    claims: int
    matched: int
    rationales: int
    rationales_with_claims: int

    @property
    def share(self) -> float:
        """Matched / claimed, pooled; NaN when no rationale made any claim."""
        return self.matched / self.claims if self.claims else float("nan")

    @property
    def claims_per_rationale(self) -> float:
        return self.claims / self.rationales if self.rationales else float("nan")


def summarise_claims(checks: Sequence[Sequence[ClaimCheck]]) -> FaithfulnessSummary:
    """The claim checks of many rationales (one list each) counted together."""
    return FaithfulnessSummary(
        claims=sum(len(c) for c in checks), matched=sum(x.matched for c in checks for x in c),
        rationales=len(checks), rationales_with_claims=sum(1 for c in checks if c))




@dataclass(frozen=True)
class DiagnosisClaims:
    """The claims of one concluded diagnosis's line ("Prediabetes: HbA1c 6.1 % on ..., high.")."""

    term: str
    line: str  # "" when the rationale has no line for this diagnosis
    checks: tuple[ClaimCheck, ...]

    @property
    def cited(self) -> bool:
        """True when the line makes at least one lab claim."""
        return bool(self.checks)


def diagnosis_claims(text: str, terms: Sequence[str], labs: pd.DataFrame,
                     lexicon: LabLexicon) -> list[DiagnosisClaims]:
    """Per concluded diagnosis (by term), its line of the rationale and that line's checked
    claims. The model writes one line per diagnosis it was given (`encoding.prompt`); a line
    starts with the term and a colon."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    out = []
    for term in terms:
        key = term.strip().lower() + ":"
        line = next((ln for ln in lines if ln.lower().startswith(key)), "")
        body = line[len(key):] if line else ""
        checks = tuple(check_rationale(body, labs, lexicon)) if body else ()
        out.append(DiagnosisClaims(term, line, checks))
    return out
