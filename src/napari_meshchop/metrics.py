"""Overlap metrics for lesion masks (minimal; the evaluation core will extend it)."""

from __future__ import annotations

import numpy as np


def dice(prediction: np.ndarray, truth: np.ndarray) -> float:
    """Dice = 2|P & T| / (|P| + |T|) of two masks (nonzero = lesion).

    Edge cases: both masks empty -> 1.0 (the prediction agrees perfectly: no lesion);
    exactly one empty -> 0.0.
    """
    p = np.asarray(prediction) != 0
    t = np.asarray(truth) != 0
    if p.shape != t.shape:
        raise ValueError(f"masks of different shapes: {p.shape} and {t.shape}")
    total = int(p.sum()) + int(t.sum())
    if total == 0:
        return 1.0
    return 2.0 * int(np.logical_and(p, t).sum()) / total
