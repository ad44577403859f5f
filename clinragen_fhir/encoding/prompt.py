"""The text after the prefix: the patient's readings and the diagnoses the head concluded.

The head decides; the SLM writes one line per concluded diagnosis naming the readings behind it,
copying them from the readings shown here. Training puts the labels here (teacher forcing), the
runtime the head's conclusions. Torch-free, so the torch model and the ONNX runtime build the
same tokens.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

PROMPT_POST = "\n"  # the last fixed piece of the prefix (model.clinragen.Prompt.post)
MAX_CONDITION_TOKENS = 64  # the diagnoses and the request; readings have their own budget
_ASK = ("\nFor each diagnosis, cite the readings that support it.<|im_end|>\n"
        "<|im_start|>assistant\n")

Encode = Callable[[str], Sequence[int]]


def readings_text(readings: Sequence[str]) -> str:
    """"Readings: a; b; c.\n" ("" without readings)."""
    return f"Readings: {'; '.join(readings)}.\n" if readings else ""


def condition_text(terms: Sequence[str], readings: Sequence[str] = ()) -> str:
    """"Readings: ...\nDiagnoses: Prediabetes; Obesity.\nFor each diagnosis, ..."
    ("Diagnoses: none." when nothing is concluded)."""
    listed = "; ".join(t.strip() for t in terms if t.strip()) or "none"
    return f"{readings_text(readings)}Diagnoses: {listed}.{_ASK}"


def shown_readings(encode: Encode, readings: Sequence[str], reading_budget: int) -> list[str]:
    """The readings the prompt shows: whole ones, in order, while they fit in the budget."""
    shown: list[str] = []
    for r in readings:
        if len(encode(readings_text([*shown, r]))) > reading_budget:
            break
        shown.append(r)
    return shown


def condition_ids(encode: Encode, terms: Sequence[str], readings: Sequence[str] = (),
                  reading_budget: int = 0) -> list[int]:
    """Token ids of `condition_text`: whole readings, in order, while they fit in
    `reading_budget` tokens; then diagnoses, dropped from the end until the rest fits in
    MAX_CONDITION_TOKENS (the request is always kept whole)."""
    head = list(encode(readings_text(shown_readings(encode, readings, reading_budget))))
    kept = list(terms)
    while True:
        tail = list(encode(condition_text(kept)))
        if len(tail) <= MAX_CONDITION_TOKENS or not kept:
            return head + tail[:MAX_CONDITION_TOKENS]
        kept.pop()


def condition_rows(encode: Encode, terms: Sequence[Sequence[str]],
                   readings: Sequence[Sequence[str]], reading_budget: int) -> list[list[int]]:
    """`condition_ids` per row of a batch (the torch model and the ONNX runtime both call it)."""
    return [condition_ids(encode, t, r, reading_budget)
            for t, r in zip(terms, readings, strict=True)]
