"""Peak memory of fine-tuning MeshNet-26 on 256^3 pairs with 128^3 crops, on the CPU.

Makes a small training set of synthetic 256^3 pairs (1 mm RAS grid: a bright head with a
darker lesion) with ``data.corrections.add``, then fine-tunes the pretrained MeshNet-26
(``meshnet26-arc-fold0``) on every pair for one epoch, as ``meshchop finetune --all`` runs it
(``training.finetune``: frozen BatchNorm, 128^3 crops, three of four centred on the
lesion), once with the lean step (fine-tuning's default) and once with plain autograd (the
baseline). Each run is its own process; its peak RSS is the kernel's account of it
(``wait4``), and "above baseline" the rise over the process's peak once imports are done.
Run from the repository root (the model from a local copy of the registry's files)::

    MESHCHOP_MIRROR=../shared/data python bench/bench_finetune.py --pairs 1 --modes on off
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODES = {"on": "lean", "off": "plain"}


def make_pairs(folder: Path, n: int, size: int) -> Path:
    import nibabel as nib
    import numpy as np

    from napari_meshchop.data import corrections
    from napari_meshchop.data.cache import ArcDataset
    from napari_meshchop.imaging.preprocess import PreprocessSpec

    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, size)] * 3, indexing="ij"))
    head = (grid**2).sum(0) < 0.7
    affine = np.diag([1.0, 1.0, 1.0, 1.0])
    affine[:3, 3] = -size / 2
    data = folder / "mine"
    rng = np.random.default_rng(0)
    for i in range(n):
        centre = np.array([-0.3, 0.1 * i, 0.0])[:, None, None, None]
        lesion = (((grid - centre) ** 2).sum(0) < 0.04) & head
        image = (600 * head - 250 * lesion + rng.normal(0, 20, head.shape)).clip(0)
        scan, mask = folder / f"sub-{i:02d}_T2w.nii.gz", folder / f"sub-{i:02d}_mask.nii.gz"
        nib.save(nib.Nifti1Image(image.astype(np.float32), affine), scan)
        nib.save(nib.Nifti1Image(lesion.astype(np.uint8), affine), mask)
        corrections.add(data, scan, mask)
    # Preprocessed once here (the pretrained model's grid), so that steps time only steps.
    dataset = ArcDataset(data, spec=PreprocessSpec("ras-minmax", shape=(size,) * 3))
    for i in range(len(dataset)):
        dataset[i]
    return data


def worker(mode: str, data: str, out: str, crop: int) -> dict:
    from napari_meshchop import events
    from napari_meshchop.events import Notice
    from napari_meshchop.network.registry import DEFAULT_MODEL
    from napari_meshchop.training.finetune import finetune, finetune_config
    from napari_meshchop.training.loop import Step

    config = finetune_config(DEFAULT_MODEL, data, None, epochs=1, crop=crop, device="cpu",
                             activation_checkpointing=mode)
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    times, last = [], [time.perf_counter()]

    def on_event(event):
        if isinstance(event, Notice):  # the last one comes just before the first step
            last[0] = time.perf_counter()
        elif isinstance(event, Step):
            now = time.perf_counter()
            times.append(now - last[0])
            last[0] = now

    events.run(finetune(config, out), on_event)
    return {"baseline_mb": baseline, "step_seconds": times}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--pairs", type=int, default=1, help="training pairs (one step each)")
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--crop", type=int, default=128)
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES,
                   help="--activation-checkpointing: on (lean) and off (plain)")
    p.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(*args.worker, args.crop)))
        return
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data = make_pairs(Path(tmp), args.pairs, args.size)
        for mode in args.modes:
            command = [sys.executable, __file__, "--crop", str(args.crop), "--worker", mode,
                       str(data), str(Path(tmp) / f"run-{mode}")]
            proc = subprocess.Popen(command, stdout=subprocess.PIPE, text=True,
                                    env={**os.environ, "PYTHONUNBUFFERED": "1"})
            out = proc.stdout.read()
            _, status, usage = os.wait4(proc.pid, 0)
            if os.waitstatus_to_exitcode(status):
                raise SystemExit(f"{mode}: the fine-tuning run failed")
            result = json.loads(out.strip().splitlines()[-1])
            peak = usage.ru_maxrss / 1024
            rows.append((mode, peak, peak - result["baseline_mb"],
                         sum(result["step_seconds"]) / len(result["step_seconds"])))
            print(f"{MODES[mode]}: peak {peak:.0f} MB, step {rows[-1][3]:.1f} s",
                  file=sys.stderr)
    base = rows[-1] if len(rows) > 1 else rows[0]
    print(f"| crop | step | peak RSS (MB) | above baseline (MB) | step time (s) | "
          f"peak vs {MODES[base[0]]} | time vs {MODES[base[0]]} |")
    print("|---:|---|---:|---:|---:|---:|---:|")
    for mode, peak, above, seconds in rows:
        print(f"| {args.crop}^3 | {MODES[mode]} | {peak:.0f} | {above:.0f} | {seconds:.1f} | "
              f"{peak / base[1]:.2f}x | {seconds / base[3]:.2f}x |")


if __name__ == "__main__":
    main()
