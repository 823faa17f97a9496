"""Peak memory of evaluating a cohort of 256^3 subjects: the streaming core against a naive
evaluator that holds every volume.

A synthetic cohort of ``max(--subjects)`` pairs is written to a temporary folder as the
pair cache stores them (uint8 256^3 image, packed mask, affine), so both evaluators read
real cache files of full size. Each run is a fresh process (its peak RSS, ``ru_maxrss``, is
that run's alone) that evaluates the first N subjects with a one-layer, 2-channel MeshNet
(a wider or deeper network adds the same activations to every run, whatever N; it changes
the time, not what is kept from one subject to the next):

- *streaming*: ``evaluate.evaluate_dataset`` (one subject in memory at a time);
- *naive*: load every subject, predict every mask, then count (as code that collects
  ``[(image, truth, prediction), ...]`` before scoring does).

Both produce the same counts (checked). Run from the repository root::

    python bench/bench_evaluate.py --subjects 4 16

prints a Markdown table and whether the streaming 16/4 peak ratio is within 1.1.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

SIZE = 256
SPEC = {"name": "ras-minmax", "shape": [SIZE] * 3, "voxel_size": 1.0}


class Cohort:
    """What ``evaluate.dataset_subjects`` needs of a dataset: pairs and their cache."""

    def __init__(self, folder: Path, n: int):
        from napari_meshchop.data.cache import PairCache
        from napari_meshchop.data.manifest import Pair
        from napari_meshchop.imaging.preprocess import PreprocessSpec

        self.pairs = [Pair(f"sub-B{i:03d}", "ses-1", "space_2x", None, f"{i}.nii.gz",
                           f"{i}_mask.nii.gz", f"{i:064x}", f"{i + 1000:064x}", 0, 0,
                           (SIZE,) * 3, (1.0, 1.0, 1.0), "RAS", 0, 0.0) for i in range(n)]
        self.cache = PairCache(folder, PreprocessSpec.from_dict(SPEC), folder)

    def __len__(self) -> int:
        return len(self.pairs)


def write_cohort(folder: Path, n: int) -> None:
    """``n`` head-like 256^3 images with a lesion blob each, stored in the pair cache."""
    from napari_meshchop.data.cache import PreparedPair

    cohort = Cohort(folder, n)
    axis = np.linspace(-1, 1, SIZE, dtype=np.float32)
    r2 = axis[:, None, None] ** 2 + axis[None, :, None] ** 2 + axis[None, None, :] ** 2
    head = r2 < 0.8
    for i, pair in enumerate(cohort.pairs):
        rng = np.random.default_rng(i)
        c = rng.uniform(-0.4, 0.4, 3).astype(np.float32)
        blob = ((axis[:, None, None] - c[0]) ** 2 + (axis[None, :, None] - c[1]) ** 2
                + (axis[None, None, :] - c[2]) ** 2) < rng.uniform(0.005, 0.03)
        image = np.where(head, 120, 0).astype(np.int16) + 80 * (blob & head)
        image += rng.integers(0, 20, image.shape, dtype=np.int16)
        cohort.cache.store(pair, PreparedPair(image.clip(0, 255).astype(np.uint8),
                                           (blob & head).astype(np.uint8), np.eye(4)))


def predictor():
    import torch

    from napari_meshchop.network.inference import FusedMeshNet
    from napari_meshchop.network.model import Architecture, MeshNet

    torch.manual_seed(0)
    # One layer of 2 channels: oneDNN takes ~8 s per 256^3 layer here even this narrow.
    return FusedMeshNet(MeshNet(Architecture(channels=2, dilations=(1,))).eval())


def worker(mode: str, folder: Path, n: int) -> dict:
    from napari_meshchop import events
    from napari_meshchop.evaluation import evaluate
    from napari_meshchop.evaluation.metrics import confusion

    cohort, fused = Cohort(folder, n), predictor()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    if mode == "streaming":
        results = events.run(evaluate.evaluate_dataset(fused, cohort))
        counts = [r.counts for r in results]
    else:
        loaded = [cohort.cache.get(p) for p in cohort.pairs]
        subjects = [(c.image_float(), c.mask, c.affine) for c in loaded]
        masks = [events.run(evaluate.predict_mask(fused, image)) for image, _, _ in subjects]
        counts = [confusion(m, t, evaluate.voxel_ml(a)).to_dict()
                  for m, (_, t, a) in zip(masks, subjects)]
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"peak_mb": peak / 1024, "above_mb": (peak - before) / 1024, "seconds": seconds,
            "counts": counts}


def measure(mode: str, folder: Path, n: int) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--worker", mode, "--folder", str(folder),
                           "--subjects", str(n)], capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--subjects", type=int, nargs="+", default=[4, 16])
    p.add_argument("--worker", choices=["streaming", "naive"], help=argparse.SUPPRESS)
    p.add_argument("--folder", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, Path(args.folder), args.subjects[0])))
        return
    with tempfile.TemporaryDirectory(prefix="bench-evaluate-") as tmp:
        folder = Path(tmp)
        write_cohort(folder, max(args.subjects))
        print("| subjects (256^3) | evaluator | peak RSS (MB) | above baseline (MB) | time (s) |")
        print("|---:|---|---:|---:|---:|")
        peaks: dict = {}
        for n in args.subjects:
            runs = {mode: measure(mode, folder, n) for mode in ("streaming", "naive")}
            assert runs["streaming"]["counts"] == runs["naive"]["counts"], "counts differ"
            for mode, r in runs.items():
                peaks[mode, n] = r["peak_mb"]
                print(f"| {n} | {mode} | {r['peak_mb']:.0f} | {r['above_mb']:.0f} "
                      f"| {r['seconds']:.1f} |", flush=True)
    lo, hi = min(args.subjects), max(args.subjects)
    if lo != hi:
        for mode in ("streaming", "naive"):
            print(f"{mode}: peak RSS {hi} / {lo} subjects = "
                  f"{peaks[mode, hi] / peaks[mode, lo]:.2f}")
        ratio = peaks["streaming", hi] / peaks["streaming", lo]
        print(f"target (streaming ratio <= 1.1): {'met' if ratio <= 1.1 else 'NOT met'}")


if __name__ == "__main__":
    main()
