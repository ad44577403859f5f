"""Trend charts of the cited tests: each test's readings from the lab frame (canonical unit,
newest MAX_POINTS, oldest first) drawn as a hand-written inline SVG with its reference range and
the cited readings marked; no script, no external resource, so the report page stays
self-contained (report/html.py)."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import pandas as pd

from clinragen_fhir.encoding.numbers import format_value
from clinragen_fhir.report.markup import esc

DATE_TICKS = 4  # dates labelled on a chart's time axis (first and last reading included)
MAX_POINTS = 60  # per trend chart: the newest readings


@dataclass(frozen=True)
class Point:
    time: str  # ISO 8601
    value: float
    reference: str  # "Observation/<id>"


@dataclass(frozen=True)
class Trend:
    """One lab's readings (canonical unit) and its reference range, for a chart."""

    loinc: str
    display: str
    unit: str
    points: tuple[Point, ...]
    ref_low: float | None = None
    ref_high: float | None = None


def as_number(v: Any) -> float | None:
    """A frame cell as a float; None for a missing, non-numeric or NaN one."""
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(f) else f


def lab_trends(labs: pd.DataFrame | None, loincs: Iterable[str]) -> dict[str, Trend]:
    """The readings of each named LOINC code in the lab frame, oldest first (newest MAX_POINTS)."""
    wanted = [c for c in dict.fromkeys(loincs) if c]
    if labs is None or labs.empty or not wanted:
        return {}
    out: dict[str, Trend] = {}
    for loinc in wanted:
        rows = labs[labs["loinc"] == loinc].sort_values("time").tail(MAX_POINTS)
        if rows.empty:
            continue
        points = tuple(Point(pd.Timestamp(t).isoformat(), float(v), str(ref))
                       for t, v, ref in zip(rows["time"], rows["value"], rows["observation_id"],
                                            strict=True))
        last = rows.iloc[-1]
        out[loinc] = Trend(loinc, str(last["display"] or loinc), str(last["unit"]), points,
                           as_number(last["ref_low"]), as_number(last["ref_high"]))
    return out


def trend_svg(trend: Trend, cited: Iterable[str] = (), width: int = 420,
              height: int = 140) -> str:
    """An inline SVG line chart: readings over dated ticks, the reference range band, cited
    readings in red. No script and no external resource, so the page stays self-contained."""
    cited_refs = set(cited)
    pad_l, pad_r, pad_t, pad_b = 48, 40, 10, 30
    pts = trend.points
    times = [pd.Timestamp(p.time).timestamp() for p in pts]
    values = [p.value for p in pts]
    bounds = values + [b for b in (trend.ref_low, trend.ref_high) if b is not None]
    lo, hi = min(bounds), max(bounds)
    if hi == lo:
        lo, hi = lo - 1.0, hi + 1.0
    margin = (hi - lo) * 0.08
    lo, hi = lo - margin, hi + margin
    t0, t1 = min(times), max(times)
    span = (t1 - t0) or 1.0
    plot_w, plot_h = width - pad_l - pad_r, height - pad_t - pad_b

    def x(t: float) -> float:
        return pad_l + (plot_w * (t - t0) / span if t1 > t0 else plot_w / 2)

    def y(v: float) -> float:
        return pad_t + plot_h * (1 - (v - lo) / (hi - lo))

    title = (f"{trend.display} ({trend.unit}), {len(pts)} readings from {pts[0].time[:10]} "
             f"to {pts[-1].time[:10]}")
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" class="trend" width="{width}" '
             f'height="{height}" viewBox="0 0 {width} {height}" role="img" '
             f'aria-label="{esc(title)}"><title>{esc(title)}</title>',
             f'<rect x="{pad_l}" y="{pad_t}" width="{plot_w}" height="{plot_h}" '
             'fill="#fafafa" stroke="#bbb"/>']
    if trend.ref_low is not None or trend.ref_high is not None:
        top = y(trend.ref_high) if trend.ref_high is not None else pad_t
        bottom = y(trend.ref_low) if trend.ref_low is not None else pad_t + plot_h
        top, bottom = max(pad_t, min(top, bottom)), min(pad_t + plot_h, max(top, bottom))
        parts.append(f'<rect x="{pad_l}" y="{top:.1f}" width="{plot_w}" '
                     f'height="{max(0.0, bottom - top):.1f}" fill="#e3f2e1">'
                     f'<title>reference range {esc(format_value(trend.ref_low))}\u2013'
                     f'{esc(format_value(trend.ref_high))} {esc(trend.unit)}</title></rect>')
    # dated ticks: evenly spaced in time, a label only where the date differs from the last one
    base = pad_t + plot_h
    ticks = [t0 + span * i / (DATE_TICKS - 1) for i in range(DATE_TICKS)] if t1 > t0 else [t0]
    shown: list[str] = []
    for i, t in enumerate(ticks):
        day = pd.Timestamp(t, unit="s", tz="UTC").date().isoformat()
        if day in shown:
            continue
        shown.append(day)
        anchor = "start" if i == 0 and len(ticks) > 1 else \
            "end" if i == len(ticks) - 1 and len(ticks) > 1 else "middle"
        parts.append(f'<line class="tick" x1="{x(t):.1f}" y1="{base}" x2="{x(t):.1f}" '
                     f'y2="{base + 4}" stroke="#777"/>'
                     f'<text class="date" x="{x(t):.1f}" y="{base + 15}" text-anchor="{anchor}" '
                     f'font-size="10">{esc(day)}</text>')
    if len(pts) > 1:
        line = " ".join(f"{x(t):.1f},{y(v):.1f}" for t, v in zip(times, values, strict=True))
        parts.append(f'<polyline points="{line}" fill="none" stroke="#1f5f9f" '
                     'stroke-width="1.5"/>')
    for p, t, v in zip(pts, times, values, strict=True):
        hit = p.reference in cited_refs
        parts.append(f'<circle cx="{x(t):.1f}" cy="{y(v):.1f}" r="{3.2 if hit else 2.2}" '
                     f'fill="{"#c62828" if hit else "#1f5f9f"}"><title>{esc(p.time[:10])}: '
                     f'{esc(format_value(v))} {esc(trend.unit)}</title></circle>')
    # the newest reading's value, printed beside it: a paper copy has no hover titles
    parts += [
        f'<text x="{x(times[-1]) + 5:.1f}" y="{y(values[-1]) + 3:.1f}" font-size="10" '
        f'fill="#333">{esc(format_value(values[-1]))}</text>',
        f'<text x="{pad_l - 4}" y="{pad_t + 9}" text-anchor="end" font-size="10">'
        f'{esc(format_value(hi - margin))}</text>',
        f'<text x="{pad_l - 4}" y="{pad_t + plot_h}" text-anchor="end" font-size="10">'
        f'{esc(format_value(lo + margin))}</text>',
        f'<text x="{pad_l + plot_w / 2:.1f}" y="{height - 2}" text-anchor="middle" '
        'font-size="9" fill="#777">date of reading</text>',
        "</svg>"]
    return "".join(parts)
