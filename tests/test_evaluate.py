"""The evaluation core (one subject in memory at a time) and `meshchop evaluate`."""

from __future__ import annotations

import csv
import json
import math
import shutil
import threading

import nibabel as nib
import numpy as np
import pytest
import torch
from sklearn.metrics import f1_score, matthews_corrcoef

from napari_meshchop import cli, events
from napari_meshchop.data import folds, manifest
from napari_meshchop.data.cache import ArcDataset, PairCache
from napari_meshchop.errors import Cancelled, InputError, MeshchopError
from napari_meshchop.evaluation import evaluate
from napari_meshchop.evaluation.evaluate import (
    Subject,
    SubjectResult,
    evaluate_subjects,
)
from napari_meshchop.evaluation.metrics import METRICS
from napari_meshchop.imaging.preprocess import PreprocessSpec
from napari_meshchop.network import checkpoint as ckpt_io
from napari_meshchop.network.inference import FusedMeshNet
from napari_meshchop.network.model import Architecture, MeshNet


class Threshold:
    """A stand-in predictor: P(lesion) is the image itself."""

    n_steps = 1

    def lesion_probability(self, volume, stop=None):
        events.check_stop(stop)
        yield events.Progress("network", 1, 1)
        return np.asarray(volume, np.float32)


def _subject(i: int, shape=(6, 5, 4)) -> Subject:
    rng = np.random.default_rng(i)
    image = rng.random(shape, dtype=np.float32)
    truth = (rng.random(shape) < 0.4).astype(np.uint8)
    return Subject(f"sub-{i}", "space_2x", image, truth, np.diag([1.0, 1.0, 2.0, 1.0]))


def _lazy(n: int, log: list, broken: set = frozenset()):
    """Loader callables that note when they run (and fail for the ``broken`` indices)."""
    def loader(i):
        def load():
            log.append(("load", i))
            if i in broken:
                raise InputError(f"sub-{i}.nii.gz", "file is truncated or corrupt")
            return _subject(i)
        load.id, load.acquisition = f"sub-{i}", "space_2x"
        return load
    return [loader(i) for i in range(n)]


def _note_records(log):
    def on_event(event):
        if isinstance(event, SubjectResult):
            log.append(("record", int(event.subject.split("-")[1])))
    return on_event


def test_each_record_comes_out_before_the_next_subject_is_loaded():
    log: list = []
    results = events.run(evaluate_subjects(Threshold(), iter(_lazy(4, log)), 4),
                         _note_records(log))
    assert log == [(kind, i) for i in range(4) for kind in ("load", "record")]
    assert [r.index for r in results] == [0, 1, 2, 3] and all(r.ok for r in results)
    for r in results:  # the mask P > 0.5 against the truth, counted here, 2 mm^3 voxels
        assert r.counts == _counted(_subject(r.index).image > 0.5, _subject(r.index).truth)
        p, t = _subject(r.index).image.ravel() > 0.5, _subject(r.index).truth.ravel() > 0
        assert r.scores["dice"] == pytest.approx(f1_score(t, p), rel=1e-12)
        assert r.scores["macro_dice"] == pytest.approx(f1_score(t, p, average="macro"),
                                                       rel=1e-12)
        assert r.scores["mcc"] == pytest.approx(matthews_corrcoef(t, p), rel=1e-12)
        assert r.scores["true_ml"] == pytest.approx(t.sum() * 0.002)
        assert r.scores["pred_ml"] == pytest.approx(p.sum() * 0.002)


def _counted(prediction, truth, voxel_ml: float = 0.002) -> dict:
    p, t = np.asarray(prediction) > 0, np.asarray(truth) > 0
    return {"tp": int(np.sum(p & t)), "fp": int(np.sum(p & ~t)), "fn": int(np.sum(~p & t)),
            "tn": int(np.sum(~p & ~t)), "voxel_ml": voxel_ml}


def test_a_subject_that_fails_to_load_gets_its_error_and_the_rest_go_on():
    log: list = []
    seen: list = []
    results = events.run(evaluate_subjects(Threshold(), _lazy(4, log, broken={1}), 4),
                         seen.append)
    assert [r.ok for r in results] == [True, False, True, True]
    bad = results[1]
    assert bad.subject == "sub-1" and bad.acquisition == "space_2x" and bad.scores == {}
    assert bad.error == "InputError: sub-1.nii.gz: file is truncated or corrupt"
    row = bad.to_row()
    assert row["error"] == bad.error and all(math.isnan(row[m]) for m in METRICS)
    assert [e for e in seen if isinstance(e, SubjectResult)] == results
    progress = [e for e in seen if isinstance(e, events.Progress) and e.stage == "evaluate"]
    assert [(e.done, e.message) for e in progress][-1] == (4, "sub-3")
    st = evaluate.summary(results)
    assert st["dice"]["n"] == 3
    assert st["dice"]["mean"] == pytest.approx(np.mean([r.scores["dice"] for r in results
                                                        if r.ok]))


def test_stop_cancels_between_subjects():
    log: list = []
    stop = threading.Event()

    def on_event(event):
        _note_records(log)(event)
        if isinstance(event, SubjectResult) and event.index == 1:
            stop.set()

    with pytest.raises(Cancelled):
        events.run(evaluate_subjects(Threshold(), _lazy(4, log), 4, stop=stop), on_event)
    assert log == [("load", 0), ("record", 0), ("load", 1), ("record", 1)]


def test_saved_predictions_are_the_scored_masks(tmp_path):
    results = events.run(evaluate_subjects(Threshold(), [_subject(0), _subject(1)], 2,
                                           predictions_dir=tmp_path / "pred"))
    for r in results:
        img = nib.load(r.prediction)
        assert r.prediction == tmp_path / "pred" / f"{r.subject}.nii.gz"
        assert np.array_equal(img.affine, np.diag([1.0, 1.0, 2.0, 1.0]))
        assert int(np.asarray(img.dataobj).sum()) == r.counts["tp"] + r.counts["fp"]
        assert r.to_row()["prediction"] == str(r.prediction)


def test_a_plain_dataset_of_tensor_pairs_is_evaluated_too():
    pairs = [(torch.from_numpy(s.image[None]), torch.from_numpy(s.truth))
             for s in map(_subject, range(2))]
    results = events.run(evaluate.evaluate_dataset(Threshold(), pairs))
    assert [r.subject for r in results] == ["item 0", "item 1"]
    assert [r.counts for r in results] == [
        _counted(_subject(i).image > 0.5, _subject(i).truth, 0.001) for i in range(2)]


# --------------------------------------------------------------- a replica cohort


@pytest.fixture(scope="module")
def other_checkpoint(tmp_path_factory):
    """A second tiny model on the tiny_checkpoint's grid (ras-minmax, 32^3)."""
    torch.manual_seed(7)
    model = MeshNet(Architecture(channels=3, dilations=(1, 2, 1)))
    ckpt = ckpt_io.from_model(model.eval(), PreprocessSpec("ras-minmax", shape=(32, 32, 32)))
    return ckpt.save(tmp_path_factory.mktemp("other") / "other.pt")


def _by_hand(model_path, data, ids):
    """Each subject's counts as the training code would see them: dataset, pass, count."""
    ckpt = ckpt_io.load(model_path)
    fused = FusedMeshNet(ckpt.build())
    dataset = ArcDataset(data, ids, ckpt.preprocess)
    out = {}
    for pair, (image, mask) in zip(dataset.pairs, dataset):
        prob = events.run(fused.lesion_probability(image[0].numpy()))
        grid = dataset.cache.get(pair).affine
        out[pair.id] = _counted(prob > 0.5, mask.numpy(),
                                abs(np.linalg.det(grid[:3, :3])) / 1000)
    return out


def _csv_rows(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def _same(csv_value: str, json_value):
    if json_value is None:
        return csv_value == ""
    if isinstance(json_value, str):
        return csv_value == json_value
    return float(csv_value) == pytest.approx(json_value, rel=1e-12)


def test_cli_writes_json_and_csv_that_agree_with_the_core(data, tiny_checkpoint, tmp_path,
                                                          capsys):
    out = tmp_path / "eval"
    assert cli.main(["evaluate", str(tiny_checkpoint), "--data-dir", str(data),
                     "--outer-fold", "0", "--device", "cpu", "--out", str(out),
                     "--save-predictions", "-q"]) == 0
    printed = capsys.readouterr().out
    ids = folds.load(data).outer[0].test
    assert folds.fold_ids(data, 0) == ids

    doc = json.loads((out / "results.json").read_text())
    assert doc["format"] == "napari-meshchop-evaluation" and doc["complete"] is True
    assert doc["config"] == {"models": [str(tiny_checkpoint)], "data_dir": str(data.resolve()),
                             "outer_fold": 0, "inner_fold": None, "part": "test",
                             "device": "cpu"}
    assert doc["subjects"] == len(ids) and doc["failed"] == 0
    records = doc["records"]
    assert [r["subject"] for r in records] == ids

    rows = _csv_rows(out / "results.csv")
    assert list(rows[0]) == list(records[0])
    for row, record in zip(rows, records, strict=True):
        assert all(_same(row[k], v) for k, v in record.items()), (row, record)

    # The core's own records, and counts made by hand, give the same numbers.
    core = events.run(evaluate.evaluate(tiny_checkpoint, data, ids, "cpu"))
    by_hand = _by_hand(tiny_checkpoint, data, ids)
    for record, r in zip(records, core, strict=True):
        assert r.counts == pytest.approx(by_hand[r.subject], rel=1e-12)
        assert {k: record[k] for k in ("tp", "fp", "fn", "tn")} == {
            k: r.counts[k] for k in ("tp", "fp", "fn", "tn")}
        for m in METRICS:
            assert record[m] == pytest.approx(r.scores[m], rel=1e-12, nan_ok=True), m
        saved = np.asarray(nib.load(record["prediction"]).dataobj)
        assert int(saved.sum()) == record["tp"] + record["fp"]
        # One printed row per subject: volumes and lesion Dice as the JSON has them.
        line = next(x for x in printed.splitlines() if x.startswith(record["subject"]))
        assert f"{record['dice']:6.3f}" in line and f"{record['true_ml']:8.2f}" in line
    for m in ("dice", "macro_dice", "mcc"):
        values = [r[m] for r in records]
        assert doc["summary"][m]["mean"] == pytest.approx(np.mean(values))
        assert doc["summary"][m]["median"] == pytest.approx(np.median(values))
    assert f"{len(ids)} of {len(ids)} subjects scored" in printed
    assert "lesion Dice" in printed and "macro Dice" in printed and "+/-" in printed


def test_cli_reports_a_damaged_subject_in_its_row_and_goes_on(data, tiny_checkpoint,
                                                              tmp_path, capsys):
    folder = tmp_path / "arc"
    shutil.copytree(data, folder)
    ids = folds.fold_ids(folder, 1, "train")
    pair = next(p for p in manifest.load(folder).pairs if p.id == ids[0])
    image = folder / pair.image
    image.write_bytes(image.read_bytes()[: image.stat().st_size // 2])
    PairCache(folder, ckpt_io.load(tiny_checkpoint).preprocess).path(pair).unlink(
        missing_ok=True)

    out = tmp_path / "eval"
    assert cli.main(["evaluate", str(tiny_checkpoint), "--data-dir", str(folder),
                     "--outer-fold", "1", "--part", "train", "--device", "cpu",
                     "--out", str(out), "-q"]) == 0
    printed = capsys.readouterr().out
    assert f"{len(ids) - 1} of {len(ids)} subjects scored; 1 failed" in printed
    row_line = next(x for x in printed.splitlines() if x.startswith(pair.id))
    assert "error: InputError" in row_line and pair.image.split("/")[-1] in row_line
    doc = json.loads((out / "results.json").read_text())
    assert doc["failed"] == 1
    bad, *good = doc["records"]
    assert bad["subject"] == pair.id and "truncated or corrupt" in bad["error"]
    assert bad["dice"] is None and bad["tp"] is None
    assert all(r["error"] == "" and r["dice"] is not None for r in good)
    assert doc["summary"]["dice"]["n"] == len(ids) - 1
    rows = _csv_rows(out / "results.csv")
    assert rows[0]["error"] == bad["error"] and rows[0]["dice"] == ""


def test_cli_ensemble_and_inner_fold_parts(data, tiny_checkpoint, other_checkpoint, tmp_path,
                                           capsys):
    out = tmp_path / "eval"
    models = [str(tiny_checkpoint), str(other_checkpoint)]
    assert cli.main(["evaluate", *models, "--data-dir", str(data), "--outer-fold", "1",
                     "--inner-fold", "0", "--device", "cpu", "--out", str(out), "-q"]) == 0
    printed = capsys.readouterr().out
    assert "tiny.pt + other.pt" in printed and "(val of outer fold 1, inner fold 0)" in printed
    doc = json.loads((out / "results.json").read_text())
    ids = folds.load(data).outer[1].inner[0].val
    assert doc["config"]["models"] == models and doc["config"]["part"] == "val"
    assert [r["subject"] for r in doc["records"]] == ids
    core = events.run(evaluate.evaluate(models, data, ids, "cpu"))
    single = events.run(evaluate.evaluate(models[:1], data, ids, "cpu"))
    assert [r["tp"] for r in doc["records"]] == [r.counts["tp"] for r in core]
    assert [r.counts for r in core] != [r.counts for r in single]  # the second model counts


@pytest.mark.parametrize("more,message", [
    (["--outer-fold", "5"], "outer fold 5 does not exist"),
    (["--outer-fold", "0", "--inner-fold", "0", "--part", "test"], "no part 'test'"),
    (["--outer-fold", "0", "--save-predictions"], "--save-predictions needs --out"),
])
def test_cli_bad_input_exits_2(data, tiny_checkpoint, capsys, more, message):
    assert cli.main(["evaluate", str(tiny_checkpoint), "--data-dir", str(data), *more]) == 2
    assert message in capsys.readouterr().err


def test_cli_missing_checkpoint_or_folds_exits_2(data, tmp_path, capsys, tiny_checkpoint):
    assert cli.main(["evaluate", str(tmp_path / "none.pt"), "--data-dir", str(data),
                     "--outer-fold", "0", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "none.pt" in err and "neither a checkpoint file" in err
    assert cli.main(["evaluate", str(tiny_checkpoint), "--data-dir", str(tmp_path),
                     "--outer-fold", "0"]) == 2
    assert "meshchop folds" in capsys.readouterr().err


def test_fold_ids_of_every_part(data):
    made = folds.load(data)
    assert folds.fold_ids(data, 1, "train") == made.outer[1].train
    assert folds.fold_ids(data, 0, "train", inner=1) == made.outer[0].inner[1].train
    assert folds.fold_ids(data, 0, "val", inner=1) == made.outer[0].inner[1].val
    for part, inner in (("val", None), ("inner", None), ("test", 0)):
        with pytest.raises(MeshchopError, match="no part"):
            folds.fold_ids(data, 0, part, inner)
    with pytest.raises(MeshchopError, match="inner fold 2 does not exist"):
        folds.fold_ids(data, 0, "val", 2)


def test_cli_interrupted_keeps_the_subjects_done(data, tiny_checkpoint, tmp_path, capsys,
                                                 monkeypatch):
    real = evaluate.evaluate

    def interrupted(*args, **kwargs):
        job = real(*args, **kwargs)
        for event in job:
            yield event
            if isinstance(event, SubjectResult):
                raise KeyboardInterrupt

    monkeypatch.setattr(evaluate, "evaluate", interrupted)
    out = tmp_path / "eval"
    assert cli.main(["evaluate", str(tiny_checkpoint), "--data-dir", str(data),
                     "--outer-fold", "0", "--device", "cpu", "--out", str(out), "-q"]) == 130
    n = len(folds.load(data).outer[0].test)
    assert f"interrupted; 1 of {n} subjects scored, written to {out}" in capsys.readouterr().err
    doc = json.loads((out / "results.json").read_text())
    assert doc["complete"] is False and doc["subjects"] == 1
    assert [r["subject"] for r in doc["records"]] == folds.load(data).outer[0].test[:1]
    assert len(_csv_rows(out / "results.csv")) == 1
