"""Corrected masks as training data: the sidecar, the local data folder (manifest and folds
as for ARC), replacing a scan's pair, and `meshchop train` / `evaluate` on it unchanged."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import synthetic_corrections as synthetic

from napari_meshchop import cli, files
from napari_meshchop.data import corrections, folds, manifest
from napari_meshchop.data.cache import ArcDataset
from napari_meshchop.errors import InputError, MeshchopError


def test_saved_mask_has_its_provenance_beside_it(tmp_path):
    scan, _ = synthetic.scan_file(tmp_path, "sub-01_T2w", 1)
    affine = nib.load(scan).affine
    mask = np.zeros((20, 20, 20), dtype=np.int32)
    mask[3:6, 4:8, 5:7] = 2  # any label value is lesion
    provenance = corrections.Provenance(str(scan), "tiny.pt", "ab" * 32, 0.35)
    written, sidecar = corrections.save_corrected(mask, affine, tmp_path / "fixed.nii.gz",
                                                  provenance)
    assert sidecar == tmp_path / "fixed.json"
    saved = nib.load(written)
    np.testing.assert_array_equal(saved.affine, affine)
    assert saved.get_data_dtype() == np.uint8
    np.testing.assert_array_equal(np.asarray(saved.dataobj), (mask > 0).astype(np.uint8))
    doc = corrections.read_sidecar(written)
    assert doc["format"] == corrections.SIDECAR_FORMAT and doc["edited"] is True
    assert (doc["source_scan"], doc["model"], doc["model_sha256"], doc["threshold"]) == (
        str(scan), "tiny.pt", "ab" * 32, 0.35)
    assert doc["lesion_voxels"] == 24 and doc["lesion_ml"] == pytest.approx(0.024)
    assert doc["time"].endswith("+00:00")
    with pytest.raises(InputError, match="fixed.png: a mask is saved as"):
        corrections.save_corrected(mask, affine, tmp_path / "fixed.png", provenance)


def test_model_sha256_of_a_registry_name_and_of_a_file(tmp_path):
    from napari_meshchop.network import registry

    assert corrections.model_sha256(registry.DEFAULT_MODEL) == \
        registry.REGISTRY[registry.DEFAULT_MODEL].sha256
    model = tmp_path / "m.pt"
    model.write_bytes(b"weights")
    assert corrections.model_sha256(model) == files.sha256_bytes(b"weights")
    assert corrections.model_sha256("") is None


def test_pairs_go_into_a_folder_like_the_arc_download(tmp_path):
    data = tmp_path / "mine"
    made = [synthetic.scan_file(tmp_path, f"sub-{i:02d}_ses-1_T2w", i) for i in range(4)]
    first = corrections.add(data, *made[0])
    assert first.folds is None and not (data / folds.NAME).exists()  # 1 subject: no folds
    corrections.add(data, *made[1])
    assert not (data / folds.NAME).exists()  # 2 subjects: still too few
    third = corrections.add(data, *made[2])
    assert third.folds == (3, 2) and third.pairs == third.subjects == 3
    fourth = corrections.add(data, *made[3])
    loaded = manifest.load(data)  # the ARC manifest's format
    assert loaded.repo == corrections.REPO and loaded.complete
    assert sorted(p.id for p in loaded.pairs) == [f"sub-{i:02d}_ses-1" for i in range(4)]
    for pair in loaded.pairs:
        assert manifest.verify(pair, data) is None  # files there, checksums right
    made_folds = folds.load(data)
    assert fourth.folds == (made_folds.outer_folds, made_folds.inner_folds) == (3, 2)
    tested = sorted(i for k in range(3) for i in made_folds.ids(k, "test"))
    assert tested == sorted(p.id for p in loaded.pairs)  # every pair tested once
    pair = loaded.pair("sub-02_ses-1")
    truth = nib.load(made[2][1])
    assert pair.lesion_voxels == int(np.asarray(truth.dataobj).sum())
    assert (data / pair.image).read_bytes() == made[2][0].read_bytes()  # copied as it was
    # The cache and dataset read it as they read ARC.
    image, mask = ArcDataset(data, made_folds.ids(0, "test")).__getitem__(0)
    assert image.shape[0] == 1 and mask.sum() > 0


def test_adding_the_same_scan_again_replaces_its_pair(tmp_path):
    data = tmp_path / "mine"
    scan, mask = synthetic.scan_file(tmp_path, "head", 3)
    added = corrections.add(data, scan, mask)
    assert added.pair.subject == "sub-head" and added.pair.session.startswith("ses-")
    ArcDataset(data)[0]  # fills the cache
    assert len(list((data / "cache").glob("*.npz"))) == 1
    smaller = np.asarray(nib.load(mask).dataobj).copy()
    smaller[:10] = 0
    edited = tmp_path / "edited.nii.gz"
    nib.save(nib.Nifti1Image(smaller, nib.load(mask).affine), edited)
    again = corrections.add(data, scan, edited)
    assert again.replaced == [added.pair.id] and again.pairs == 1
    kept = manifest.load(data).pairs
    assert len(kept) == 1 and kept[0].lesion_voxels == int(smaller.sum()) < \
        added.pair.lesion_voxels
    assert not list((data / "cache").glob("*.npz"))  # the stale cached volume is gone
    # The same voxels from a layer (an image, not a file) are the same scan, too.
    img = nib.Nifti1Image(np.asarray(nib.load(scan).dataobj), nib.load(scan).affine)
    one = corrections.add(data, img, smaller, name="head")
    two = corrections.add(data, img, smaller, name="head")
    assert two.replaced == [one.pair.id] and len(manifest.load(data).pairs) == 2


def test_a_mask_off_the_scans_grid_is_refused(tmp_path):
    scan, mask = synthetic.scan_file(tmp_path, "sub-01_T2w", 1)
    shifted = tmp_path / "shifted.nii.gz"
    img = nib.load(mask)
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj), img.affine + np.eye(4) * 0.5), shifted)
    with pytest.raises(InputError, match="shifted.nii.gz: not on the grid of sub-01_T2w"):
        corrections.add(tmp_path / "mine", scan, shifted)
    with pytest.raises(MeshchopError, match="the mask is not on the grid"):
        corrections.add(tmp_path / "mine", scan, np.zeros((3, 3, 3)))
    voxels = np.asarray(img.dataobj)
    with pytest.raises(MeshchopError, match="the mask is not on the grid"):
        corrections.add(tmp_path / "mine", scan, voxels, affine=img.affine * 2)
    assert not (tmp_path / "mine" / "manifest.json").exists()


@pytest.mark.parametrize("subjects,sizes", [(1, None), (2, None), (3, (3, 2)), (4, (3, 2)),
                                            (5, (3, 3)), (40, (3, 3))])
def test_folds_as_many_as_the_subjects_allow(subjects, sizes):
    assert folds.sizes_for(subjects) == sizes


def test_train_and_evaluate_commands_read_the_folder_unchanged(tmp_path, capsys):
    data = tmp_path / "mine"
    for i in range(3):
        corrections.add(data, *synthetic.scan_file(tmp_path, f"sub-{i}_T2w", i))
    run = tmp_path / "run"
    assert cli.main(["train", "--data-dir", str(data), "--outer-fold", "0", "--channels", "2",
                     "--epochs", "1", "--preprocess", "ras-minmax", "--shape", "20",
                     "--device", "cpu", "--out", str(run), "-q"]) == 0
    assert "trained 1 epochs" in capsys.readouterr().out
    assert cli.main(["evaluate", str(run / "last.pt"), "--data-dir", str(data),
                     "--outer-fold", "0", "--device", "cpu", "--out", str(tmp_path / "ev"),
                     "-q"]) == 0
    results = json.loads((tmp_path / "ev" / "results.json").read_text())
    assert results["subjects"] == 1 and results["failed"] == 0
