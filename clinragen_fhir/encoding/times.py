"""Reading times as numbers: one conversion for the model's features and the knowledge rules.

The lab frame's `time` column holds timezone-aware instants (encoding/labs.py); arithmetic on
windows, gaps and ages needs plain seconds. Naive times are taken as UTC, as the frame's are.
"""

from __future__ import annotations

from datetime import datetime

import numpy as np
import pandas as pd

DAY_SECONDS = 86400.0
_EPOCH = pd.Timestamp(0, tz="UTC")


def epoch_seconds(times: pd.Series) -> np.ndarray:
    """Seconds since the epoch (UTC) of each time in a frame's column."""
    t = pd.to_datetime(times, utc=True)
    return np.asarray((t - _EPOCH).dt.total_seconds(), dtype=float)


def instant_seconds(when: datetime | pd.Timestamp) -> float:
    """Seconds since the epoch (UTC) of one instant, as `epoch_seconds` counts them."""
    t = pd.Timestamp(when)
    t = t.tz_localize("UTC") if t.tzinfo is None else t.tz_convert("UTC")
    return float((t - _EPOCH).total_seconds())
