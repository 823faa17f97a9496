"""Overlap and volume metrics of a predicted lesion mask against the truth.

Everything derives from the four voxel counts (:class:`Confusion`), so a subject's volumes can
be dropped as soon as they are counted. Definitions (P = prediction, T = truth):

* ``dice``: lesion Dice, 2|P & T| / (|P| + |T|).
* ``macro_dice``: the mean of lesion Dice and background Dice (2 TN / (2 TN + FP + FN)).
  The paper's Table 1 "Dice" of 0.876 for MeshNet-26 is most likely this one: its MCC
  column is about 2 x Dice - 1 on every row, which macro Dice satisfies and lesion Dice
  does not.
* ``avd``: absolute volume difference |V_P - V_T| / V_T.
* ``mcc``: Matthews correlation coefficient of the voxel labels.
* ``precision`` TP / (TP + FP), ``recall`` TP / (TP + FN).
* ``true_ml``, ``pred_ml``: lesion volumes in millilitres.

Edge cases, chosen so that a perfect "no lesion" answer scores as perfect:

* both masks empty: dice, macro_dice, precision, recall = 1.0; avd = 0.0; mcc = 0.0
  (undefined; scikit-learn's convention, like every zero denominator of MCC);
* empty truth, lesion predicted: dice, precision, recall = 0.0; avd = NaN (no reference
  volume to divide by; summaries skip NaN and say how many they skipped);
* lesion in the truth, nothing predicted: dice, precision, recall = 0.0; avd = 1.0;
* every voxel lesion in both: dice, macro_dice (its background half has nothing to score
  either, so it counts as 1.0), precision, recall = 1.0; avd = 0.0; mcc = 0.0.

scikit-learn agrees on every non-empty case (``f1_score`` is lesion Dice, ``f1_score(...,
average="macro")`` macro Dice, ``matthews_corrcoef`` MCC); for two empty masks its
``f1_score`` gives 0.0 unless ``zero_division=1.0``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

METRICS = ("dice", "macro_dice", "avd", "mcc", "precision", "recall", "true_ml", "pred_ml")


@dataclass(frozen=True)
class Confusion:
    """Voxel counts of one subject, and the volume of one voxel in mL."""

    tp: int
    fp: int
    fn: int
    tn: int
    voxel_ml: float = 0.001  # 1 mm^3

    def __post_init__(self):
        # Python ints: exact products at any volume size (numpy's int64 would overflow in
        # MCC's denominator at 256^3), and plain numbers in JSON.
        for name in ("tp", "fp", "fn", "tn"):
            value = getattr(self, name)
            if value < 0 or int(value) != value:
                raise ValueError(f"{name} must be a count, not {value!r}")
            object.__setattr__(self, name, int(value))
        object.__setattr__(self, "voxel_ml", float(self.voxel_ml))

    def to_dict(self) -> dict:
        return asdict(self)


def confusion(prediction: np.ndarray, truth: np.ndarray, voxel_ml: float = 0.001) -> Confusion:
    """Count TP, FP, FN, TN of two masks of the same shape (nonzero = lesion)."""
    p = np.asarray(prediction) != 0
    t = np.asarray(truth) != 0
    if p.shape != t.shape:
        raise ValueError(f"masks of different shapes: {p.shape} and {t.shape}")
    tp = int(np.count_nonzero(p & t))
    n_p, n_t = int(np.count_nonzero(p)), int(np.count_nonzero(t))
    fp, fn = n_p - tp, n_t - tp
    return Confusion(tp, fp, fn, p.size - tp - fp - fn, float(voxel_ml))


def _ratio(num: float, den: float, both_empty: bool) -> float:
    if den:
        return num / den
    return 1.0 if both_empty else 0.0


def scores(c: Confusion) -> dict[str, float]:
    """Every metric of :data:`METRICS` from the counts (see the module's edge cases)."""
    n_true, n_pred = c.tp + c.fn, c.tp + c.fp
    empty = n_true == 0 and n_pred == 0
    lesion = _ratio(2 * c.tp, n_true + n_pred, empty)
    background = _ratio(2 * c.tn, 2 * c.tn + c.fp + c.fn, True)
    if n_true:
        avd = abs(n_pred - n_true) / n_true
    else:
        avd = 0.0 if empty else math.nan
    # Products of counts overflow int64 at 256^3; Python ints do not (exact numerator).
    den = math.sqrt(n_pred * n_true * (c.tn + c.fp) * (c.tn + c.fn))
    mcc = (c.tp * c.tn - c.fp * c.fn) / den if den else 0.0
    return {
        "dice": lesion,
        "macro_dice": (lesion + background) / 2,
        "avd": avd,
        "mcc": mcc,
        "precision": _ratio(c.tp, n_pred, empty),
        "recall": _ratio(c.tp, n_true, empty),
        "true_ml": n_true * c.voxel_ml,
        "pred_ml": n_pred * c.voxel_ml,
    }


def dice(prediction: np.ndarray, truth: np.ndarray) -> float:
    """Lesion Dice of two masks; 1.0 when both are empty."""
    return scores(confusion(prediction, truth))["dice"]


def summarize(values) -> dict[str, float]:
    """Mean, SD (n - 1), median, quartiles and counts of some scores, NaN skipped."""
    a = np.asarray([v for v in values if v is not None], dtype=np.float64)
    finite = a[np.isfinite(a)]
    n = len(finite)
    if not n:
        nan = math.nan
        return {"n": 0, "skipped": len(a), "mean": nan, "sd": nan, "median": nan,
                "q1": nan, "q3": nan}
    q1, median, q3 = np.percentile(finite, [25, 50, 75])
    return {"n": n, "skipped": len(a) - n, "mean": float(finite.mean()),
            "sd": float(finite.std(ddof=1)) if n > 1 else 0.0, "median": float(median),
            "q1": float(q1), "q3": float(q3)}
