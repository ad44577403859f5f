"""One way to write a number (issue 14, item 3): `encoding.numbers.format_value`, used by the
prompt, the knowledge facts, the rule baseline, the ONNX predictor, the HTML report and the
teacher; identical to the released model's `.3g` readings below 1000, never an exponent."""

from __future__ import annotations

import math
from datetime import UTC, datetime

import numpy as np
import pytest

from clinragen_fhir.encoding.features import reading_texts
from clinragen_fhir.encoding.numbers import format_value
from clinragen_fhir.knowledge import load_graph
from clinragen_fhir.report.faithfulness import LabLexicon, check_rationale
from clinragen_fhir.report.html import fmt
from tests.unit.train_examples import frame

SWEEP = np.concatenate([np.geomspace(1e-9, 1e9, 4001), -np.geomspace(1e-6, 1e6, 301),
                        np.arange(0, 1001, 0.25), [0.0, 7.0, 98.6, 140.0, 999.4]])


def test_no_exponent_anywhere() -> None:
    for v in SWEEP:
        text = format_value(float(v))
        assert "e" not in text and "E" not in text, (v, text)
        assert math.isclose(float(text), v, rel_tol=0.006, abs_tol=0.5), (v, text)


def test_identical_to_the_trained_form_below_1000() -> None:
    """The released model read `f"{v:.3g}"` (below 1000) and `f"{v:.0f}"` (above): the same text
    wherever that form had no exponent, i.e. for 1e-4 <= |v| < 999.5 and from 1000 up."""
    for v in SWEEP:
        old = f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
        if "e" not in old:
            assert format_value(float(v)) == old, v
    # the two corners that used to carry an exponent
    assert (format_value(999.7), format_value(0.0000123)) == ("1000", "0.0000123")
    assert format_value(1234.5) == "1234" and format_value(12.345) == "12.3"
    assert format_value(None) == "" == format_value(float("nan"))


def test_every_path_writes_the_same_text() -> None:
    from training.prompts import fmt_value

    for v in (7.14, 1234.5, 0.000123, 98.6, 140.0, 999.7, 123456.0):
        assert fmt(v) == fmt_value(v) == format_value(v)


@pytest.mark.parametrize("value", [7.14, 6.83, 1234.5, 15321.0])
def test_the_faithfulness_check_holds_what_the_prompt_writes(value: float) -> None:
    """A rationale that copies the prompt's reading text is a claim that holds."""
    labs = frame([("4548-4", value, datetime(2024, 3, 2, 9, 30, tzinfo=UTC))])
    (_loinc, text), = reading_texts(labs)
    assert format_value(value) in text and "e+" not in text
    lexicon = LabLexicon.build(load_graph(), [labs])
    checks = check_rationale(f"{text.split(',')[0]}.", labs, lexicon)
    assert checks and all(c.matched for c in checks), [(c.claim, c.reason) for c in checks]
