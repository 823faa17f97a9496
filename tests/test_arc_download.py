"""ARC download on a local replica of the hub dataset: cohort, run matching, resume, stop."""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import subprocess
import sys
import threading
from pathlib import Path

import arc_replica
import numpy as np
import pytest

from napari_meshchop import cli, events, files
from napari_meshchop.data import arc, manifest
from napari_meshchop.errors import Cancelled, InputError, MeshchopError

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def replica(tmp_path_factory) -> Path:
    return arc_replica.build(tmp_path_factory.mktemp("arc-replica"))


@pytest.fixture(scope="module")
def downloaded(replica, tmp_path_factory):
    data = tmp_path_factory.mktemp("arc-data")
    return events.run(arc.download(data, source=replica)), data


def replica_blob(subject: str, name: str) -> bytes:
    """The bytes a replica row holds for the NIfTI called ``name``."""
    for row in arc_replica.rows():
        if row["subject_id"] == subject:
            for value in [*row["t2w"], row["lesion"]]:
                if value is not None and value["path"] == name:
                    return value["bytes"]
    raise KeyError(name)


def test_cohort_counts_and_why_sessions_were_left_out(downloaded):
    result, data = downloaded
    m = manifest.load(data)
    assert result.rows == arc_replica.EXPECTED["rows"]
    assert m.by_acquisition() == arc_replica.EXPECTED["pairs"]
    assert m.excluded_by_reason() == arc_replica.EXPECTED["excluded"]
    assert {e.id for e in m.excluded if e.reason == "tse"} == {"sub-M2002_ses-1441"}
    assert {e.id for e in m.excluded if e.reason == "no-lesion"} == {"sub-M2003_ses-2000",
                                                                      "sub-M2004_ses-10"}
    assert m.complete and result.downloaded == 4 and result.verified == 0
    text = "\n".join(result.summary())
    assert "Cohort: 4 image/mask pairs (space_2x 2, space_no_accel 2)" in text
    assert "the paper used 224 (115 + 109)" in text
    assert "2 no lesion mask, 1 turbo spin echo" in text
    assert "sub-M2002 ses-1441: turbo spin echo" in text


def test_two_run_session_takes_the_run_the_mask_was_drawn_on(downloaded):
    _, data = downloaded
    pair = manifest.load(data).pair("sub-M2105_ses-964")
    assert pair.run == "11" and pair.image.endswith("_acq-spc3_run-11_T2w.nii.gz")
    assert pair.matched_by == "file name; run 11 of runs 6, 11"
    assert pair.orientation == "PSR"  # the non-RAS image keeps its native grid
    run11 = replica_blob("sub-M2105", "sub-M2105_ses-964_acq-spc3_run-11_T2w.nii.gz")
    assert (data / pair.image).read_bytes() == run11
    assert not list((data / "sub-M2105").rglob("*run-6*"))


def test_match_run_by_name_run_entity_or_single_run():
    t2w = ["sub-A_ses-1_acq-spc3_run-6_T2w.nii.gz", "sub-A_ses-1_acq-spc3_run-11_T2w.nii.gz"]
    assert arc.match_run(t2w, "sub-A_ses-1_acq-spc3_run-11_T2w_desc-lesion_mask.nii.gz")[0] == 1
    index, how = arc.match_run(t2w, "lesion_run-6_mask.nii.gz")
    assert index == 0 and how.startswith("run entity")
    assert arc.match_run(t2w[:1], "mask.nii.gz") == (0, "the only T2w run")
    assert arc.match_run(t2w, "mask.nii.gz") == (None, "")


def test_unhelpful_names_fall_back_to_the_grid_or_are_left_out():
    run6, _ = arc_replica.pair("sub-A", "ses-1", "spc3", 6, seed=1)
    run11, mask = arc_replica.pair("sub-A", "ses-1", "spc3", 11, seed=2, orientation="PSR")
    row = {"subject_id": "sub-A", "session_id": "ses-1", "t2w": [run6, run11],
           "lesion": {"bytes": mask["bytes"], "path": "lesion.nii.gz"}}  # names tell nothing
    image, _, pair = arc.build_pair(row, "space_no_accel")
    assert pair.run == "11" and pair.matched_by == "the only run on the mask's grid"
    assert image.data == run11["bytes"]
    run11_ras, _ = arc_replica.pair("sub-A", "ses-1", "spc3", 11, seed=2)
    row["t2w"] = [run6, run11_ras]  # both runs on one grid, the mask on another
    with pytest.raises(arc.Skip) as skip:
        arc.build_pair(row, "space_no_accel")
    assert skip.value.reason == "no-run" and "0 on the mask's grid" in skip.value.detail
    row["t2w"] = [run11]
    row["lesion"] = arc_replica.nifti("m.nii.gz", np.zeros(arc_replica.SHAPE, np.uint8),
                                      arc_replica.affine("PSR"))
    with pytest.raises(arc.Skip) as skip:
        arc.build_pair(row, "space_no_accel")
    assert skip.value.reason == "empty-mask"


def test_mask_with_an_odd_scl_slope_keeps_its_lesion(downloaded):
    _, data = downloaded
    pair = manifest.load(data).pair("sub-M2269_ses-767")
    import nibabel as nib

    mask = nib.load(data / pair.mask)
    assert mask.dataobj.slope == pytest.approx(1 / 255)  # stored 1, scaled to 0.0039
    expected = int(arc_replica.lesion_of(arc_replica.SHAPE, (8, 6, 5), 2.0).sum())
    assert pair.lesion_voxels == expected > 0
    assert pair.lesion_ml == pytest.approx(expected * 1.0 * 1.1 * 1.2 / 1000, rel=1e-4)


def test_manifest_records_files_and_checksums(downloaded):
    _, data = downloaded
    m = manifest.load(data)
    assert m.repo.endswith("arc-replica0") and m.revision is None
    for pair in m.pairs:
        for rel, digest, size in ((pair.image, pair.image_sha256, pair.image_bytes),
                                  (pair.mask, pair.mask_sha256, pair.mask_bytes)):
            blob = (data / rel).read_bytes()
            assert hashlib.sha256(blob).hexdigest() == digest and len(blob) == size
            received = replica_blob(pair.subject, Path(rel).name)
            if received[:2] == b"\x1f\x8b":
                assert blob == received  # written as received
            else:  # plain bytes under a .nii.gz name: gzipped, so that the name is true
                assert pair.id == "sub-M2005_ses-4334" and rel == pair.image
                assert blob[:2] == b"\x1f\x8b" and gzip.decompress(blob) == received
        assert manifest.verify(pair, data) is None
        assert pair.shape == arc_replica.SHAPE and pair.voxel_mm == pytest.approx((1, 1.1, 1.2))
    assert manifest.load(data / "manifest.json").pairs == m.pairs  # also by file name


def test_every_file_is_readable_by_its_name_and_as_training_reads_it(downloaded):
    """sub-M2005's T2w came as plain bytes under a .nii.gz name (as ``datasets`` stores a
    nibabel image); on disk it is gzipped, and it reads by its name, voxel for voxel what
    the hub held, through the readers that training, evaluation and segmentation use."""
    import nibabel as nib

    from napari_meshchop.data import cache
    from napari_meshchop.imaging import nifti
    from napari_meshchop.imaging.preprocess import PreprocessSpec

    _, data = downloaded
    m = manifest.load(data)
    pair = m.pair("sub-M2005_ses-4334")
    received = replica_blob("sub-M2005", Path(pair.image).name)
    assert received[:2] != b"\x1f\x8b" and pair.image.endswith(".nii.gz")  # the hub's
    hub = nib.Nifti1Image.from_bytes(received)
    on_disk = nifti.load_volume(data / pair.image)
    np.testing.assert_array_equal(on_disk.get_fdata(), np.asarray(hub.dataobj))
    np.testing.assert_array_equal(on_disk.affine, hub.affine)
    for p in m.pairs:  # every file, as the cache reads it
        cache.prepare_pair(p, data, PreprocessSpec("ras-minmax", shape=(16, 16, 16)))
        assert arc.read_back(p, data) is None


def test_bytes_are_written_as_the_file_name_says_whatever_they_came_as():
    image, mask = arc_replica.pair("sub-X", "ses-1", "spc3", 1, seed=0, plain_image=True)
    plain = image["bytes"]
    row = {"subject_id": "sub-X", "session_id": "ses-1", "t2w": [image], "lesion": mask}
    blob, _, pair = arc.build_pair(row, "space_no_accel")
    assert blob.name.endswith(".nii.gz") and gzip.decompress(blob.data) == plain
    assert pair.image_sha256 == hashlib.sha256(blob.data).hexdigest()
    assert pair.image_bytes == len(blob.data)
    # gzipped bytes under a .nii name are unpacked
    row["t2w"] = [{"bytes": gzip.compress(plain), "path": "sub-X_ses-1_acq-spc3_run-1_T2w.nii"}]
    blob, mask_blob, _ = arc.build_pair(row, "space_no_accel")
    assert blob.name.endswith("_T2w.nii") and blob.data == plain
    assert mask_blob.data == mask["bytes"]  # gzipped under .nii.gz: as received


def test_a_pair_that_training_could_not_read_is_left_out(tmp_path, monkeypatch):
    """The header and the whole stream check out, but training would refuse the image (a
    blank volume): the download reads each written file back as training reads it."""
    image, mask = arc_replica.pair("sub-X", "ses-1", "spc3", 1, seed=0)
    blank = arc_replica.nifti(image["path"], np.zeros(arc_replica.SHAPE, np.int16),
                              arc_replica.affine())
    row = {"subject_id": "sub-X", "session_id": "ses-1", "t2w_acquisition": "space_no_accel",
           "t2w": [blank], "lesion": mask}
    monkeypatch.setattr(arc, "open_rows", lambda *a, **k: arc.Rows(iter([row]), 1))
    result = events.run(arc.download(tmp_path, source="unused", folds=False))
    assert result.manifest.pairs == [] and result.downloaded == 0
    (left_out,) = result.manifest.excluded
    assert left_out.reason == "unreadable"
    assert left_out.detail == (f"{tmp_path / 'sub-X' / 'ses-1' / image['path']}: is blank: "
                               "every voxel is 0")
    assert not any(tmp_path.rglob("*.nii*"))  # nothing left that a later run could take


def test_a_file_an_older_download_kept_under_a_wrong_name_is_fetched_again(replica, tmp_path):
    events.run(arc.download(tmp_path, source=replica, folds=False))
    m = manifest.load(tmp_path)
    pair = m.pair("sub-M2005_ses-4334")
    plain = replica_blob("sub-M2005", Path(pair.image).name)
    (tmp_path / pair.image).write_bytes(plain)  # as an older version wrote it
    old = dataclasses.replace(pair, image_sha256=hashlib.sha256(plain).hexdigest(),
                              image_bytes=len(plain))
    m.pairs = [old if p.id == pair.id else p for p in m.pairs]
    m.save(tmp_path)
    assert manifest.verify(old, tmp_path) == (f"{pair.image} is not gzipped but its name "
                                              "ends in .gz")
    result = events.run(arc.download(tmp_path, source=replica, folds=False))
    assert (result.downloaded, result.verified) == (1, 3)
    assert manifest.load(tmp_path).pair(pair.id) == pair
    assert (tmp_path / pair.image).read_bytes()[:2] == b"\x1f\x8b"


def test_shape_or_affine_mismatch_is_reported_clearly(tmp_path):
    source = arc_replica.build(tmp_path / "replica", mismatch=True)
    result = events.run(arc.download(tmp_path / "data", source=source, folds=False))
    (bad,) = [e for e in result.manifest.excluded if e.reason == "geometry"]
    assert bad.id == "sub-M2010_ses-50"
    assert "mask shape (14, 12, 9) vs T2w shape (14, 12, 10)" in bad.detail
    assert "sub-M2010 ses-50: lesion mask and T2w differ in shape or affine (mask shape " \
        in "\n".join(result.summary())
    assert not (tmp_path / "data" / "sub-M2010").exists()
    assert len(result.manifest.pairs) == 4 and result.manifest.complete


def test_truncated_or_corrupt_nifti_is_excluded_with_its_name():
    image, mask = arc_replica.pair("sub-X", "ses-1", "spc3", 1, seed=0)
    row = {"subject_id": "sub-X", "session_id": "ses-1", "lesion": mask,
           "t2w": [{"bytes": image["bytes"][: len(image["bytes"]) // 2], "path": image["path"]}]}
    with pytest.raises(arc.Skip) as skip:
        arc.build_pair(row, "space_no_accel")
    assert skip.value.reason == "unreadable" and "T2w sub-X_ses-1_acq-spc3_run-1_T2w" \
        in skip.value.detail
    raw = gzip.decompress(image["bytes"])
    row["t2w"] = [{"bytes": gzip.compress(raw[:-200]), "path": image["path"]}]
    with pytest.raises(arc.Skip, match="truncated"):
        arc.build_pair(row, "space_no_accel")


def test_second_run_verifies_and_fetches_nothing(downloaded, replica, monkeypatch):
    _, data = downloaded
    stamps = {p: p.stat().st_mtime_ns for p in data.rglob("*.nii.gz")}
    opened = []
    real = arc.open_rows
    monkeypatch.setattr(arc, "open_rows", lambda columns, *a, **k: opened.append(columns)
                        or real(columns, *a, **k))
    result = events.run(arc.download(data, source=replica))
    assert (result.downloaded, result.verified, result.nbytes) == (0, 4, 0)
    assert opened == [arc.SCAN_COLUMNS]  # the T2w column was never opened
    assert {p: p.stat().st_mtime_ns for p in data.rglob("*.nii.gz")} == stamps


def test_fetch_reads_only_the_needed_columns_and_rows(replica, tmp_path, monkeypatch):
    import datasets

    calls = []
    real = datasets.load_dataset
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: calls.append(k) or real(*a, **k))
    events.run(arc.download(tmp_path, source=replica, folds=False))
    scan, fetch = calls
    assert scan["streaming"] and scan["columns"] == arc.SCAN_COLUMNS and scan["filters"] is None
    assert "t2w" not in scan["columns"] and "t1w" not in fetch["columns"]
    # the fetch asks the parquet reader for exactly the chosen sessions
    assert sorted(tuple(v for _, _, v in clause) for clause in fetch["filters"]) == [
        ("sub-M2001", "ses-1253"), ("sub-M2005", "ses-4334"), ("sub-M2105", "ses-964"),
        ("sub-M2269", "ses-767")]
    # from the hub: same columns, the revision asked for, and little fsspec read-ahead
    calls.clear()
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: calls.append((a, k)) or [])
    with pytest.raises(MeshchopError):  # the stub has no columns
        arc.open_rows(arc.SCAN_COLUMNS, revision="0123abc")
    ((args, kwargs),) = calls
    assert args == (arc.REPO,) and kwargs["revision"] == "0123abc" and kwargs["streaming"]
    assert kwargs["storage_options"] == {"hf": {"block_size": arc.READ_AHEAD}}
    monkeypatch.setattr(datasets, "load_dataset", real)
    rows = list(arc.open_rows(arc.FETCH_COLUMNS, source=replica,
                              keys={("sub-M2005", "ses-4334")}))
    assert [r["subject_id"] for r in rows] == ["sub-M2005"]
    assert set(rows[0]) == set(arc.FETCH_COLUMNS)
    assert isinstance(rows[0]["t2w"][0]["bytes"], bytes)  # not decoded


def test_in_memory_and_saved_to_disk_sources_give_the_same_pairs(downloaded, tmp_path):
    from datasets import Dataset

    _, data = downloaded
    expected = {(p.id, p.image_sha256, p.mask_sha256) for p in manifest.load(data).pairs}
    in_memory = Dataset.from_list(arc_replica.rows(), features=arc_replica.features())
    saved = arc_replica.build(tmp_path / "saved", layout="disk")
    for i, source in enumerate([in_memory, saved]):
        result = events.run(arc.download(tmp_path / f"d{i}", source=source, folds=False))
        assert {(p.id, p.image_sha256, p.mask_sha256) for p in result.manifest.pairs} == expected


def test_damaged_file_in_place_is_fetched_again(replica, tmp_path):
    events.run(arc.download(tmp_path, source=replica, folds=False))
    pair = manifest.load(tmp_path).pair("sub-M2005_ses-4334")
    target = tmp_path / pair.image
    target.write_bytes(target.read_bytes()[:100])  # truncated where a good file should be
    assert "has 100 bytes" in manifest.verify(pair, tmp_path)
    result = events.run(arc.download(tmp_path, source=replica, folds=False))
    assert (result.downloaded, result.verified) == (1, 3)
    assert manifest.verify(pair, tmp_path) is None


def test_stop_flag_leaves_complete_files_and_resume_finishes(replica, tmp_path):
    stop = threading.Event()
    job = arc.download(tmp_path, source=replica, stop=stop)
    with pytest.raises(Cancelled):
        for event in job:
            if isinstance(event, events.DownloadProgress) and event.done == 1:
                stop.set()
    m = manifest.load(tmp_path)
    assert len(m.pairs) == 1 and len(m.pending) == 3 and not m.complete
    assert manifest.verify(m.pairs[0], tmp_path) is None
    assert len(list(tmp_path.rglob("*.nii.gz"))) == 2
    with pytest.raises(MeshchopError, match="3 of 4 pairs missing"):
        manifest.load_complete(tmp_path)
    result = events.run(arc.download(tmp_path, source=replica))
    assert (result.downloaded, result.verified) == (3, 1) and result.manifest.complete


KILLER = """
import os, signal, sys
from napari_meshchop import cli
from napari_meshchop import files
real, calls = files.write_bytes, []
def dying_write(path, data):
    if str(path).endswith(".nii.gz"):
        calls.append(path)
    if len(calls) == 3 and calls[-1] == path:  # the 2nd pair's image: die half-way through
        with files.atomic_file(path) as fh:
            fh.write(data[: len(data) // 2])
            fh.flush()
            os.kill(os.getpid(), signal.SIGKILL)
    return real(path, data)
files.write_bytes = dying_write
cli.main(["download", "--repo", sys.argv[1], "--data-dir", sys.argv[2], "-q"])
"""


def test_download_killed_mid_file_is_never_taken_as_good(replica, tmp_path):
    data = tmp_path / "data"
    proc = subprocess.run([sys.executable, "-c", KILLER, str(replica), str(data)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]
    partial = list(data.rglob(f".*{files.PART_SUFFIX}"))
    assert len(partial) == 1 and "sub-M2005" in str(partial[0])  # the half-written file
    m = manifest.load(data)
    assert [p.id for p in m.pairs] == ["sub-M2001_ses-1253"] and len(m.pending) == 3
    assert not any(data.rglob("sub-M2005_*"))  # nothing under the final name
    result = events.run(arc.download(data, source=replica, folds=False))
    assert (result.swept, result.verified, result.downloaded) == (1, 1, 3)
    assert not list(data.rglob(f".*{files.PART_SUFFIX}"))
    assert all(manifest.verify(p, data) is None for p in result.manifest.pairs)


def test_a_second_download_into_the_same_folder_is_refused(replica, tmp_path):
    with files.exclusive(tmp_path, "download"):
        with pytest.raises(MeshchopError, match="another download is writing here"):
            events.run(arc.download(tmp_path, source=replica))


def test_cli_download_and_folds(replica, tmp_path, capsys):
    data = tmp_path / "arc"
    assert cli.main(["download", "--repo", str(replica), "--data-dir", str(data), "-q"]) == 0
    out = capsys.readouterr().out
    assert "Cohort: 4 image/mask pairs" in out and "No folds written" in out
    assert cli.main(["folds", "--data-dir", str(data), "--outer-folds", "2",
                     "--inner-folds", "2", "--seed", "7"]) == 0
    out = capsys.readouterr().out
    assert "2 outer x 2 inner folds, seed 7" in out and (data / "folds.json").is_file()


def test_cli_reports_a_missing_local_copy_and_an_unreachable_repo(tmp_path, capsys,
                                                                  monkeypatch):
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)  # even if imported earlier
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    assert cli.main(["download", "--repo", str(tmp_path / "nope"), "--data-dir",
                     str(tmp_path / "d"), "-q"]) == 2
    assert "nope: no such folder" in capsys.readouterr().err
    assert cli.main(["download", "--repo", "someone/not-arc", "--data-dir",
                     str(tmp_path / "d"), "-q"]) == 2
    err = capsys.readouterr().err
    assert "could not open someone/not-arc" in err and "network" in err
    with pytest.raises(InputError):
        list(arc.open_rows(arc.SCAN_COLUMNS, source=tmp_path / "nope"))
