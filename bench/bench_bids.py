"""A cohort in one process against the network pass alone.

N copies of the real sample scan (256^3, 1 mm: as stored, reoriented to PSR, moved 12 mm)
form a BIDS dataset; the pretrained MeshNet-26's weights run on a ``--grid``^3 network grid
covering the 256 mm field of view. Three timings, in one process, on the same images:

- network alone: ``FusedMeshNet.lesion_probability`` on each image's prepared volume, the
  model built once (measured before and after the others; their mean is the baseline);
- sequential: the cohort's own steps, one after the other (read and preprocess, network,
  map back and write with the QC mosaic);
- pipelined: ``cohort.run.participant`` as ``meshchop bids`` runs it, reading ahead and
  writing behind in threads while the network runs.

The sequential run also counts the CPU seconds of each stage (all threads): unlike the wall
times, they do not change when other work shares the machine. With the network using every
core, the pipelined run cannot take less than (network + the rest) / network of the network's
time, and takes about that when the threads share the cores evenly.

Run from the repository root (MESHCHOP_MIRROR must hold the sample scan and the model)::

    python bench/bench_bids.py --images 3 --grid 160 --rounds 2
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np


def dataset(root: Path, n: int) -> Path:
    from napari_meshchop.network import registry

    scan = nib.load(registry.fetch(registry.SAMPLE_SCAN))
    root.mkdir(parents=True)
    (root / "dataset_description.json").write_text(json.dumps(
        {"Name": "bench", "BIDSVersion": "1.10.0"}))
    psr = nib.orientations.ornt_transform(nib.orientations.io_orientation(scan.affine),
                                          nib.orientations.axcodes2ornt("PSR"))
    for i in range(n):
        img = scan
        if i % 3 == 1:
            img = scan.as_reoriented(psr)
        elif i % 3 == 2:
            moved = scan.affine.copy()
            moved[0, 3] += 12.0
            img = nib.Nifti1Image(np.asarray(scan.dataobj), moved)
        path = root / f"sub-{i + 1:02d}" / "anat" / f"sub-{i + 1:02d}_T2w.nii.gz"
        path.parent.mkdir(parents=True)
        nib.save(img, path)
    return root


def model(path: Path, grid: int) -> Path:
    from napari_meshchop.imaging.preprocess import PreprocessSpec
    from napari_meshchop.network import checkpoint, registry

    ckpt = checkpoint.load(registry.fetch(registry.DEFAULT_MODEL))
    ckpt.preprocess = PreprocessSpec("ras-minmax", shape=(grid,) * 3, voxel_size=256 / grid)
    return ckpt.save(path)


def network_alone(cohort, segmenter) -> float:
    from napari_meshchop import events
    from napari_meshchop.cohort import run

    seconds = 0.0
    for image in cohort.images:
        volume = run.load(image, segmenter).prepared.volume
        start = time.perf_counter()
        events.run(segmenter.predict(volume))
        seconds += time.perf_counter() - start
    return seconds


def sequential(cohort, segmenter, out: Path) -> tuple[float, dict]:
    """The cohort's steps one after another: the wall time, and the CPU seconds (all the
    process's threads) of each stage, which other load on the machine does not change."""
    from napari_meshchop import events
    from napari_meshchop.cohort import run

    cpu = {"read": 0.0, "network": 0.0, "write": 0.0}
    start = time.perf_counter()
    for image in cohort.images:
        t = time.process_time()
        loaded = run.load(image, segmenter)
        cpu["read"] += time.process_time() - t
        t = time.process_time()
        output = events.run(segmenter.predict(loaded.prepared.volume))
        cpu["network"] += time.process_time() - t
        t = time.process_time()
        run.write(loaded, output, out, segmenter.settings, segmenter.device.type)
        cpu["write"] += time.process_time() - t
    return time.perf_counter() - start, cpu


def pipelined(cohort, options, out: Path) -> tuple[float, list]:
    from napari_meshchop import events
    from napari_meshchop.cohort import run

    start = time.perf_counter()
    result = events.run(run.participant(cohort, out, options))
    return time.perf_counter() - start, result.records


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=3)
    p.add_argument("--grid", type=int, default=160, help="network grid N^3 (default 160)")
    p.add_argument("--rounds", type=int, default=1, help="repeat the three timings; the "
                   "fastest of each is compared (other load only ever adds time)")
    args = p.parse_args()
    import torch

    from napari_meshchop.cohort import find, run

    work = Path(tempfile.mkdtemp(prefix="meshchop-bench-bids-"))
    try:
        cohort = find.bids_images(dataset(work / "bids", args.images))
        options = run.Options((str(model(work / "model.pt", args.grid)),), "cpu")
        segmenter = run.Segmenter(options)
        alone, seqs, pipes = [network_alone(cohort, segmenter)], [], []
        for r in range(args.rounds):
            seconds, cpu = sequential(cohort, segmenter, work / f"sequential{r}")
            seqs.append(seconds)
            seconds, records = pipelined(cohort, options, work / f"pipelined{r}")
            pipes.append(seconds)
            assert all(rec.ok for rec in records), records
            alone.append(network_alone(cohort, segmenter))
        n = args.images
        print(f"{n} images, network grid {args.grid}^3, torch threads "
              f"{torch.get_num_threads()}, {args.rounds} round(s)")
        print("network alone: " + ", ".join(f"{s:.1f}" for s in alone) + " s")
        print("sequential:    " + ", ".join(f"{s:.1f}" for s in seqs) + " s")
        print("pipelined:     " + ", ".join(f"{s:.1f}" for s in pipes) + " s")
        for r in range(args.rounds):  # each against the mean of the passes around it
            base = (alone[r] + alone[r + 1]) / 2
            print(f"round {r + 1}: sequential {seqs[r] / base:.3f} x, pipelined "
                  f"{pipes[r] / base:.3f} x the network alone")
        best = min(alone)
        print(f"fastest: network alone {best:.1f} s ({best / n:.1f} s an image); sequential "
              f"{min(seqs) / best:.3f} x; pipelined {min(pipes) / best:.3f} x (target <= 1.1)")
        other = cpu["read"] + cpu["write"]
        print(f"CPU seconds an image (last round): read and preprocess {cpu['read'] / n:.2f}, "
              f"network {cpu['network'] / n:.1f}, map back and write {cpu['write'] / n:.2f}: "
              f"the work besides the network is {other / cpu['network']:.3f} of the network's")
        print("lesion mL: " + ", ".join(f"{r.measures.lesion_ml:.1f}" for r in records))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
