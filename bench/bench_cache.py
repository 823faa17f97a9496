"""Time loading a cached, conformed pair against preprocessing it again.

A synthetic T2w of ARC's size (192 x 256 x 176 voxels, 1.0 x 0.94 x 1.2 mm, int16, axis
aligned, so conform takes its fastest path) and a lesion mask are written as .nii.gz with a
manifest, like ``meshchop download`` writes them. Then, in one process:

- *preprocess*: ``cache.prepare_pair`` (load both NIfTI files, conform the image, resample
  the mask), what every epoch would pay without the cache;
- *cache load*: ``PairCache.load`` of the stored pair (uint8 image + packed mask);
- *Dataset item*: ``ArcDataset[i]`` from the cache, i.e. the load plus the tensors a
  training step gets (float32 image, uint8 mask; and with an int64 mask).

Times are medians of ``--repeats`` runs with a warm page cache.

    python bench/bench_cache.py --repeats 5

prints a Markdown table.
"""

from __future__ import annotations

import argparse
import gzip
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from napari_meshchop import files
from napari_meshchop.data import cache
from napari_meshchop.data.manifest import Manifest, Pair
from napari_meshchop.imaging.preprocess import PreprocessSpec

SHAPE = (192, 256, 176)
ZOOMS = (1.0, 0.9375, 1.2)


def make_pair(folder: Path) -> Pair:
    rng = np.random.default_rng(0)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in SHAPE], indexing="ij",
                                sparse=False), axis=0).astype(np.float32)
    head = (grid**2).sum(0) < 0.85
    lesion = ((grid - np.array([0.35, 0.1, 0.0], np.float32)[:, None, None, None]) ** 2
              ).sum(0) < 0.03
    del grid
    t2w = (600 * head + 500 * (lesion & head) + rng.normal(0, 25, SHAPE)).clip(0, None)
    affine = np.diag([*ZOOMS, 1.0])
    affine[:3, 3] = -np.array(SHAPE) * ZOOMS / 2
    names = {"image": "sub-B0001_ses-1_acq-spc3_run-1_T2w.nii.gz",
             "mask": "sub-B0001_ses-1_acq-spc3_run-1_T2w_desc-lesion_mask.nii.gz"}
    blobs = {}
    for key, data in (("image", t2w.astype(np.int16)), ("mask", (lesion & head).astype(np.uint8))):
        img = nib.Nifti1Image(data, affine)
        img.set_sform(affine, code=1)
        img.set_qform(affine, code=1)
        blobs[key] = gzip.compress(img.to_bytes(), compresslevel=6)
        files.write_bytes(folder / "sub-B0001" / "ses-1" / names[key], blobs[key])
    voxels = int((lesion & head).sum())
    pair = Pair("sub-B0001", "ses-1", "space_no_accel", "1",
                f"sub-B0001/ses-1/{names['image']}", f"sub-B0001/ses-1/{names['mask']}",
                files.sha256_bytes(blobs["image"]), files.sha256_bytes(blobs["mask"]),
                len(blobs["image"]), len(blobs["mask"]), SHAPE, ZOOMS, "RAS", voxels,
                voxels * float(np.prod(ZOOMS)) / 1000, "bench")
    Manifest(repo="bench", pairs=[pair]).save(folder)
    return pair


def median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    spec = PreprocessSpec()  # conform: 256^3, 1 mm, LIA, robust 0..255, /255
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        pair = make_pair(folder)
        store = cache.PairCache(folder, spec)
        store.get(pair)  # fills the cache (and warms imports)
        dataset = cache.ArcDataset(folder, spec=spec)
        dataset_long = cache.ArcDataset(folder, spec=spec, target_dtype=torch.long)
        pre = median_time(lambda: cache.prepare_pair(pair, folder, spec), args.repeats)
        load = median_time(lambda: store.load(pair), args.repeats)
        item = median_time(lambda: dataset[0], args.repeats)
        item_long = median_time(lambda: dataset_long[0], args.repeats)
        nifti_mb = (pair.image_bytes + pair.mask_bytes) / 1e6
        cache_mb = os.path.getsize(store.path(pair)) / 1e6
    print(f"pair: {SHAPE} voxels of {' x '.join(f'{z:g}' for z in ZOOMS)} mm int16 "
          f"+ uint8 mask; NIfTI {nifti_mb:.1f} MB (.nii.gz), cache file {cache_mb:.1f} MB; "
          f"{args.repeats} repeats, load average {os.getloadavg()[0]:.1f}", file=sys.stderr)
    print("| path | median time (s) | vs preprocessing |")
    print("|---|---:|---:|")
    print(f"| preprocess (`prepare_pair`: read .nii.gz, conform image, resample mask) "
          f"| {pre:.3f} | 1x |")
    print(f"| cache load (`PairCache.load`: uint8 image + packed mask) | {load:.3f} "
          f"| {pre / load:.0f}x faster |")
    print(f"| Dataset item from the cache (float32 image + uint8 mask tensors) | {item:.3f} "
          f"| {pre / item:.0f}x faster |")
    print(f"| Dataset item, `target_dtype=torch.long` (int64 mask) | {item_long:.3f} "
          f"| {pre / item_long:.0f}x faster |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
