"""Grounded decoding of the rationale: every reading the model writes is one this patient has.

The rationale is one line per concluded diagnosis, `<term>: <clause>[; <clause>].` where a clause
is one of the readings the prompt showed (`encoding.prompt.shown_readings`, written by
`encoding.features.citable_readings`). Given the disorders each reading is evidence for (the
graph's `knowledge.retrieval.supported_by`: a value that meets a finding supporting the
disorder, not merely a test that bears on it), a line may cite only its own diagnosis's
evidence, and says "no supporting reading" only when the prompt shows none: a diagnosis whose
evidence is on the screen is never left uncited, and an HbA1c of 5.2 % is never cited for
prediabetes. The model chooses which readings; decoding only lets through tokens that keep the
current line a prefix of one of its allowed lines (a trie over the tokens of the patient's
readings). Values, units and dates are then copied from the record by construction, and the
claim check (`report.faithfulness`) can only confirm them.

Pure numpy/Python, driven by `inference.generation.greedy` with any step function.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from clinragen_fhir.encoding.features import Supports
from clinragen_fhir.encoding.prompt import shown_readings
from clinragen_fhir.knowledge.retrieval import supported_by

if TYPE_CHECKING:
    from clinragen_fhir.knowledge import KnowledgeGraph

NO_SUPPORT = "no supporting reading"
NOTHING = "No disorder is supported by these results."
MAX_CLAUSES = 2


TOKENS_PER_LINE = 64  # a term and two readings ("...: HbA1c 6.1 % on 2024-03-02, high; ...")


def token_budget(terms: Sequence[Sequence[str]], floor: int) -> int:
    """New tokens for a batch: enough to finish every row's lines (a line cut at the token limit
    would end mid-reading), and at least `floor`."""
    return max(floor, TOKENS_PER_LINE * max((len(t) for t in terms), default=0) + 8)


CodeOf = Callable[[str], str]  # a concluded term -> its SNOMED CT code
Evidence = Sequence[frozenset[str]]  # per shown reading, the disorders it is evidence for


def evidence(kg: KnowledgeGraph, sex: str | None) -> Supports:
    """This patient's `supported_by`: what `encoding.features.citable_readings` marks each reading
    with (the runtime's featurisation and the evaluation's both take it from here)."""
    return lambda loinc, value: supported_by(kg, loinc, value, sex)


def citable(term: str, readings: Sequence[str], supports: Evidence | None,
            code_of: CodeOf | None) -> list[str] | None:
    """The shown readings a line for `term` may cite (those that are evidence for it); None when
    nothing says what a reading supports (then any shown reading may be cited)."""
    if code_of is None or supports is None:
        return None
    code = code_of(term)
    return [r for r, s in zip(readings, supports, strict=False) if code in s]


def evidence_first(readings: Sequence[str], supports: Evidence, codes: Sequence[str]
                   ) -> tuple[list[str], list[frozenset[str]]]:
    """The readings (and what each supports) with the evidence for the concluded diagnoses
    (`codes`) first, each group in its own order: the prompt's reading budget then keeps what a
    line may cite before readings no diagnosis needs (the prompt is built after the head has
    concluded, so this is known)."""
    wanted = set(codes)
    pairs = list(zip(readings, supports, strict=False))
    ordered = [p for p in pairs if p[1] & wanted] + [p for p in pairs if not p[1] & wanted]
    return [r for r, _ in ordered], [s for _, s in ordered]


def grounded_readings(readings: Sequence[Sequence[str]], supports: Sequence[Evidence] | None,
                      terms: Sequence[Sequence[str]], code_of: CodeOf | None
                      ) -> tuple[list[Sequence[str]], Sequence[Evidence] | None]:
    """Per row, the readings the prompt shows (and what each supports) for a grounded
    rationale: with `code_of` and `supports`, the concluded diagnoses' evidence first
    (`evidence_first`); else as given. One rule for the runtime (`OnnxModel.generate`) and the
    torch model (`ClinRaGen.generate_grounded`); the result goes to the prompt and to
    `start_shown`."""
    if code_of is None or supports is None:
        return list(readings), supports
    firsts = [evidence_first(r, s, [code_of(x) for x in t])
              for r, s, t in zip(readings, supports, terms, strict=True)]
    return [r for r, _ in firsts], [s for _, s in firsts]


def allowed_lines(term: str, readings: Sequence[str], last: bool,
                  cite: Sequence[str] | None = None) -> list[str]:
    """Every line the model may write for one diagnosis (the last one ends the text): with
    `cite` (its supporting readings), one or two of them, or "no supporting reading" only when
    there are none; without, any shown reading or none."""
    end = "." if last else ".\n"
    if cite is not None:
        readings = cite
        clauses = list(cite) or [NO_SUPPORT]
    else:
        clauses = [NO_SUPPORT, *readings]
    lines = [f"{term}: {c}{end}" for c in clauses]
    if MAX_CLAUSES > 1:
        lines += [f"{term}: {a}; {b}{end}" for a in readings for b in readings if a != b]
    return lines


@dataclass
class _Row:
    lines: list[dict[tuple[int, ...], set[int]]]  # per diagnosis: token prefix -> next tokens
    ends: list[set[tuple[int, ...]]]  # per diagnosis: its complete lines, as token tuples
    at: int = 0  # the line being written
    ids: tuple[int, ...] = ()  # its tokens so far
    done: bool = False


class RationaleConstraint:
    """Constrained greedy decoding of per-diagnosis lines (a per-batch state machine, the same
    interface as `decoding.DiagnosisConstraint`: start, mask, advance).

    Lines are tokenized the way training tokenized its targets (`encode`), and decoding follows
    that tokenization: the model chooses among whole readings, not among ways to spell one (an
    untrained or unsure model would otherwise spell a reading character by character)."""

    def __init__(self, encode: Callable[[str], Sequence[int]], eos_id: int) -> None:
        self.encode = encode
        self.eos_id = eos_id
        self.rows: list[_Row] = []
        self._pending: list[_Row] | None = None

    def _trie(self, lines: Sequence[str]) -> tuple[dict[tuple[int, ...], set[int]],
                                                   set[tuple[int, ...]]]:
        trie: dict[tuple[int, ...], set[int]] = {}
        ends: set[tuple[int, ...]] = set()
        for line in lines:
            ids = tuple(int(t) for t in self.encode(line))
            for k in range(len(ids)):
                trie.setdefault(ids[:k], set()).add(ids[k])
            ends.add(ids)
        return trie, ends

    def start_rows(self, terms: Sequence[Sequence[str]], readings: Sequence[Sequence[str]],
                   supports: Sequence[Evidence] | None = None,
                   code_of: CodeOf | None = None) -> None:
        """Per row: the concluded terms (in the order the prompt lists them), the readings the
        prompt showed and, with `code_of`, what each reading supports
        (`Features.reading_supports`), so each line cites its own diagnosis's evidence."""
        rows = []
        for i, (ts, shown) in enumerate(zip(terms, readings, strict=True)):
            row = supports[i] if supports is not None else None
            per_line = [allowed_lines(t, shown, k == len(ts) - 1,
                                      citable(t, shown, row, code_of))
                        for k, t in enumerate(ts)]
            built = [self._trie(lines) for lines in per_line or [[NOTHING]]]
            rows.append(_Row([t for t, _ in built], [e for _, e in built]))
        self._pending = rows

    def start_shown(self, terms: Sequence[Sequence[str]], readings: Sequence[Sequence[str]],
                    supports: Sequence[Evidence] | None, code_of: CodeOf | None,
                    reading_budget: int) -> None:
        """`start_rows` over the readings the prompt actually shows: those of `readings` that fit
        the prompt's `reading_budget` (`encoding.prompt.shown_readings`)."""
        shown = [shown_readings(self.encode, r, reading_budget) for r in readings]
        self.start_rows(terms, shown, supports, code_of)

    def start(self, batch: int) -> None:
        if self._pending is None or len(self._pending) != batch:
            raise ValueError("call start_rows with one entry per row before decoding")
        self.rows, self._pending = self._pending, None

    def _allowed(self, row: _Row) -> list[int]:
        if row.done:
            return [self.eos_id]
        return sorted(row.lines[row.at].get(row.ids, ())) or [self.eos_id]

    def mask(self, logits: np.ndarray, remaining: int, finished: np.ndarray) -> np.ndarray:
        """Logits with every token that leaves the allowed lines at -inf."""
        out = logits.copy()
        for b, row in enumerate(self.rows):
            if finished[b]:
                continue
            keep = np.array(self._allowed(row), dtype=np.int64)
            row_logits = np.full_like(out[b], -np.inf)
            row_logits[keep] = logits[b, keep]
            out[b] = row_logits
        return out

    def advance(self, tokens: np.ndarray) -> None:
        for b, row in enumerate(self.rows):
            t = int(tokens[b])
            if row.done or t == self.eos_id:
                row.done = True
                continue
            row.ids = (*row.ids, t)
            if row.ids in row.ends[row.at]:  # the line is complete
                row.at, row.ids = row.at + 1, ()
                row.done = row.at >= len(row.lines)
