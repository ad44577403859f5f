"""Generated text -> (rationale, SNOMED codes), and the abstain rule. Pure Python, no torch.

The model is trained to end its rationale with one line `Diagnosis: <code> <term>; ...`; small
models drift, so parsing takes the last such line, accepts any separator, and keeps only codes that
pass the SCTID check digit (Verhoeff) and, when given, belong to the disorder vocabulary.
It lives in the torch-free runtime; training imports it from here.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping, Sequence

DIAGNOSIS_LABEL = "Diagnosis:"
_LINE = re.compile(r"^[\W_]*(?:final\s+)?diagnos[ie]s[*_\s]*(?:codes?)?[*_\s]*[:\-\u2013=]\s*(.*)$",
                   re.IGNORECASE | re.MULTILINE)
_CODE = re.compile(r"(?<!\d)\d{6,18}(?!\d)")

# Verhoeff tables (SNOMED CT identifiers end in a Verhoeff check digit)
_D = [[0, 1, 2, 3, 4, 5, 6, 7, 8, 9], [1, 2, 3, 4, 0, 6, 7, 8, 9, 5],
      [2, 3, 4, 0, 1, 7, 8, 9, 5, 6], [3, 4, 0, 1, 2, 8, 9, 5, 6, 7],
      [4, 0, 1, 2, 3, 9, 5, 6, 7, 8], [5, 9, 8, 7, 6, 0, 4, 3, 2, 1],
      [6, 5, 9, 8, 7, 1, 0, 4, 3, 2], [7, 6, 5, 9, 8, 2, 1, 0, 4, 3],
      [8, 7, 6, 5, 9, 3, 2, 1, 0, 4], [9, 8, 7, 6, 5, 4, 3, 2, 1, 0]]
_P = [[0, 1, 2, 3, 4, 5, 6, 7, 8, 9], [1, 5, 7, 6, 2, 8, 3, 0, 9, 4],
      [5, 8, 0, 3, 7, 9, 6, 1, 4, 2], [8, 9, 1, 6, 0, 4, 3, 5, 2, 7],
      [9, 4, 5, 3, 1, 2, 6, 8, 7, 0], [4, 2, 8, 6, 5, 7, 3, 9, 0, 1],
      [2, 7, 9, 3, 8, 0, 6, 4, 1, 5], [7, 0, 4, 6, 9, 1, 3, 2, 5, 8]]


def verhoeff_ok(digits: str) -> bool:
    """True when the string's last digit is its Verhoeff check digit."""
    c = 0
    for i, ch in enumerate(reversed(digits)):
        c = _D[c][_P[i % 8][int(ch)]]
    return c == 0


def format_target(rationale: str, diagnoses: Sequence[tuple[str, str]]) -> str:
    """The training target: rationale, then the structured line ("none" when nothing fits)."""
    line = "; ".join(f"{code} {term}" for code, term in diagnoses) or "none"
    return f"{rationale.strip()}\n{DIAGNOSIS_LABEL} {line}"


def split_output(text: str, vocabulary: Collection[str] | None = None,
                 terms: Mapping[str, str] | None = None) -> tuple[str, list[str]]:
    """(rationale, SNOMED codes in order of mention). Terms (lower-case term -> code) rescue a
    line that names disorders without codes."""
    matches = list(_LINE.finditer(text))
    if not matches:
        return text.strip(), []
    last = matches[-1]
    line = last.group(1)
    codes = [c for c in _CODE.findall(line) if verhoeff_ok(c)
             and (vocabulary is None or c in vocabulary)]
    if not codes and terms:
        low = line.lower()
        codes = [code for term, code in sorted(terms.items(), key=lambda t: -len(t[0]))
                 if term and term in low]
    return text[:last.start()].strip(), list(dict.fromkeys(codes))


def uncertain_band(threshold: float = 0.5, min_confidence: float = 0.6) -> tuple[float, float]:
    """[low, high): the probabilities too close to the decision threshold to call either way.

    A decision's confidence is how far p lies from the threshold on a 0.5..1 scale (= max(p, 1-p)
    at threshold 0.5); `min_confidence` c puts the band at t - (2c-1)t .. t + (2c-1)(1-t), e.g.
    [0.4, 0.6) at t = 0.5, c = 0.6 and [0.24, 0.44) at t = 0.3.
    """
    width = min(1.0, max(0.0, 2.0 * min_confidence - 1.0))
    return threshold - width * threshold, threshold + width * (1.0 - threshold)


def abstain(probabilities: Sequence[float], threshold: float = 0.5,
            min_confidence: float = 0.6) -> tuple[bool, str]:
    """Abstain when no disorder is confidently present and the model is not confident that none is.

    Decided on the most probable disorder of the vocabulary: at or above the band's top some
    disorder is confidently present (answer); below its bottom every disorder is confidently
    absent (answer: none); inside `uncertain_band(threshold, min_confidence)` nothing can be
    concluded. Other disorders near the threshold do not make the whole answer void (with a
    vocabulary of ~170 disorders one of them nearly always is). NaN probabilities are ignored.
    """
    values = [float(p) for p in probabilities if p == p]
    if not values:
        return True, "no disorder vocabulary"
    top = max(values)
    low, high = uncertain_band(threshold, min_confidence)
    if low <= top < high:
        return True, (f"uncertain: top disorder probability {top:.2f} in [{low:.2f}, {high:.2f})")
    return False, ""
