"""conform against niimath (the oracle), plus the conventions it must keep on its own.

niimath's ``-conform`` clips the brightest 2% (f_high 0.98) where FreeSurfer clips 0.1%
(0.999, our default), so the oracle tests run twice: F_HIGH set to 0.98 against
``-conform``, and our default against ``-comply 256 256 256 1 1 1 0.999 1``. The latter
writes a 1 mm RAS grid with the same centre: LIA voxel (i, j, k) is RAS voxel
(256 - i, k, 256 - j), so all but the i = 0 and j = 0 faces can be compared.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import SAMPLE_SCAN, require, require_module
from nibabel.orientations import axcodes2ornt, io_orientation, ornt_transform
from scipy import ndimage

from napari_meshchop.imaging import conform as cf
from napari_meshchop.imaging.geometry import resample

NIBABEL_DATA = Path(nib.__file__).parent / "tests" / "data"


def _find_niimath() -> str | None:
    beside = Path(sys.executable).parent / "niimath"
    return shutil.which("niimath") or (str(beside) if beside.exists() else None)


NIIMATH = _find_niimath()


@pytest.fixture
def niimath():
    require(NIIMATH is not None, "the niimath executable (pip install niimath)")


# ----------------------------------------------------------------------------- test images


def _rotation(degrees: float, axis: int) -> np.ndarray:
    t = np.deg2rad(degrees)
    i, j = [(1, 2), (0, 2), (0, 1)][axis]
    r = np.eye(4)
    r[i, i] = r[j, j] = np.cos(t)
    r[i, j], r[j, i] = -np.sin(t), np.sin(t)
    return r


def _reoriented(img, codes: str):
    return img.as_reoriented(ornt_transform(io_orientation(img.affine), axcodes2ornt(codes)))


@functools.cache
def _mni_template(resolution: int):
    from nilearn import datasets

    return datasets.load_mni152_template(resolution=resolution)


def _mni(resolution: int):
    require_module("nilearn", "the MNI152 template for test images")
    return _mni_template(resolution)


def _thick_slices(img, every: int = 3):
    """Average ``every`` axial slices into one: a 1 x 1 x 3 mm image of the same head."""
    data = img.get_fdata(dtype=np.float32)
    nz = data.shape[2] // every * every
    thick = data[:, :, :nz].reshape(*data.shape[:2], -1, every).mean(-1)
    affine = img.affine @ np.diag([1, 1, every, 1])
    affine[:3, 3] = img.affine[:3, :3] @ [0, 0, (every - 1) / 2] + img.affine[:3, 3]
    return thick, affine


def _image(name: str):
    if name == "mni_1mm":
        return _mni(1)
    if name == "mni_2mm":
        return _mni(2)
    if name == "anatomical":  # real 2 mm SPM image, big-endian int16, with negative voxels
        return nib.load(NIBABEL_DATA / "anatomical.nii")
    if name == "example4d_vol0":  # real EPI, slightly oblique, 2 x 2 x 2.2 mm
        img = nib.load(NIBABEL_DATA / "example4d.nii.gz")
        return nib.Nifti1Image(np.asanyarray(img.dataobj)[..., 0], img.affine, img.header)
    if name == "mni_1x1x3_int16_slope":  # int16 on disk, nibabel picks scl_slope != 1
        thick, affine = _thick_slices(_mni(1))
        img = nib.Nifti1Image(thick, affine)
        img.set_data_dtype(np.int16)
        return img
    if name == "mni_1x1x3_oblique15":
        thick, affine = _thick_slices(_mni(1))
        return nib.Nifti1Image(thick, _rotation(-15, 1) @ affine)
    if name == "mni_2mm_oblique15_float32":
        mni = _mni(2)
        affine = _rotation(15, 0) @ _rotation(10, 2) @ mni.affine
        return nib.Nifti1Image(mni.get_fdata(dtype=np.float32), affine)
    if name == "mni_2mm_LPS":
        mni = _mni(2)
        return _reoriented(nib.Nifti1Image(mni.get_fdata(dtype=np.float32), mni.affine), "LPS")
    if name == "anatomical_PSR_float32":
        anat = nib.load(NIBABEL_DATA / "anatomical.nii")
        return _reoriented(nib.Nifti1Image(anat.get_fdata(dtype=np.float32), anat.affine), "PSR")
    raise KeyError(name)


ORACLE_IMAGES = [
    "mni_1mm",
    "mni_2mm",
    "anatomical",
    "example4d_vol0",
    "mni_1x1x3_int16_slope",
    "mni_1x1x3_oblique15",
    "mni_2mm_oblique15_float32",
    "mni_2mm_LPS",
    "anatomical_PSR_float32",
]


def _niimath(*args) -> None:
    # FSLOUTPUTTYPE=NIFTI: write .nii as named (niimath gzips by default).
    env = {**os.environ, "FSLOUTPUTTYPE": "NIFTI"}
    subprocess.run([NIIMATH, *map(str, args)], check=True, capture_output=True, env=env)


def _lia_from_ras(ras: np.ndarray) -> np.ndarray:
    """niimath's -comply RAS grid moved onto the conformed LIA grid (faces i=0, j=0 left 0)."""
    lia = np.zeros(cf.CONFORMED_SHAPE, dtype=ras.dtype)
    lia[1:, 1:, :] = ras[::-1, :, ::-1][:255, :, :255].transpose(0, 2, 1)
    return lia


def _agreement(ours: np.ndarray, theirs: np.ndarray) -> tuple[float, float]:
    """Percent of voxels within 1 intensity level, and percent equal."""
    diff = np.subtract(ours, theirs, dtype=np.int16)
    np.abs(diff, out=diff)
    return 100.0 * np.mean(diff <= 1), 100.0 * np.mean(diff == 0)


# ----------------------------------------------------------------------------- the oracle


@pytest.mark.usefixtures("niimath")
@pytest.mark.parametrize("name", ORACLE_IMAGES)
def test_matches_niimath(name, tmp_path, monkeypatch):
    src = tmp_path / f"{name}.nii"  # uncompressed: gzip would dominate the run time
    nib.save(_image(name), src)
    img = nib.load(src)  # what niimath reads, scl_slope and all
    if name.endswith("_slope"):
        assert img.dataobj.slope != 1.0

    _niimath(src, "-conform", tmp_path / "conform.nii", "-odt", "char")
    theirs = nib.load(tmp_path / "conform.nii")
    with monkeypatch.context() as m:
        m.setattr(cf, "F_HIGH", 0.98)  # niimath's -conform clipping
        ours = cf.conform(img)
    assert ours.shape == cf.CONFORMED_SHAPE and ours.get_data_dtype() == np.uint8
    np.testing.assert_allclose(ours.affine, theirs.affine, atol=1e-4)
    within, exact = _agreement(np.asanyarray(ours.dataobj), np.asanyarray(theirs.dataobj))
    report = f"{name}, f_high 0.98: {within:.4f}% within 1 level, {exact:.4f}% equal"
    print(report)  # pytest -s shows the measured agreement
    assert within >= 99.0, report

    # Our default, FreeSurfer's 0.999, against niimath with the same clipping.
    _niimath(src, "-comply", 256, 256, 256, 1, 1, 1, 0.999, 1, tmp_path / "comply.nii",
             "-odt", "char")
    theirs = _lia_from_ras(np.asanyarray(nib.load(tmp_path / "comply.nii").dataobj))
    ours = np.asanyarray(cf.conform(img).dataobj).copy()
    ours[0], ours[:, 0] = 0, 0
    within, exact = _agreement(ours, theirs)
    report = f"{name}, f_high 0.999: {within:.4f}% within 1 level, {exact:.4f}% equal"
    print(report)
    assert within >= 99.0, report


@pytest.mark.usefixtures("niimath")
def test_mask_matches_niimath_nearest_neighbour(tmp_path):
    """An oblique 2 mm mask stored with scl_slope 1/255, against niimath's nearest neighbour."""
    mni = _mni(2)
    lesion = (mni.get_fdata() > 0.6).astype(np.uint8)
    img = nib.Nifti1Image(lesion, _rotation(15, 0) @ _rotation(10, 2) @ mni.affine)
    img.header.set_slope_inter(1 / 255, 0)
    nib.save(img, tmp_path / "mask.nii")
    img = nib.load(tmp_path / "mask.nii")
    assert float(np.asarray(img.dataobj).max()) < 0.01  # the slope made "1" tiny

    _niimath(tmp_path / "mask.nii", "-bin", "-comply", 256, 256, 256, 1, 1, 1, 0, 0,
             tmp_path / "nn.nii", "-odt", "char")
    theirs = _lia_from_ras(np.asanyarray(nib.load(tmp_path / "nn.nii").dataobj))
    ours = np.asanyarray(cf.conform_mask(img).dataobj).copy()
    ours[0], ours[:, 0] = 0, 0
    same = 100.0 * np.mean(ours == theirs)
    print(f"mask, nearest neighbour: {same:.5f}% equal")
    assert same >= 99.99, f"{same:.5f}% of mask voxels equal to niimath's"
    assert ours.sum() > 0.99 * theirs.sum() > 0


@pytest.mark.usefixtures("niimath")
def test_centre_voxel_lands_where_niimath_puts_it(tmp_path):
    """One bright voxel at index N/2 of an even 1 mm RAS grid lands exactly on voxel 128."""
    data = np.zeros((64, 80, 48), np.float32)
    data[32, 40, 24] = 100.0
    affine = np.diag([1.0, 1.0, 1.0, 1.0])
    affine[:3, 3] = [-30.0, -45.0, 10.0]
    nib.save(nib.Nifti1Image(data, affine), tmp_path / "dot.nii")
    _niimath(tmp_path / "dot.nii", "-conform", tmp_path / "dot_c.nii", "-odt", "char")
    theirs = np.asanyarray(nib.load(tmp_path / "dot_c.nii").dataobj)
    ours = np.asanyarray(cf.conform(nib.Nifti1Image(data, affine)).dataobj)
    for out in (ours, theirs):
        assert np.unravel_index(np.argmax(out), out.shape) == (128, 128, 128)
        assert np.count_nonzero(out) == 1  # exactly on the grid: no interpolation blur


# ----------------------------------------------------------------------------- conventions


@pytest.mark.parametrize("shape", [(197, 233, 189), (64, 64, 64), (33, 41, 25)])
def test_conformed_affine_centre_and_orientation(shape):
    affine = _rotation(20, 1) @ np.diag([0.9, 1.2, 3.0, 1.0])
    affine[:3, 3] = [-80.0, 12.5, 40.0]
    out = cf.conformed_affine(affine, shape)
    assert nib.aff2axcodes(out) == ("L", "I", "A")
    np.testing.assert_allclose(np.linalg.norm(out[:3, :3], axis=0), 1.0)
    # FreeSurfer's c_ras: the input's voxel N/2 is the conformed grid's voxel 128.
    centre = affine @ np.array([*(np.array(shape) / 2), 1.0])
    np.testing.assert_allclose(np.linalg.inv(out) @ centre, [128, 128, 128, 1], atol=1e-9)


def test_header_of_the_conformed_image(tmp_path):
    data = np.random.default_rng(0).random((40, 50, 30)).astype(np.float32) * 1000
    img = nib.Nifti1Image(data, np.diag([2.0, 2.0, 2.0, 1.0]))
    out = cf.conform(img)
    # By hand: voxel N/2 = (20, 25, 15) is at (40, 50, 30) mm and lands on LIA voxel 128.
    expected = np.array([[-1, 0, 0, 168], [0, 0, 1, -78], [0, -1, 0, 158], [0, 0, 0, 1.0]])
    assert out.shape == cf.CONFORMED_SHAPE and out.get_data_dtype() == np.uint8
    np.testing.assert_array_equal(out.affine, expected)
    nib.save(out, tmp_path / "c.nii")
    back = nib.load(tmp_path / "c.nii")
    qform, qcode = back.header.get_qform(coded=True)
    sform, scode = back.header.get_sform(coded=True)
    assert qcode > 0 and scode > 0
    np.testing.assert_allclose(qform, expected, atol=1e-4)
    np.testing.assert_allclose(sform, expected, atol=1e-4)
    np.testing.assert_allclose(back.header.get_zooms(), (1, 1, 1))
    assert np.asanyarray(back.dataobj).dtype == np.uint8
    assert back.dataobj.slope == 1 and back.dataobj.inter == 0


def test_already_conformed_uint8_keeps_its_grid_and_voxel_order():
    rng = np.random.default_rng(1)
    data = rng.integers(0, 256, cf.CONFORMED_SHAPE, dtype=np.uint8)
    affine = np.array([[-1, 0, 0, 128], [0, 0, 1, -128], [0, -1, 0, 128], [0, 0, 0, 1.0]])  # LIA
    affine[:3, 3] += [0.5, -3.25, 7.0]  # an arbitrary centre
    out = cf.conform(nib.Nifti1Image(data, affine))
    np.testing.assert_array_equal(out.affine, affine)
    # Robust rescaling only: a monotonic map of each voxel's own value, no resampling.
    got = np.asanyarray(out.dataobj)
    lut = np.zeros(256, np.int64)
    lut[data.ravel()] = got.ravel()
    np.testing.assert_array_equal(lut[data], got)
    assert np.all(np.diff(lut) >= 0) and got.max() == 255


def test_storage_type_does_not_change_conform(real_data):
    """uint8, int16 and float64 storage of the same real scan conform to the same voxels."""
    img = nib.load(SAMPLE_SCAN)
    values = np.asanyarray(img.dataobj)
    outs = [cf.conform(nib.Nifti1Image(values.astype(t), img.affine))
            for t in (np.uint8, np.int16, np.float64)]
    np.testing.assert_allclose(outs[0].affine, img.affine, atol=1e-5)  # already conformed
    results = [np.asanyarray(out.dataobj) for out in outs]
    for other in results[1:]:
        np.testing.assert_array_equal(other, results[0])


def test_scaled_uint8_is_rescaled():
    """uint8 with a scl_slope is not plain uchar: it gets the robust 0..255 scaling."""
    mni = _mni(2)  # uint8 on disk, slope 1/255: values 0..~1
    out = np.asanyarray(cf.conform(mni).dataobj)
    assert out.max() == 255


def test_robust_range_rules():
    # 1000 zeros and the values 1..1000 in bins of width 1: leaving out the brightest 0.1%
    # of the 1000 non-zero voxels reaches the voxel 999, in the last bin (with 1000); the
    # limit is the lower edge of the bin below it, 998.
    data = np.concatenate([np.zeros(1000), np.arange(1, 1001)]).astype(np.float32)
    assert cf.robust_range(data) == pytest.approx((0.0, 998.0))
    assert cf.robust_range(data, 0.0, 1.0) == (0.0, 1000.0)
    lo, _ = cf.robust_range(data, 0.75, 1.0 - 1e-9)
    assert lo == pytest.approx(500.0)  # first bin where 75% of all voxels are reached
    assert cf.robust_range(np.full(10, 3.0)) == (3.0, 3.0)
    flat = cf.conform(nib.Nifti1Image(np.full((8, 8, 8), 3.0), np.eye(4)))
    assert np.count_nonzero(np.asanyarray(flat.dataobj)) == 0


def test_few_negative_voxels_are_read_as_zero():
    """Under 2% of negative voxels do not set the black level (niimath's rule); more do."""
    rng = np.random.default_rng(2)
    data = rng.random((30, 30, 30)).astype(np.float32) * 100
    affine = np.diag([2.0, 2.0, 2.0, 1.0])

    def conformed(values):
        return np.asanyarray(cf.conform(nib.Nifti1Image(values, affine)).dataobj)

    few = data.copy()
    few.flat[:200] = -1000.0  # 0.7% of the voxels
    np.testing.assert_array_equal(conformed(few), conformed(np.maximum(few, 0)))
    many = data.copy()
    many.flat[:2000] = -1000.0  # 7.4%: signal, so -1000 becomes black and the rest bright
    bright, mid = conformed(many), conformed(few)
    assert np.median(bright[bright > 0]) > 200 > np.median(mid[mid > 0])


def test_conform_rejects_4d():
    with pytest.raises(ValueError, match="3D"):
        cf.conform(nib.Nifti1Image(np.zeros((4, 4, 4, 2), np.float32), np.eye(4)))


# ----------------------------------------------------------------------------- masks


@pytest.mark.parametrize(
    ("stored", "slope", "inter"),
    [(np.uint8, 1 / 255, 0.0), (np.uint8, 1.0, 0.0), (np.int16, 0.5, 0.0), (np.float32, 1.0, 0.0)],
)
def test_conform_mask_nearest_and_binary(tmp_path, stored, slope, inter):
    lesion = np.zeros((40, 48, 36), dtype=stored)
    lesion[10:20, 12:30, 5:9] = 1
    lesion[25:28, 30:33, 20:22] = 3  # another label: still lesion
    affine = _rotation(15, 2) @ np.diag([2.0, 2.0, 3.0, 1.0])
    affine[:3, 3] = [-40.0, -50.0, -20.0]
    img = nib.Nifti1Image(lesion, affine)
    img.header.set_slope_inter(slope, inter)
    nib.save(img, tmp_path / "mask.nii")
    img = nib.load(tmp_path / "mask.nii")

    out = cf.conform_mask(img)
    got = np.asanyarray(out.dataobj)
    assert out.shape == cf.CONFORMED_SHAPE and got.dtype == np.uint8
    assert set(np.unique(got)) == {0, 1}
    affine = img.affine  # as stored: float32
    # The conformed grid: 1 mm LIA axes, the input's voxel N/2 on voxel 128.
    np.testing.assert_array_equal(out.affine[:3, :3], [[-1, 0, 0], [0, 0, 1], [0, -1, 0]])
    np.testing.assert_allclose(np.linalg.solve(out.affine, affine @ [20, 24, 18, 1.0]),
                               [128, 128, 128, 1], atol=1e-9)
    # Nearest neighbour: each conformed voxel takes the input voxel nearest its centre.
    ijk = np.argwhere(np.ones(cf.CONFORMED_SHAPE[:2] + (1,), bool))[::97]
    for k in (60, 100, 128, 150):
        vox = np.c_[ijk[:, :2], np.full(len(ijk), k), np.ones(len(ijk))]
        src = (np.linalg.inv(affine) @ out.affine @ vox.T)[:3].T
        near = np.floor(src + 0.5).astype(int)
        inside = np.all((src >= 0) & (src <= np.array(lesion.shape) - 1), axis=1)
        expected = np.zeros(len(vox), np.uint8)
        expected[inside] = lesion[tuple(near[inside].T)] > 0
        np.testing.assert_array_equal(got[tuple(vox[:, :3].astype(int).T)], expected)
    # Volume is kept: 2 x 2 x 3 mm voxels become 12 voxels of 1 mm^3 each.
    assert got.sum() == pytest.approx(12 * np.count_nonzero(lesion), rel=0.1)


# ----------------------------------------------------------------------------- resampling


@pytest.mark.parametrize("order", [0, 1, 3])
def test_resample_matches_affine_transform(order):
    """geometry.resample's shortcuts (only the block that sees the source; three 1-D passes
    for unrotated trilinear) give scipy's full affine_transform result."""
    rng = np.random.default_rng(order)
    for _ in range(60):
        shape = tuple(int(n) for n in rng.integers(1, 30, 3))
        data = rng.random(shape).astype(np.float32) * 100
        if order == 0:
            data = (data > 50).astype(np.uint8)
        src_affine = np.diag([*rng.choice([0.5, 1.0, 2.0, 3.0], 3), 1.0])
        src_affine[:3, 3] = rng.normal(0, 5, 3)
        dst_affine = np.diag([*rng.choice([0.7, 1.0, 1.5], 3), 1.0])
        if rng.random() < 0.3:
            dst_affine = _rotation(rng.uniform(-40, 40), int(rng.integers(3))) @ dst_affine
        if rng.random() < 0.5:
            dst_affine = dst_affine @ np.diag([-1.0, 1.0, -1.0, 1.0])
        if rng.random() < 0.5:
            dst_affine = dst_affine[:, [1, 2, 0, 3]]
        dst_affine[:3, 3] = rng.normal(-8, 6, 3)
        dst_shape = tuple(int(n) for n in rng.integers(1, 40, 3))
        output = np.uint8 if order == 0 else np.float32
        vox2vox = np.linalg.inv(src_affine) @ dst_affine
        expected = ndimage.affine_transform(data, vox2vox[:3, :3], vox2vox[:3, 3],
                                            output_shape=dst_shape, order=order, mode="constant",
                                            cval=0.0, output=output, prefilter=False)
        got = resample(data, src_affine, dst_affine, dst_shape, order=order, output=output)
        assert got.dtype == np.dtype(output) and got.shape == dst_shape
        np.testing.assert_allclose(got, expected, atol=1e-4)
