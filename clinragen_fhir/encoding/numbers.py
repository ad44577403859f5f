"""How a number is written for people and for the model: one function, used everywhere a lab
value (or a threshold, a range limit) becomes text (issue 14, item 3).

Below 1000 (in magnitude): three significant digits (`f"{v:.3g}"`), the form the released
model saw in its training prompts (`encoding.features.reading_texts`), kept byte for byte. From
1000 up: the whole number (`1234`, never `1.23e+03`). Two corners of `.3g` that wrote exponents
are written positionally instead: a value that rounds to 1000 (999.7 -> `1000`, was `1e+03`)
and one below 1e-4 (0.0000123 -> `0.0000123`, was `1.23e-05`). No value is written in
scientific notation. None and NaN are "" (no value to show).
"""

from __future__ import annotations

import math
from decimal import Decimal

__all__ = ["format_value"]


def format_value(value: float | int | None) -> str:
    """`value` as text: 3 significant digits below 1000, the whole number from 1000 up."""
    if value is None:
        return ""
    v = float(value)
    if math.isnan(v):
        return ""
    if math.isinf(v):
        return "inf" if v > 0 else "-inf"
    if abs(v) >= 1000:
        return f"{v:.0f}"
    text = f"{v:.3g}"
    if "e" not in text:
        return text
    if abs(float(text)) >= 1000:  # 999.5 <= |v| < 1000 rounds up to 1e+03
        return f"{v:.0f}"
    # |v| < 1e-4: the same three significant digits, written out
    return format(Decimal(text), "f")
