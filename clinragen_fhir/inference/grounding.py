"""Grounded decoding of the rationale: every reading the model writes is one this patient has.

The rationale is one line per concluded diagnosis, `<term>: <clause>[; <clause>].` where a clause
is one of the readings the prompt showed (`encoding.prompt.shown_readings`, written by
`encoding.features.reading_texts`) or "no supporting reading". The model chooses; decoding only
lets through tokens that keep the current line a prefix of one of its allowed lines (a trie over
the patient's readings, as text). Values, units and dates are then copied from the record by
construction, and the claim check (`report.faithfulness`) can only confirm them.

Pure numpy/Python, driven by `inference.decoding.greedy` with any step function.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

NO_SUPPORT = "no supporting reading"
NOTHING = "No disorder is supported by these results."
MAX_CLAUSES = 2


def allowed_lines(term: str, readings: Sequence[str], last: bool) -> list[str]:
    """Every line the model may write for one diagnosis (the last one ends the text)."""
    end = "." if last else ".\n"
    clauses = [NO_SUPPORT, *readings]
    lines = [f"{term}: {c}{end}" for c in clauses]
    if MAX_CLAUSES > 1:
        lines += [f"{term}: {a}; {b}{end}" for a in readings for b in readings if a != b]
    return lines


@dataclass
class _Row:
    lines: list[list[str]]  # per diagnosis, its allowed lines
    at: int = 0  # the line being written
    text: str = ""  # what is written of it
    done: bool = False


@dataclass
class RationaleConstraint:
    """Constrained greedy decoding of per-diagnosis lines (a per-batch state machine, the same
    interface as `decoding.DiagnosisConstraint`: start, mask, advance)."""

    pieces: Sequence[str]  # pieces[i]: the text token i appends
    eos_id: int
    rows: list[_Row] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._by_piece: dict[str, list[int]] = {}
        for i, p in enumerate(self.pieces):
            if p and i != self.eos_id:
                self._by_piece.setdefault(p, []).append(i)
        self._longest = max((len(p) for p in self._by_piece), default=1)

    def start_rows(self, terms: Sequence[Sequence[str]],
                   readings: Sequence[Sequence[str]]) -> None:
        """Per row: the concluded terms (in the order the prompt lists them) and the readings
        the prompt showed."""
        self._pending = [
            [allowed_lines(t, r, k == len(ts) - 1) for k, t in enumerate(ts)] or [[NOTHING]]
            for ts, r in zip(terms, readings, strict=True)]

    def start(self, batch: int) -> None:
        pending = getattr(self, "_pending", None)
        if pending is None or len(pending) != batch:
            raise ValueError("call start_rows with one entry per row before decoding")
        self.rows = [_Row(lines) for lines in pending]

    def _allowed(self, row: _Row) -> list[int]:
        if row.done:
            return [self.eos_id]
        out: set[int] = set()
        for line in row.lines[row.at]:
            if not line.startswith(row.text):
                continue
            rest = line[len(row.text):]
            for n in range(1, min(len(rest), self._longest) + 1):
                out.update(self._by_piece.get(rest[:n], ()))
        return sorted(out) or [self.eos_id]

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
            if row.done or t == self.eos_id or not 0 <= t < len(self.pieces):
                row.done = True
                continue
            row.text += self.pieces[t]
            if row.text in row.lines[row.at]:  # the line is complete
                row.at, row.text = row.at + 1, ""
                row.done = row.at >= len(row.lines)
