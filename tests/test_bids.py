"""Segmenting a cohort: BIDS derivatives, QC pictures, resuming, failures, sharing.

The dataset is made from the real sample scan averaged to 4 mm (tests/bids_example.py):
sub-01 with two sessions (the second moved and rescaled), sub-02 with two runs (the second
reoriented) and one truncated file. Most tests use hand-made "bright" MeshNets whose
P(lesion) is sigmoid(50 (x - t)) of the min-max scaled intensity x, on a network grid equal
to the images' own (4 mm, 64^3): what they must find is known exactly. One slow test runs
the pretrained MeshNet-26.
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from bids_example import BROKEN, GOOD, SHARPNESS, bright_model
from matplotlib.image import imread
from test_engine import postgres_url  # noqa: F401 - the shared PostgreSQL fixture

from napari_meshchop import events
from napari_meshchop.cli import bids as bids_cli
from napari_meshchop.cohort import derivatives, find, qc, run
from napari_meshchop.errors import Cancelled, InputError, MeshchopError

ROOT = Path(__file__).resolve().parents[1]
VOXEL = 4


def keys_of(paths) -> list[str]:
    return [p.removesuffix(".nii.gz") for p in paths]


def scaled(path: Path) -> np.ndarray:
    """x: the image min-max scaled to [0, 1], in its own voxel order (the oracle)."""
    data = np.asarray(nib.load(path).dataobj, dtype=np.float32)
    return (data - data.min()) / (data.max() - data.min())


def between_levels(path: Path, share: float) -> float:
    """A threshold halfway between two intensity levels: no voxel sits near it."""
    data = np.asarray(nib.load(path).dataobj, dtype=np.float32)
    lo, hi = float(data.min()), float(data.max())
    return (round(lo + share * (hi - lo)) + 0.5 - lo) / (hi - lo)


def components_26(mask: np.ndarray) -> int:
    """Connected components by a plain flood fill over face, edge and corner neighbours."""
    left = {tuple(v) for v in np.argwhere(mask)}
    steps = [(i, j, k) for i in (-1, 0, 1) for j in (-1, 0, 1) for k in (-1, 0, 1)
             if (i, j, k) != (0, 0, 0)]
    count = 0
    while left:
        count += 1
        todo = [left.pop()]
        while todo:
            x, y, z = todo.pop()
            for i, j, k in steps:
                n = (x + i, y + j, z + k)
                if n in left:
                    left.remove(n)
                    todo.append(n)
    return count


def world_voxels(path: Path) -> set:
    """The world positions (mm, rounded) of a mask's voxels: compares grids stored apart."""
    img = nib.load(path)
    points = nib.affines.apply_affine(img.affine, np.argwhere(np.asarray(img.dataobj) > 0))
    return {tuple(p) for p in np.round(points, 3)}


@pytest.fixture(scope="module")
def dataset(real_data, tmp_path_factory) -> Path:
    import bids_example

    return bids_example.build(tmp_path_factory.mktemp("bids") / "ds", VOXEL)


@pytest.fixture(scope="module")
def models(dataset, tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("models")
    source = dataset / GOOD[0]
    t1, t2 = between_levels(source, 0.5), between_levels(source, 0.6)
    return {"t1": t1, "t2": t2, "one": bright_model(folder / "bright1.pt", t1),
            "two": bright_model(folder / "bright2.pt", t2)}


def options(*models, **kw) -> run.Options:
    return run.Options(models=tuple(str(m) for m in models), device="cpu", **kw)


_COHORTS: dict = {}


def participant(dataset, out, opts, **kw) -> tuple[run.CohortResult, list]:
    """The participant level on the whole dataset (indexed by pybids once per module)."""
    if dataset not in _COHORTS:
        _COHORTS[dataset] = find.bids_images(dataset)
    seen = []
    result = events.run(run.participant(_COHORTS[dataset], out, opts, **kw), seen.append)
    return result, seen


def cli(*argv) -> int:
    parser = argparse.ArgumentParser(prog="meshchop")
    bids_cli.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["bids", *(str(a) for a in argv)])
    return args.func(args)


# ---- finding images ----------------------------------------------------------------------------

def test_finds_a_bids_datasets_images_with_their_entities(dataset):
    cohort = find.bids_images(dataset)
    assert cohort.kind == "bids" and cohort.name == "meshchop example"
    assert [i.key for i in cohort.images] == sorted(keys_of([*GOOD, BROKEN]))
    by_key = {i.key: i for i in cohort.images}
    ses2 = by_key["sub-01/ses-2/anat/sub-01_ses-2_T2w"]
    assert (ses2.stem, ses2.folder, ses2.suffix) == ("sub-01_ses-2", "sub-01/ses-2/anat", "T2w")
    assert ses2.source == "bids:raw:sub-01/ses-2/anat/sub-01_ses-2_T2w.nii.gz"
    broken = by_key["sub-02/anat/sub-02_acq-broken_T2w"]
    assert broken.columns() == {"participant_id": "sub-02", "session_id": "",
                                "acquisition": "broken", "reconstruction": "", "run": ""}
    # BIDS-Apps labels, with or without their prefix
    only = find.bids_images(dataset, participants=["sub-02"], suffix="T2w")
    assert {i.entities["sub"] for i in only.images} == {"02"}
    assert [i.key for i in find.bids_images(dataset, ["01"], ["ses-2"]).images] == [ses2.key]
    with pytest.raises(MeshchopError, match="no participant 07 .*has 01, 02"):
        find.bids_images(dataset, ["07"])
    with pytest.raises(MeshchopError, match="no FLAIR images"):
        find.bids_images(dataset, suffix="FLAIR")
    with pytest.raises(InputError, match="not a BIDS dataset"):
        find.bids_images(dataset / "sub-01")


def test_finds_files_and_folders_keeping_their_layout(dataset, tmp_path):
    out = dataset / "sub-02" / "out"  # an output folder inside an input folder is left out
    out.mkdir()
    (out / "old_mask.nii.gz").write_bytes(b"")
    cohort = find.file_images([dataset / "sub-02", dataset / GOOD[0]], exclude=out)
    assert [(i.key, i.folder, i.stem) for i in cohort.images] == [
        ("anat/sub-02_acq-broken_T2w", "anat", "sub-02_acq-broken_T2w"),
        ("anat/sub-02_run-1_T2w", "anat", "sub-02_run-1_T2w"),
        ("anat/sub-02_run-2_T2w", "anat", "sub-02_run-2_T2w"),
        ("sub-01_ses-1_T2w", "", "sub-01_ses-1_T2w")]
    (tmp_path / "anat").mkdir()
    twin = tmp_path / "anat" / "sub-02_run-1_T2w.nii.gz"
    twin.write_bytes((dataset / GOOD[2]).read_bytes())
    with pytest.raises(InputError, match="same name as"):
        find.file_images([dataset / "sub-02", tmp_path])
    with pytest.raises(InputError, match="not a NIfTI file name"):
        find.file_images([dataset / "participants.tsv"])


# ---- the participant and group levels ---------------------------------------------------------

def test_participant_and_group_levels_write_derivatives_that_pybids_reads(dataset, models,
                                                                           tmp_path):
    from bids import BIDSLayout

    out = tmp_path / "derivatives" / "meshchop"
    result, seen = participant(dataset, out, options(models["one"], probability=True))
    done = [e for e in seen if isinstance(e, run.ImageDone)]
    assert [e.done for e in done] == [1, 2, 3, 4, 5] and {e.total for e in done} == {5}
    assert any(isinstance(e, events.Progress) and e.stage == "network" for e in seen)
    assert [r.status for r in result.records].count("done") == 4
    (failed,) = result.failed
    assert failed.image.path.name == Path(BROKEN).name
    assert "truncated or corrupt" in failed.error and str(failed.image.path) in failed.error

    # Every mask: the oracle's voxels, on the source's grid; its sidecar's numbers are its own.
    t = models["t1"]
    for name in GOOD:
        source = dataset / name
        image = next(r.image for r in result.records if r.image.path == source)
        where = derivatives.outputs(image, out)
        mask, img = nib.load(where.mask), nib.load(source)
        assert mask.shape == img.shape and mask.get_data_dtype() == np.uint8
        np.testing.assert_allclose(mask.affine, img.affine, atol=1e-6)
        lesion = np.asarray(mask.dataobj) > 0
        np.testing.assert_array_equal(lesion, scaled(source) > t)
        side = json.loads(where.sidecar.read_text())
        vox_ml = abs(np.linalg.det(img.affine[:3, :3])) / 1000
        assert side["LesionVoxels"] == lesion.sum() > 100
        assert side["LesionVolumeML"] == pytest.approx(lesion.sum() * vox_ml, abs=1e-3)
        assert side["ConnectedComponents"] == components_26(lesion) > 1
        assert side["Sources"] == [f"bids:raw:{name}"] and side["Type"] == "Lesion"
        assert side["Model"] == [{"Name": "bright1.pt",
                                  "Sha256": derivatives.files.sha256_file(models["one"])}]
        assert side["Threshold"] == 0.5 and side["Device"] == "cpu" and side["Seconds"] > 0
        assert side["Preprocessing"]["name"] == "ras-minmax"
        prob = np.asarray(nib.load(where.probseg).dataobj)  # scaled back by scl_slope
        expected = 1 / (1 + np.exp(-SHARPNESS * (scaled(source) - t)))
        np.testing.assert_allclose(prob, expected, atol=1 / 255)
        assert where.mosaic.is_file() and not where.disagreement.exists()
    # The same brain moved, rescaled or stored in another voxel order: the same lesion.
    first = world_voxels(derivatives.outputs(result.records[0].image, out).mask)
    runs = [derivatives.outputs(r.image, out).mask for r in result.records
            if r.image.entities.get("sub") == "02" and r.ok]
    assert [world_voxels(m) for m in runs] == [first, first]
    moved = world_voxels(out / "sub-01/ses-2/anat/sub-01_ses-2_space-orig_desc-lesion_mask.nii.gz")
    assert {(x - 12.0, y, z) for x, y, z in moved} == {(round(x, 3), y, z) for x, y, z in first}

    # pybids reads the folder as a derivatives dataset of the source.
    layout = BIDSLayout(dataset, derivatives=out, validate=False)
    masks = layout.get(scope="napari-meshchop", suffix="mask", desc="lesion", space="orig",
                       extension=".nii.gz")
    assert sorted((m.entities["subject"], m.entities.get("session"), m.entities.get("run"))
                  for m in masks) == [("01", "1", None), ("01", "2", None), ("02", None, 1),
                                      ("02", None, 2)]
    assert masks[0].get_metadata()["Type"] == "Lesion"
    probsegs = layout.get(scope="napari-meshchop", suffix="probseg", label="lesion",
                          extension=".nii.gz")
    assert len(probsegs) == 4
    description = json.loads((out / "dataset_description.json").read_text())
    assert description["DatasetType"] == "derivative"
    (generated,) = description["GeneratedBy"]
    assert generated["Name"] == "napari-meshchop" and generated["Version"]
    assert generated["Models"] == side["Model"]
    assert description["SourceDatasets"][0]["DOI"].startswith("doi:")

    # The group level: the table, its dictionary, the plot and one page with every mosaic.
    assert cli(dataset, out, "group") == 0
    rows = derivatives.read_table(out / "lesions.tsv")
    assert [r["source"] for r in rows] == sorted(keys_of([*GOOD, BROKEN]))
    by_source = {r["source"]: r for r in rows}
    broken = by_source[BROKEN.removesuffix(".nii.gz")]
    assert broken["status"] == "failed" and "truncated" in broken["error"]
    assert broken["lesion_volume_ml"] is None and broken["acquisition"] == "broken"
    for record in result.records:
        if record.ok:
            row = by_source[record.image.key]
            side = json.loads(derivatives.outputs(record.image, out).sidecar.read_text())
            assert float(row["lesion_volume_ml"]) == pytest.approx(side["LesionVolumeML"])
            assert int(row["components"]) == side["ConnectedComponents"]
            assert row["status"] == "done" and row["model"] == "bright1.pt"
            assert (out / row["mask"]).is_file()
    dictionary = json.loads((out / "lesions.json").read_text())
    assert set(dictionary) == set(rows[0]) and dictionary["lesion_volume_ml"]["Units"] == "mL"
    page = (out / "report.html").read_text()
    for record in result.records:
        picture = derivatives.outputs(record.image, out).mosaic.relative_to(out).as_posix()
        assert (f"src='{picture}'" in page) == record.ok
    assert "truncated or corrupt" in page
    assert (out / "figures" / "lesion_volumes.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_rerun_reuses_what_is_done_and_redoes_what_changed(dataset, models, tmp_path,
                                                             monkeypatch):
    out = tmp_path / "out"
    first, _ = participant(dataset, out, options(models["one"]))
    masks = {r.image.key: derivatives.outputs(r.image, out) for r in first.records if r.ok}
    stamps = {k: (w.mask.stat().st_mtime_ns, w.sidecar.stat().st_mtime_ns)
              for k, w in masks.items()}

    def no_network(*args, **kwargs):
        raise AssertionError("the network ran for an image that was done")

    with monkeypatch.context() as m:
        m.setattr(run.Segmenter, "predict", no_network)
        again, _ = participant(dataset, out, options(models["one"]))
    assert {r.image.key for r in again.records if r.reused} == set(masks)
    assert sorted((r.image.key, r.status) for r in again.records) == sorted(
        (r.image.key, r.status) for r in first.records)
    assert {k: (w.mask.stat().st_mtime_ns, w.sidecar.stat().st_mtime_ns)
            for k, w in masks.items()} == stamps
    # The failed image is tried again (its file may have been mended), and fails again.
    assert [r.image.key for r in again.records if not r.reused] == [
        BROKEN.removesuffix(".nii.gz")]

    # Another threshold: every image is done again, with its new mask and sidecar.
    raised, _ = participant(dataset, out, options(models["one"], threshold=0.9))
    assert not any(r.reused for r in raised.records)
    source = dataset / GOOD[0]
    expected = 1 / (1 + np.exp(-SHARPNESS * (scaled(source) - models["t1"]))) > 0.9
    where = masks[GOOD[0].removesuffix(".nii.gz")]
    np.testing.assert_array_equal(np.asarray(nib.load(where.mask).dataobj) > 0, expected)
    assert json.loads(where.sidecar.read_text())["Threshold"] == 0.9
    # Another model: done again too.
    other, _ = participant(dataset, out, options(models["two"], threshold=0.9))
    assert not any(r.reused for r in other.records)
    assert json.loads(where.sidecar.read_text())["Model"][0]["Name"] == "bright2.pt"


def test_an_ensemble_writes_its_mean_its_spread_and_where_its_models_disagree(
        dataset, models, tmp_path):
    out = tmp_path / "out"
    result, _ = participant(dataset, out, options(models["one"], models["two"],
                                                  probability=True),
                            )
    record = next(r for r in result.records if r.image.path == dataset / GOOD[2])
    where = derivatives.outputs(record.image, out)
    x = scaled(dataset / GOOD[2])
    p1 = 1 / (1 + np.exp(-SHARPNESS * (x - models["t1"])))
    p2 = 1 / (1 + np.exp(-SHARPNESS * (x - models["t2"])))
    np.testing.assert_allclose(np.asarray(nib.load(where.probseg).dataobj), (p1 + p2) / 2,
                               atol=1 / 255)
    np.testing.assert_allclose(np.asarray(nib.load(where.disagreement).dataobj),
                               np.abs(p1 - p2) / 2, atol=1 / 255)
    np.testing.assert_array_equal(np.asarray(nib.load(where.mask).dataobj) > 0,
                                  (p1 + p2) / 2 > 0.5)
    disagree = (x > models["t1"]) & ~(x > models["t2"])
    vox_ml = abs(np.linalg.det(nib.load(where.mask).affine[:3, :3])) / 1000
    side = json.loads(where.sidecar.read_text())
    assert side["DisagreementVolumeML"] == pytest.approx(disagree.sum() * vox_ml, abs=1e-3)
    assert disagree.sum() > 50 and [m["Name"] for m in side["Model"]] == ["bright1.pt",
                                                                          "bright2.pt"]
    assert record.model == "bright1.pt + bright2.pt"
    assert json.loads(where.disagreement.with_name(
        where.disagreement.name.replace(".nii.gz", ".json")).read_text())["Sources"]


def test_unusable_images_are_recorded_and_the_others_go_on(dataset, models, tmp_path):
    folder = tmp_path / "scans"
    folder.mkdir()
    good = nib.load(dataset / GOOD[0])
    nib.save(good, folder / "good.nii.gz")
    whole = (folder / "good.nii.gz").read_bytes()
    (folder / "truncated.nii.gz").write_bytes(whole[: len(whole) // 3])
    nib.save(nib.Nifti1Image(np.stack([good.get_fdata()] * 3, axis=-1), good.affine),
             folder / "four_d.nii.gz")
    (folder / "not_nifti.nii.gz").write_bytes(gzip.compress(b"patient,volume\n1,2\n"))
    nib.save(nib.Nifti1Image(np.full(good.shape, 7, np.uint8), good.affine),
             folder / "blank.nii")
    out = tmp_path / "out"
    code = bids_cli.cmd_segment_many(argparse.Namespace(
        input=[str(folder)], output=str(out), model=[str(models["one"])], device="cpu",
        threshold=0.5, save_probability=False, quiet=True))
    assert code == 1
    rows = {r["source"]: r for r in derivatives.read_table(out / "lesions.tsv")}
    assert rows["good"]["status"] == "done"
    np.testing.assert_array_equal(
        np.asarray(nib.load(out / rows["good"]["mask"]).dataobj) > 0,
        scaled(folder / "good.nii.gz") > models["t1"])
    problems = {"truncated": "truncated or corrupt", "four_d": "has 3 volumes",
                "not_nifti": "not a readable NIfTI", "blank": "is blank"}
    for name, problem in problems.items():
        assert rows[name]["status"] == "failed", name
        assert problem in rows[name]["error"] and name in rows[name]["error"]
        assert not (out / f"{name}_space-orig_desc-lesion_mask.nii.gz").exists()
    assert "is blank" in (out / "report.html").read_text()


def test_a_stop_keeps_finished_images_and_a_rerun_goes_on(dataset, models, tmp_path):
    out = tmp_path / "out"
    stop = {"now": False}
    finished = []

    def on_event(event):
        if isinstance(event, run.ImageDone):
            finished.append(event.record)
            stop["now"] = True  # stop during the next image's network pass

    job = run.participant(find.bids_images(dataset), out, options(models["one"]),
                          stop=lambda: stop["now"])
    with pytest.raises(Cancelled):
        events.run(job, on_event)
    assert 1 <= len(finished) < 5
    for record in finished:
        if record.ok:
            assert derivatives.done_sidecar(record.image, out, run.Segmenter(
                options(models["one"])).settings)
    again, _ = participant(dataset, out, options(models["one"]))
    reused = {r.image.key for r in again.records if r.reused}
    assert {r.image.key for r in finished if r.ok} <= reused
    assert len([r for r in again.records if r.ok]) == 4


KILLED_WORKER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from napari_meshchop import events
    from napari_meshchop.cohort import find, qc, run

    dataset, out, model, flag = sys.argv[1:5]
    draw = qc.mosaic

    def slow_mosaic(*args, **kwargs):  # the mask is written by now; the sidecar is not
        Path(flag).touch()
        time.sleep(120)
        return draw(*args, **kwargs)

    qc.mosaic = slow_mosaic
    events.run(run.participant(find.bids_images(dataset, ["02"]), out,
                               run.Options((model,), "cpu", probability=True)))
""")


def test_a_run_killed_mid_image_leaves_no_image_that_looks_done(dataset, models, tmp_path):
    out, flag = tmp_path / "out", tmp_path / "writing"
    worker = subprocess.Popen([sys.executable, "-c", KILLED_WORKER, str(dataset), str(out),
                               str(models["one"]), str(flag)], stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not flag.exists():
        assert worker.poll() is None, worker.stderr.read().decode()[-2000:]
        assert time.monotonic() < deadline
        time.sleep(0.05)
    worker.send_signal(signal.SIGKILL)
    worker.wait()
    worker.stderr.close()
    cohort = find.bids_images(dataset, ["02"])
    settings = run.Segmenter(options(models["one"], probability=True)).settings
    killed = [i for i in cohort.images if derivatives.outputs(i, out).mask.exists()
              and not derivatives.outputs(i, out).sidecar.exists()]
    assert len(killed) == 1  # its mask and probseg are whole files, but it is not done
    for image in cohort.images:
        assert derivatives.done_sidecar(image, out, settings) is None
        for path in derivatives.outputs(image, out).images():
            if path.exists():
                assert np.asarray(nib.load(path).dataobj).shape == nib.load(image.path).shape
    again, _ = participant(dataset, out, options(models["one"], probability=True),)
    assert again.records  # the whole dataset this time
    redone = next(r for r in again.records if r.image.key == killed[0].key)
    assert redone.ok and not redone.reused
    assert not list(out.rglob("*.part"))


SHARED_WORKER = textwrap.dedent("""
    import os, sys, time
    from pathlib import Path
    from napari_meshchop.cli import bids
    from napari_meshchop.cohort import run

    dataset, out, storage, study, model, log, slow = sys.argv[1:8]
    log = Path(log)

    def noted(function):
        def wrapper(*args, **kwargs):
            record = function(*args, **kwargs)
            with open(log / "recorded", "a") as fh:  # one line per image written or failed
                fh.write(f"{record.image.key} {os.getpid()}\\n")
            return record
        return wrapper

    run.write, run.fail = noted(run.write), noted(run.fail)
    read, calls = run.load, []

    def load(image, segmenter):
        calls.append(image.key)
        if slow == "1" and len(calls) == 2:  # this worker dies in its second image
            (log / "second").write_text(image.key)
            time.sleep(300)
        return read(image, segmenter)

    run.load = load
    import argparse
    parser = argparse.ArgumentParser()
    bids.register(parser.add_subparsers())
    args = parser.parse_args(["bids", dataset, out, "participant", "--model", model,
                              "--device", "cpu", "--storage", storage, "--study", study,
                              "--heartbeat", "1", "--grace", "3", "-q"])
    sys.exit(args.func(args))
""")


def test_two_workers_share_a_cohort_and_one_killed_every_image_is_written_once(
        dataset, models, tmp_path, postgres_url):  # noqa: F811 - the imported fixture
    out, log = tmp_path / "out", tmp_path / "log"
    log.mkdir()
    study = f"test-cohort-{uuid.uuid4().hex[:8]}"

    def worker(slow: bool):
        return subprocess.Popen(
            [sys.executable, "-c", SHARED_WORKER, str(dataset), str(out), postgres_url, study,
             str(models["one"]), str(log), "1" if slow else "0"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env={**os.environ, "OMP_NUM_THREADS": "1"})

    first = worker(slow=True)
    deadline = time.monotonic() + 120
    while not (log / "second").exists():
        assert first.poll() is None, first.communicate()[1][-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.05)
    second = worker(slow=False)
    first.send_signal(signal.SIGKILL)
    first.communicate()
    _, err_text = second.communicate(timeout=180)
    recorded = [line.split() for line in (log / "recorded").read_text().splitlines()]
    broken_by_second = [BROKEN.removesuffix(".nii.gz"), str(second.pid)] in recorded
    assert second.returncode == (1 if broken_by_second else 0), err_text[-3000:]
    keys = sorted(key for key, _ in recorded)
    assert keys == sorted(keys_of([*GOOD, BROKEN]))  # each exactly once
    pids = {pid for _, pid in recorded}
    assert pids == {str(first.pid), str(second.pid)}
    taken_over = (log / "second").read_text()
    assert [pid for key, pid in recorded if key == taken_over] == [str(second.pid)]
    assert "again: trial" in err_text  # the dead worker's image, claimed again
    cohort = find.bids_images(dataset)
    for image in cohort.images:
        record = derivatives.existing_record(image, out)
        assert record.status == ("failed" if image.path.name in BROKEN else "done")


# ---- pictures --------------------------------------------------------------------------------

def red_pixels(png: bytes) -> int:
    pixels = imread(io.BytesIO(png))
    return int(((pixels[..., 0] > 0.9) & (pixels[..., 1] < 0.3) & (pixels[..., 2] < 0.3)).sum())


def test_the_mosaic_outlines_the_lesion_in_red_on_axial_slices(dataset):
    img = nib.load(dataset / GOOD[3])  # PSR voxel order: the slices are still axial
    data = np.asarray(img.dataobj, dtype=np.float32)
    lesion = np.zeros(img.shape, dtype=np.uint8)
    centre = np.array(img.shape) // 2
    lesion[tuple(slice(c - 3, c + 3) for c in centre)] = 1
    assert red_pixels(qc.mosaic(data, img.affine, lesion, "a cube")) > 50
    # In RAS order the cube spans 6 axial slices: each is shown, once.
    ornt = nib.orientations.io_orientation(img.affine)
    ras = nib.orientations.apply_orientation(lesion, ornt) > 0
    assert qc.axial_slices(ras, ras, 12) == list(range(29, 35))
    assert red_pixels(qc.mosaic(data, img.affine, np.zeros_like(lesion), "none")) == 0


# ---- the command line ------------------------------------------------------------------------

def test_meshchop_bids_prints_a_line_per_image_and_says_when_some_failed(
        dataset, models, tmp_path, capsys):
    out = tmp_path / "out"
    assert cli(dataset, out, "participant", "--participant-label", "01", "--model",
               models["one"], "--device", "cpu", "-q") == 0
    printed = capsys.readouterr()  # a line per image on stderr (with the bars), the end on stdout
    assert sum(" mL " in line for line in printed.err.splitlines()) == 2
    assert printed.out.splitlines() == [
        "2 images: 2 segmented", f"next: meshchop bids {dataset} {out} group"]
    assert cli(dataset, out, "participant", "--model", models["one"], "--device", "cpu",
               "-q") == 1
    printed = capsys.readouterr()
    assert printed.err.count("(done earlier)") == 2 and "failed: " in printed.err
    assert printed.out.startswith("5 images: 4 segmented (2 earlier), 1 failed")
    with pytest.raises(MeshchopError, match="no participant 07"):
        cli(dataset, out, "participant", "--participant-label", "07", "-q")
    with pytest.raises(InputError, match="run the participant level first"):
        cli(dataset, tmp_path / "nothing", "group")


@pytest.mark.slow
def test_the_pretrained_model_finds_the_left_hemisphere_stroke_in_every_copy(tmp_path,
                                                                             real_data):
    """The pretrained MeshNet-26 on a 2 mm grid (tests/bids_example.py), participant and
    group levels through the command line, on sub-02: the scan and its reoriented copy."""
    import bids_example

    dataset = bids_example.build(tmp_path / "ds", voxel=2)
    model = bids_example.coarse_model(tmp_path / "meshnet26-2mm.pt")
    out = tmp_path / "out"
    assert cli(dataset, out, "participant", "--participant-label", "02", "--model", model,
               "--device", "cpu", "-q") == 1  # the truncated file
    assert cli(dataset, out, "group", "--participant-label", "02") == 0
    rows = {r["source"]: r for r in derivatives.read_table(out / "lesions.tsv")}
    assert len(rows) == 3
    volumes = []
    for name in GOOD[2:]:
        row = rows[name.removesuffix(".nii.gz")]
        assert row["status"] == "done"
        scan = nib.load(dataset / name)
        mask = nib.load(out / row["mask"])
        lesion = np.asarray(mask.dataobj) > 0
        head = np.asarray(scan.dataobj) > 0.08 * np.asarray(scan.dataobj).max()
        centre = lambda m: nib.affines.apply_affine(scan.affine, np.argwhere(m).mean(0))  # noqa
        assert centre(lesion)[0] < centre(head)[0] - 15  # RAS: the patient's left
        assert (lesion & head).sum() / lesion.sum() > 0.95
        volumes.append(float(row["lesion_volume_ml"]))
    assert 30 < volumes[0] < 150
    assert volumes[1] == pytest.approx(volumes[0], rel=0.02)
