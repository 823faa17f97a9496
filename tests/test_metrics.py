"""Metrics from voxel counts: documented edge cases, scikit-learn's definitions, big counts."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import f1_score, matthews_corrcoef

from napari_meshchop.evaluation.evaluate import voxel_ml
from napari_meshchop.evaluation.metrics import (
    METRICS,
    Confusion,
    confusion,
    dice,
    scores,
    summarize,
)


def _masks(shape, seed, p_pred=0.3, p_true=0.2):
    rng = np.random.default_rng(seed)
    return rng.random(shape) < p_pred, rng.random(shape) < p_true


def test_both_empty_is_a_perfect_answer():
    empty = np.zeros((4, 5, 6), bool)
    s = scores(confusion(empty, empty))
    assert s["dice"] == s["macro_dice"] == s["precision"] == s["recall"] == 1.0
    assert s["avd"] == 0.0 and s["mcc"] == 0.0
    assert s["true_ml"] == s["pred_ml"] == 0.0
    assert dice(empty, empty) == 1.0


def test_empty_truth_with_a_predicted_lesion():
    truth = np.zeros((4, 5, 6), bool)
    pred = truth.copy()
    pred[1, 1, 1:3] = True
    s = scores(confusion(pred, truth))
    assert s["dice"] == s["precision"] == s["recall"] == 0.0
    assert math.isnan(s["avd"])
    # Background Dice: 2 TN / (2 TN + FP) with TN = 118, FP = 2.
    assert s["macro_dice"] == pytest.approx((0 + 236 / 238) / 2)
    assert s["pred_ml"] == pytest.approx(0.002) and s["true_ml"] == 0.0


def test_lesion_in_the_truth_and_nothing_predicted():
    truth = np.zeros((4, 5, 6), np.uint8)
    truth[2, 2:4, 2:5] = 1
    s = scores(confusion(np.zeros_like(truth), truth))
    assert s["dice"] == s["precision"] == s["recall"] == 0.0
    assert s["avd"] == 1.0 and s["mcc"] == 0.0 and s["pred_ml"] == 0.0
    assert s["true_ml"] == pytest.approx(0.006)


@pytest.mark.filterwarnings("ignore:A single label")
def test_all_lesion_in_both():
    full = np.ones((3, 3, 3), bool)
    c = confusion(full, full)
    assert (c.tp, c.fp, c.fn, c.tn) == (27, 0, 0, 0)
    s = scores(c)
    assert s["dice"] == s["macro_dice"] == s["precision"] == s["recall"] == 1.0
    assert s["avd"] == 0.0 and s["mcc"] == 0.0
    # scikit-learn's conventions for the same degenerate case
    y = full.ravel().astype(int)
    assert f1_score(y, y) == 1.0 and matthews_corrcoef(y, y) == 0.0


@pytest.mark.parametrize("shape,seed,p_pred,p_true", [
    ((7, 8, 9), 0, 0.3, 0.2), ((16, 16, 16), 1, 0.05, 0.1), ((5, 31, 3), 2, 0.6, 0.5),
    ((20, 20, 20), 3, 0.01, 0.002), ((2, 3, 4), 4, 0.5, 0.5)])
def test_agree_with_scikit_learn(shape, seed, p_pred, p_true):
    pred, truth = _masks(shape, seed, p_pred, p_true)
    assert truth.any()  # non-degenerate cases only; edge cases have their own tests
    s = scores(confusion(pred, truth))
    y_true, y_pred = truth.ravel().astype(int), pred.ravel().astype(int)
    assert s["dice"] == pytest.approx(f1_score(y_true, y_pred), abs=1e-12)
    assert s["macro_dice"] == pytest.approx(f1_score(y_true, y_pred, average="macro"),
                                            abs=1e-12)
    assert s["mcc"] == pytest.approx(matthews_corrcoef(y_true, y_pred), abs=1e-12)
    tp = int((pred & truth).sum())
    assert s["precision"] == pytest.approx(tp / pred.sum())
    assert s["recall"] == pytest.approx(tp / truth.sum())


def test_any_nonzero_label_is_lesion_and_shapes_must_match():
    truth = np.array([[[0, 2], [3, 0]]])
    pred = np.array([[[1.0, 0.0], [0.5, 0.0]]])
    assert confusion(pred, truth) == Confusion(tp=1, fp=1, fn=1, tn=1)
    with pytest.raises(ValueError, match="different shapes"):
        confusion(np.zeros((2, 2, 2)), np.zeros((2, 2, 3)))


def test_volumes_and_avd_from_an_anisotropic_voxel():
    affine = np.diag([0.8, 1.25, 3.0, 1.0])  # 3 mm^3 voxels
    assert voxel_ml(affine) == pytest.approx(0.003)
    rotated = affine.copy()
    rotated[:3, :3] = np.array([[0, 0, 1], [1, 0, 0], [0, -1, 0]]) @ affine[:3, :3]
    assert voxel_ml(rotated) == pytest.approx(0.003)  # orientation does not change volume
    truth = np.zeros((10, 10, 10), bool)
    truth[2:6, 2:7, 3:5] = True  # 40 voxels
    pred = np.zeros_like(truth)
    pred[3:6, 2:7, 3:6] = True  # 45 voxels, 30 of them shared
    s = scores(confusion(pred, truth, voxel_ml(affine)))
    assert s["true_ml"] == pytest.approx(40 * 0.003)
    assert s["pred_ml"] == pytest.approx(45 * 0.003)
    assert s["avd"] == pytest.approx(5 / 40)
    assert s["dice"] == pytest.approx(2 * 30 / 85)


def test_counts_of_a_256_cube_do_not_overflow():
    n = 256**3
    # Balanced counts: MCC's denominator is about 4e27, far beyond int64.
    c = Confusion(tp=np.int64(4_000_000), fp=np.int64(200_000), fn=np.int64(300_000),
               tn=np.int64(n - 4_500_000))
    assert all(type(v) is int for v in (c.tp, c.fp, c.fn, c.tn))
    s = scores(c)
    tp, fp, fn, tn = 4_000_000, 200_000, 300_000, n - 4_500_000
    exact = (tp * tn - fp * fn) / math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    assert s["mcc"] == pytest.approx(exact, rel=1e-12) and 0.9 < s["mcc"] < 1
    assert s["dice"] == pytest.approx(2 * tp / (2 * tp + fp + fn), rel=1e-12)
    assert s["true_ml"] == pytest.approx(4_300.0)
    # What int64 arithmetic would give: a wrapped, meaningless denominator.
    with np.errstate(over="ignore"):
        wrapped = np.int64(tp + fp) * np.int64(tp + fn) * np.int64(tn + fp) * np.int64(tn + fn)
    assert int(wrapped) != (tp + fp) * (tp + fn) * (tn + fp) * (tn + fn)
    with pytest.raises(ValueError, match="count"):
        Confusion(tp=-1, fp=0, fn=0, tn=0)
    assert Confusion(1, 2, 3, 4).to_dict() == {"tp": 1, "fp": 2, "fn": 3, "tn": 4,
                                             "voxel_ml": 0.001}


def test_summaries_skip_nan_and_say_so():
    st = summarize([0.2, float("nan"), 0.4, None, 0.9, 0.5])
    values = np.array([0.2, 0.4, 0.9, 0.5])
    assert st["n"] == 4 and st["skipped"] == 1
    assert st["mean"] == pytest.approx(values.mean())
    assert st["sd"] == pytest.approx(values.std(ddof=1))
    assert (st["q1"], st["median"], st["q3"]) == pytest.approx(
        tuple(np.percentile(values, [25, 50, 75])))
    nothing = summarize([float("nan")])
    assert nothing["n"] == 0 and nothing["skipped"] == 1 and math.isnan(nothing["mean"])
    assert set(scores(Confusion(1, 1, 1, 1))) == set(METRICS)
