"""The preprocessing cache and the PyTorch Dataset over a downloaded (replica) cohort."""

from __future__ import annotations

import dataclasses
import threading

import arc_replica
import nibabel as nib
import numpy as np
import pytest
import torch

from napari_meshchop import events
from napari_meshchop.data import arc, cache, folds, manifest
from napari_meshchop.errors import Cancelled, MeshchopError
from napari_meshchop.imaging.preprocess import PreprocessSpec, prepare, prepare_mask

SMALL = PreprocessSpec("ras-minmax", shape=(32, 32, 32))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    replica = arc_replica.build(tmp_path_factory.mktemp("replica"))
    folder = tmp_path_factory.mktemp("arc")
    events.run(arc.download(folder, source=replica, folds=False))
    return folder


def test_cache_key_follows_the_source_checksums_and_the_spec(data):
    pair = manifest.load(data).pairs[0]
    key = cache.cache_key(pair, SMALL)
    assert cache.cache_key(pair, PreprocessSpec("ras-minmax", shape=(32, 32, 32))) == key
    assert cache.cache_key(pair, PreprocessSpec("ras-minmax", shape=(32, 32, 48))) != key
    assert cache.cache_key(pair, PreprocessSpec()) != key
    assert cache.cache_key(dataclasses.replace(pair, image_sha256="0" * 64), SMALL) != key
    assert cache.cache_key(dataclasses.replace(pair, mask_sha256="0" * 64), SMALL) != key
    store = cache.PairCache(data, SMALL)
    assert store.path(pair).name == f"{pair.id}.{key}.npz"


def test_cached_pair_is_what_preprocessing_gives(data, tmp_path):
    pair = manifest.load(data).pair("sub-M2105_ses-964")  # the non-RAS one
    store = cache.PairCache(data, SMALL, tmp_path)
    assert store.load(pair) is None
    built = store.get(pair)
    loaded = store.load(pair)
    img = nib.load(data / pair.image)
    prepared = prepare(img, SMALL)
    mask = prepare_mask(nib.load(data / pair.mask), img, SMALL)
    assert loaded.image.dtype == np.float32 and loaded.mask.dtype == np.uint8  # ras-minmax
    np.testing.assert_array_equal(loaded.image, built.image)
    np.testing.assert_array_equal(loaded.mask, mask)
    np.testing.assert_array_equal(loaded.image_float(), prepared.volume)
    np.testing.assert_allclose(loaded.affine, prepared.affine)
    assert loaded.mask.sum() > 0
    assert not list(tmp_path.glob(".*.part"))  # written atomically


def test_conform_is_cached_exactly(data, tmp_path):
    pair = manifest.load(data).pair("sub-M2269_ses-767")  # mask with scl_slope 1/255
    loaded = cache.PairCache(data, PreprocessSpec(), tmp_path).get(pair)
    img = nib.load(data / pair.image)
    assert loaded.image.shape == (256, 256, 256)
    np.testing.assert_array_equal(loaded.image_float(), prepare(img, PreprocessSpec()).volume)
    assert loaded.mask.sum() > 0  # the slope did not round the lesion away


@pytest.mark.parametrize("spec", [PreprocessSpec(), SMALL], ids=["conform", "ras-minmax"])
def test_training_and_segmentation_feed_the_network_the_same_numbers(data, tmp_path, spec,
                                                                      monkeypatch):
    """What `meshchop segment` feeds the network for a file (caught at the network's door)
    equals, bit for bit, what the Dataset serves for training and the evaluation core
    scores, fresh and from the cache file alike."""
    from napari_meshchop.evaluation import evaluate
    from napari_meshchop.network import checkpoint, inference
    from napari_meshchop.network.model import Architecture, MeshNet

    fed = []

    def network(self, volume, stop=None):
        fed.append(np.array(volume, dtype=np.float32))
        return np.zeros(volume.shape, np.float32)
        yield  # a job generator, as the real pass

    monkeypatch.setattr(inference.FusedMeshNet, "lesion_probability", network)
    pair = manifest.load(data).pair("sub-M2105_ses-964")  # PSR, two runs
    model = checkpoint.from_model(MeshNet(Architecture(channels=2, dilations=(1,))).eval(),
                                  spec)
    events.run(inference.segment_file(data / pair.image, tmp_path / "mask.nii.gz", model,
                                      "cpu"))
    (segmented,) = fed
    assert segmented.shape == spec.shape
    served = []
    for _ in range(2):  # preprocessed and stored, then loaded from the cache file
        ds = cache.ArcDataset(data, ids=[pair.id], spec=spec, cache_dir=tmp_path / "cache")
        served.append(ds[0][0][0].numpy())
        served.append(evaluate.dataset_subjects(ds)[0]().image)
    for image in served:
        assert image.dtype == np.float32 and image.tobytes() == segmented.tobytes()
    assert len(list((tmp_path / "cache").glob("*.npz"))) == 1


def test_damaged_cache_file_is_rebuilt(data, tmp_path, caplog):
    pair = manifest.load(data).pairs[0]
    store = cache.PairCache(data, SMALL, tmp_path)
    good = store.get(pair)
    store.path(pair).write_bytes(b"PK\x03\x04 not a whole npz")
    assert store.load(pair) is None and "damaged" in caplog.text
    np.testing.assert_array_equal(store.get(pair).image, good.image)


def test_dataset_serves_tensors_from_the_cache(data, tmp_path, monkeypatch):
    ds = cache.ArcDataset(data, spec=SMALL, cache_dir=tmp_path)
    assert len(ds) == 4 and ds.ids == sorted(p.id for p in manifest.load(data).pairs)
    image, mask = ds[0]
    assert image.dtype == torch.float32 and image.shape == (1, 32, 32, 32)
    assert 0 <= float(image.min()) and float(image.max()) <= 1
    assert mask.dtype == torch.uint8 and mask.shape == (32, 32, 32) and int(mask.sum()) > 0
    assert set(torch.unique(mask).tolist()) == {0, 1}
    monkeypatch.setattr(cache, "prepare_pair", lambda *a: pytest.fail("preprocessed again"))
    again, _ = ds[0]
    assert torch.equal(again, image)
    loader = torch.utils.data.DataLoader(cache.ArcDataset(data, ids=ds.ids[:1], spec=SMALL,
                                                          cache_dir=tmp_path,
                                                          target_dtype=torch.long))
    (batch_image, batch_mask), = list(loader)
    assert batch_image.shape == (1, 1, 32, 32, 32) and batch_mask.dtype == torch.int64
    assert torch.equal(batch_mask[0], mask.long())


def test_dataset_by_fold_and_unknown_ids(data, tmp_path):
    m = manifest.load(data)
    made = folds.nested_folds(folds.samples_of(m), outer=2, inner=2, seed=1)
    made.save(data)
    test = cache.ArcDataset.fold(data, 1, "test", spec=SMALL, cache_dir=tmp_path)
    val = cache.ArcDataset.fold(data, 0, "val", inner=1, spec=SMALL, cache_dir=tmp_path)
    assert test.ids == made.outer[1].test and val.ids == made.outer[0].inner[1].val
    with pytest.raises(MeshchopError, match="not in"):
        cache.ArcDataset(data, ids=["sub-nobody_ses-1"], spec=SMALL)
    (data / folds.NAME).unlink()


def test_fill_preprocesses_once_and_stops(data, tmp_path):
    pairs = manifest.load(data).pairs
    store = cache.PairCache(data, SMALL, tmp_path)
    stop = threading.Event()
    with pytest.raises(Cancelled):
        for event in store.fill(pairs, stop):
            if event.done == 2:
                stop.set()
    assert len(list(tmp_path.glob("*.npz"))) == 2
    assert events.run(store.fill(pairs)) == 2  # only the two that were missing
    assert events.run(store.fill(pairs)) == 0
