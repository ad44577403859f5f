"""The rationale check's cost is linear and bounded on server-controlled text (issue 13, item 8).

Before the fix `_NUMBER` backtracked into digit runs (a 32k-digit Observation display took 64 s)
and every number searched the whole text before it. Each check here runs under a deadline, so
a regression fails in seconds instead of hanging the suite.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

import pandas as pd
import pytest

from clinragen_fhir.knowledge import KnowledgeGraph, load_graph
from clinragen_fhir.report.faithfulness import (
    _NUMBER,
    MAX_CLAIMS,
    check_rationale,
    diagnosis_claims,
)
from clinragen_fhir.report.lexicon import MAX_DISPLAYS_PER_CODE, LabLexicon
from tests.unit.train_examples import frame

N = 100_000
BOUND_S = 2.0  # "well under a second or two", with room for a loaded CI machine
T = datetime(2024, 3, 2, tzinfo=UTC)
LABS = frame([("4548-4", 7.1, T), ("2345-7", 92.0, T)])


@contextmanager
def deadline(seconds: float) -> Iterator[None]:
    """Fail (not hang) when the block runs past `seconds`; the regex engine checks signals."""
    def expired(*_: Any) -> None:
        raise TimeoutError(f"ran past {seconds} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    with deadline(4 * BOUND_S):
        started = time.perf_counter()
        out = fn()
        return out, time.perf_counter() - started


@pytest.fixture(scope="module")
def kg() -> KnowledgeGraph:
    return load_graph()


@pytest.mark.parametrize("tail", ["_", "+", " - 5", "}", "x11-"])
def test_number_pattern_is_linear_on_a_100k_digit_run(tail: str) -> None:
    found, seconds = timed(lambda: [m.group(0) for m in _NUMBER.finditer("1" * N + tail)])
    assert seconds < BOUND_S
    assert "1" * N not in found  # a run followed by a unit, bound or range end is no value


def test_a_100k_digit_display_is_checked_quickly(kg: KnowledgeGraph) -> None:
    labs = LABS.copy()
    labs.loc[0, "display"] = "1" * N
    text = "Prediabetes: HbA1c 7.1 % on 2024-03-02; Glucose " + "1" * N + "_ and " + "1" * N

    def run() -> tuple[LabLexicon, list[Any], list[Any]]:
        lexicon = LabLexicon.build(kg, [labs])
        return (lexicon, check_rationale(text, labs, lexicon),
                diagnosis_claims(text, ["Prediabetes"], labs, lexicon))

    (lexicon, checks, per_diagnosis), seconds = timed(run)
    assert seconds < BOUND_S
    assert "1" * N not in lexicon.names  # display length capped: it is no test name
    assert [c.matched for c in checks] == [True]  # the real claim after it is still checked
    assert per_diagnosis[0].cited


@pytest.mark.parametrize("shape", ["HbA1c 1 ", "HbA1c above 6.5 ", "HbA1c 7.1 on 2024-03-02 ",
                                   "HbA1c high ", "HbA1c between 5.7 and ", "HbA1c 7.1 % ; "])
def test_a_100k_char_rationale_is_bounded(kg: KnowledgeGraph, shape: str) -> None:
    lexicon = LabLexicon.build(kg, [LABS])
    text = (shape * (N // len(shape) + 1))[:N]
    checks, seconds = timed(lambda: check_rationale(text, LABS, lexicon))
    assert seconds < BOUND_S
    assert len(checks) <= MAX_CLAIMS


def test_twenty_thousand_distinct_displays_are_bounded(kg: KnowledgeGraph) -> None:
    many = pd.concat([LABS] * 10_000, ignore_index=True)
    many["display"] = [f"Haemoglobin A1c reading number {i}" for i in range(len(many))]
    (lexicon, checks), seconds = timed(lambda: (
        lex := LabLexicon.build(kg, [many]), check_rationale("HbA1c 7.1 % on 2024-03-02",
                                                             many, lex)))
    assert seconds < BOUND_S
    assert sum(name.startswith("Haemoglobin A1c reading") for name in lexicon.names) \
        <= 2 * MAX_DISPLAYS_PER_CODE
    assert [c.matched for c in checks] == [True]
