"""The ONNX export at 256^3: onnxruntime against our fused PyTorch pass on the real scan.

Both run the pretrained MeshNet-26 on the sample scan's network-grid volume (its own
preprocessing), each in a fresh process so that peak RSS (``ru_maxrss``) belongs to that
pass alone, alternating to share the machine's noise, with the same number of threads.
Reports time, the rise of peak memory over the level before the pass, the largest
difference in P(lesion) over all 16.8 million voxels and the Dice of the two masks
(P > 0.5). Run from the repository root, with ../shared/data beside it::

    python bench/bench_export.py --repeats 2
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
SCAN = DATA / "sub-M2265_T2w.nii.gz"
CHECKPOINT = DATA / "arc-meshchop_meshnet26_fold0_restart0.pt"


def worker(path: str, onnx_file: str, out: str) -> dict:
    import nibabel as nib
    import numpy as np
    import torch

    from napari_meshchop import events
    from napari_meshchop.imaging.preprocess import prepare
    from napari_meshchop.network import checkpoint
    from napari_meshchop.network.inference import FusedMeshNet
    from napari_meshchop.network.onnx_predictor import OnnxMeshNet

    ckpt = checkpoint.load(CHECKPOINT)
    volume = prepare(nib.load(SCAN), ckpt.preprocess).volume
    predictor = FusedMeshNet(ckpt.build()) if path == "ours" else OnnxMeshNet(onnx_file)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    prob = events.run(predictor.lesion_probability(volume))
    seconds = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    np.save(out, prob)
    return {"seconds": seconds, "peak_mb": (after - before) / 1024,
            "threads": torch.get_num_threads()}


def measure(path: str, onnx_file: Path, out: Path) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--worker", path, "--onnx", str(onnx_file),
                           "--out", str(out)], capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--worker", choices=["ours", "onnxruntime"], help=argparse.SUPPRESS)
    p.add_argument("--onnx", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.onnx, args.out)))
        return
    import numpy as np

    from napari_meshchop.network.export.bundle import export

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        export(CHECKPOINT, "onnx", tmp / "onnx")
        onnx_file = tmp / "onnx" / "model.onnx"
        runs = {"ours": [], "onnxruntime": []}
        for _ in range(args.repeats):
            for path, found in runs.items():
                found.append(measure(path, onnx_file, tmp / f"{path}.npy"))
        ours, theirs = np.load(tmp / "ours.npy"), np.load(tmp / "onnxruntime.npy")
    a, b = ours > 0.5, theirs > 0.5
    dice = 2 * np.logical_and(a, b).sum() / (a.sum() + b.sum())
    t = {k: statistics.median(r["seconds"] for r in v) for k, v in runs.items()}
    m = {k: max(r["peak_mb"] for r in v) for k, v in runs.items()}
    print(f"threads: {runs['ours'][0]['threads']}, load average before: "
          f"{os.getloadavg()[0]:.1f}")
    print("| volume | ours s | onnxruntime s | time ratio | ours peak MB | onnxruntime peak MB "
          "| memory ratio | max abs diff P(lesion) | mask Dice | lesion voxels (ours) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    print(f"| 256^3 | {t['ours']:.1f} | {t['onnxruntime']:.1f} | "
          f"{t['onnxruntime'] / t['ours']:.2f} | {m['ours']:.0f} | {m['onnxruntime']:.0f} | "
          f"{m['onnxruntime'] / m['ours']:.2f} | {np.abs(ours - theirs).max():.2e} | "
          f"{dice:.6f} | {int(a.sum())} |")


if __name__ == "__main__":
    main()
