"""The `brainchop` preprocessing: exactly what brainchop's command line feeds a model.

The oracle is brainchop 0.2.x's normalisation as its source states it: numpy's quantiles
of the conformed uint8 volume (cast to float32), then (v - q2) / (q98 - q2 + 1e-3) clipped
to [0, 1]; its conform is niimath's (f_high 0.98). brainchop itself, on the real scan, is
in test_export_runtimes.py.
"""

import nibabel as nib
import numpy as np
import pytest
from conftest import oblique_affine, phantom

from napari_meshchop.data.cache import PairCache
from napari_meshchop.data.manifest import load as load_manifest
from napari_meshchop.imaging import conform as cf
from napari_meshchop.imaging.nifti import load_volume
from napari_meshchop.imaging.preprocess import (
    KNOWN,
    PreprocessSpec,
    network_grid,
    prepare,
    uint8_quantiles,
)


def brainchop_normalise(u8: np.ndarray) -> np.ndarray:
    img = u8.astype(np.float32)
    lo, hi = np.quantile(img, 0.02), np.quantile(img, 0.98)
    return np.clip((img - lo) / (hi - lo + 1e-3), 0, 1)


@pytest.mark.parametrize("seed", range(4))
def test_uint8_quantiles_are_numpys(seed):
    rng = np.random.default_rng(seed)
    u8 = rng.integers(0, 256, size=(23, 17, 9)).astype(np.uint8)
    u8[u8 < rng.integers(0, 200)] = 0  # a black background of any size
    qs = (0.0, 0.02, 0.5, 0.98, 1.0)
    np.testing.assert_allclose(uint8_quantiles(u8, qs), np.quantile(u8.astype(np.float32), qs),
                               rtol=0, atol=1e-9)
    assert uint8_quantiles(np.full((4, 4, 4), 7, np.uint8), (0.02, 0.98)) == [7.0, 7.0]


def test_brainchop_is_niimaths_conform_then_the_quantile_clip():
    img = nib.Nifti1Image(phantom((60, 50, 40)) * 7.5, oblique_affine())
    prepared = prepare(img, PreprocessSpec("brainchop"))
    conformed = cf.conform(img, f_high=0.98)
    np.testing.assert_allclose(prepared.affine, conformed.affine)
    want = brainchop_normalise(np.asarray(conformed.dataobj))
    np.testing.assert_allclose(prepared.volume, want, atol=1e-6)
    assert prepared.volume.dtype == np.float32 and prepared.volume.shape == (256, 256, 256)
    assert 0.0 < np.mean(prepared.volume == 1.0) < 0.05  # the brightest 2% are clipped
    # The same grid as conform; only the intensities differ.
    np.testing.assert_allclose(network_grid(img.affine, img.shape, PreprocessSpec("brainchop")),
                               network_grid(img.affine, img.shape, PreprocessSpec("conform")))
    conform_spec = prepare(img, PreprocessSpec("conform"))
    assert not np.allclose(conform_spec.volume, prepared.volume)


def test_spec_rules():
    assert "brainchop" in KNOWN
    spec = PreprocessSpec("brainchop")
    assert PreprocessSpec.from_dict(spec.to_dict()) == spec
    assert spec.axis_codes == "LIA" and PreprocessSpec("ras-minmax").axis_codes == "RAS"
    assert "2%-98% quantile" in spec.summary
    with pytest.raises(ValueError, match="brainchop is defined for 256"):
        PreprocessSpec("brainchop", shape=(128, 128, 128))


def test_training_cache_serves_exactly_what_prepare_makes(data, tmp_path):
    """No rounding on the way (the clip's values are not multiples of 1/255), and a
    brainchop entry never collides with a conform one."""
    pair = load_manifest(data).pairs[0]
    spec = PreprocessSpec("brainchop")
    cache = PairCache(data, spec, tmp_path / "cache")
    first = cache.get(pair)  # preprocessed and stored
    again = cache.get(pair)  # loaded from the file
    want = prepare(load_volume(data / pair.image), spec).volume
    np.testing.assert_array_equal(first.image_float(), want)
    np.testing.assert_array_equal(again.image_float(), want)
    assert cache.path(pair) != PairCache(data, PreprocessSpec(), tmp_path / "cache").path(pair)
