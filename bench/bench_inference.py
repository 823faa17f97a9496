"""Time and peak memory of one MeshNet forward pass: our inference path against a plain one.

The baseline is MeshNet as arc-meshchop runs it: an ``nn.Sequential`` of
Conv3d -> BatchNorm3d -> ReLU blocks, float32, default (NCDHW) memory layout,
``torch.no_grad``. Each measurement runs in a fresh process, so peak RSS
(``ru_maxrss``) belongs to that pass alone; the two paths alternate to share the
machine's noise. Run from the repository root::

    python bench/bench_inference.py --sizes 128 256 --repeats 2
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time


def plain_meshnet(channels: int = 26, dilations=(1, 2, 4, 8, 16, 16, 8, 4, 2)):
    from torch import nn

    layers, c_in = [], 1
    for d in dilations:
        layers += [nn.Conv3d(c_in, channels, 3, padding=d, dilation=d),
                   nn.BatchNorm3d(channels), nn.ReLU()]
        c_in = channels
    layers.append(nn.Conv3d(channels, 2, 1))
    return nn.Sequential(*layers).eval()


def worker(path: str, size: int) -> dict:
    import numpy as np
    import torch

    from napari_meshchop.network.inference import FusedMeshNet
    from napari_meshchop.network.model import MeshNet

    torch.manual_seed(0)
    volume = np.random.default_rng(0).random((size,) * 3, dtype=np.float32)
    if path == "plain":
        model = plain_meshnet()
        x = torch.from_numpy(volume)[None, None]
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        start = time.perf_counter()
        with torch.no_grad():
            out = torch.softmax(model(x), dim=1)[0, 1].numpy()
    else:
        fused = FusedMeshNet(MeshNet().eval())
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        start = time.perf_counter()
        job = fused.lesion_probability(volume)
        while True:
            try:
                next(job)
            except StopIteration as done:
                out = done.value
                break
    seconds = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    assert out.shape == (size,) * 3
    return {"seconds": seconds, "peak_mb": (after - before) / 1024, "threads": torch.get_num_threads()}


def measure(path: str, size: int) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--worker", path, "--sizes", str(size)],
                          capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[128, 256])
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--worker", choices=["plain", "ours"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.sizes[0])))
        return
    activation_mb = {s: s**3 * 26 * 4 / 2**20 for s in args.sizes}
    print("| volume | plain s | ours s | time ratio | plain peak MB | ours peak MB | memory ratio "
          "| ours peak / one activation |")
    print("|---|---|---|---|---|---|---|---|")
    for size in args.sizes:
        runs = {"plain": [], "ours": []}
        for _ in range(args.repeats):
            for path in runs:
                runs[path].append(measure(path, size))
        t = {k: statistics.median(r["seconds"] for r in v) for k, v in runs.items()}
        m = {k: max(r["peak_mb"] for r in v) for k, v in runs.items()}
        print(f"| {size}^3 | {t['plain']:.1f} | {t['ours']:.1f} | {t['ours'] / t['plain']:.2f} "
              f"| {m['plain']:.0f} | {m['ours']:.0f} | {m['ours'] / m['plain']:.2f} "
              f"| {m['ours'] / activation_mb[size]:.2f} |", flush=True)


if __name__ == "__main__":
    main()
