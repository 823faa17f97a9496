"""MeshNet-26 inference against the machine's matmul, a whole-volume pass and a plain model.

Paths (each measurement in a fresh process, so that its peak RSS is that pass's alone; the
paths alternate within each repeat to share the machine's noise):

- ``plain``: MeshNet as arc-meshchop runs it (``MeshNet.forward``): Conv3d, BatchNorm3d and
  ReLU (in place) a block, float32, NCDHW, ``torch.no_grad``, then a softmax.
- ``whole``: BatchNorm folded, channels last, one whole-volume ``conv3d`` + in-place ReLU a
  layer (``FusedMeshNet``'s generic path with one slab).
- ``previous``: the pass this project shipped before the oneDNN path: the same in slabs of
  32 planes into a fresh output a layer (the generic path, ``slab=32``).
- ``ours``: ``FusedMeshNet`` as ``meshchop segment`` runs it on the CPU (oneDNN, one
  activation buffer; ``--slabs`` tries other slab heights).

Each worker warms up (a 32^3 pass), measures a 4096^2 float32 matmul (best of 3) just
before and just after its pass, and reports the pass's GFLOP/s (27 taps x in x out x 2 per
voxel and layer, plus the head), its share of the mean of the two matmuls, and its peak
memory: the rise of the peak RSS over the RSS just before the pass (Linux: the peak is
reset there). From the repository root::

    python bench/bench_inference.py --sizes 160 256 --repeats 3
    python bench/bench_inference.py --segment --repeats 3

    python bench/bench_inference.py --air

``--segment`` times a whole ``meshchop segment`` of the sample scan (a fresh process, from
Python's start to the mask on disk) against the network pass alone as segment runs it (the
air around the head skipped), the pass on the whole grid, and the plain model, on the same
conformed volume. ``--air`` compares the pass that skips the air with the whole grid's on
the sample scan (as its checkpoint preprocesses it) and on the same scan tilted 20 degrees
and conformed: time, and the masks' Dice.

The random volumes of the network table fill the grid, so no air is skipped there.

Wall time is what a user waits, but on a machine that others share it swings with their
load. ``--threads 1 --clock cpu`` times each pass and matmul by the process's CPU time on
one thread instead, which other processes disturb far less (only through the caches and
memory bandwidth they share).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
PATHS = ("plain", "whole", "previous", "ours")
CHANNELS, DILATIONS = 26, (1, 2, 4, 8, 16, 16, 8, 4, 2)


def flops_per_voxel(channels: int = CHANNELS, dilations=DILATIONS) -> int:
    widths = [1] + [channels] * len(dilations)
    return sum(27 * a * b * 2 for a, b in zip(widths[:-1], widths[1:])) + channels * 2 * 2


def clock():
    """Wall time; with ``--clock cpu``, this process's CPU time (see the module's notes)."""
    return time.process_time() if os.environ.get("BENCH_CLOCK") == "cpu" else time.perf_counter()


def matmul_gflops(n: int = 4096) -> float:
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = float("inf")
    for _ in range(3):
        start = clock()
        a @ b
        best = min(best, clock() - start)
    return 2 * n**3 / best / 1e9


def _status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def reset_peak_rss() -> int:
    """Reset the process's peak RSS to its current RSS (Linux: clear_refs 5); return it."""
    Path("/proc/self/clear_refs").write_text("5")
    return _status_bytes("VmRSS")


def peak_rss() -> int:
    return _status_bytes("VmHWM")


def centre(volume, edge: int = 32):
    """The volume's central ``edge``^3 block: a warm-up that is not all air (a corner of a
    scan is, and a pass that skips the air would then skip the network too)."""
    lo = [(n - edge) // 2 for n in volume.shape]
    return volume[tuple(slice(a, a + edge) for a in lo)]


def make_pass(path: str, slab: int | None, size: int, model=None):
    """A function volume -> P(lesion) for one path, its weights ready (MeshNet-26, random
    unless ``model`` is given)."""
    import torch

    from napari_meshchop.events import run
    from napari_meshchop.network.fused import FusedMeshNet
    from napari_meshchop.network.model import MeshNet

    model = model if model is not None else MeshNet().eval()
    if path == "plain":  # MeshNet's own forward: Conv3d, BatchNorm3d, ReLU(inplace), NCDHW
        def plain(volume):
            with torch.no_grad():
                return torch.softmax(model(torch.from_numpy(volume)[None, None]), 1)[0, 1].numpy()
        return plain
    fused = FusedMeshNet(model, "cpu", slab={"whole": size, "previous": 32}.get(path, slab),
                         skip_air=path != "grid")
    if path not in ("ours", "grid"):
        fused.onednn = False  # the generic path: conv3d a layer (whole, or slabs of 32)
    return lambda volume: run(fused.lesion_probability(volume))


def worker(path: str, size: int, slab: int | None) -> dict:
    import numpy as np
    import torch

    torch.manual_seed(0)
    volume = np.random.default_rng(0).random((size,) * 3, dtype=np.float32)
    make_pass(path, slab, 32)(centre(volume))  # warm-up: libraries, threads
    forward = make_pass(path, slab, size)
    before_mm = matmul_gflops()
    base = reset_peak_rss()
    start = clock()
    out = forward(volume)
    seconds = clock() - start
    peak = peak_rss()
    after_mm = matmul_gflops()
    assert out.shape == (size,) * 3 and np.isfinite(out).all()
    gflops = size**3 * flops_per_voxel() / seconds / 1e9
    matmul = (before_mm + after_mm) / 2
    return {"seconds": seconds, "gflops": gflops, "matmul": matmul, "share": gflops / matmul,
            "peak_mb": (peak - base) / 2**20, "threads": torch.get_num_threads()}


def measure(*args: str) -> dict:
    proc = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True,
                          check=True, env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    return json.loads(proc.stdout.strip().splitlines()[-1])


def load_average() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def network_table(sizes, repeats, paths, slabs) -> None:
    runs = [(p, None) for p in paths if p != "ours"] + [("ours", s) for s in slabs]
    print(f"load average before: {load_average()}")
    print("| volume | path | seconds | GFLOP/s | matmul GFLOP/s | share of matmul | time vs plain "
          "| peak MB | peak / one activation |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for size in sizes:
        results = {r: [] for r in runs}
        for _ in range(repeats):
            for path, slab in runs:
                extra = ["--slab", str(slab)] if slab else []
                results[path, slab].append(measure("--worker", path, "--size", str(size), *extra))
        activation_mb = size**3 * CHANNELS * 4 / 2**20
        plain = statistics.median(r["seconds"] for r in results.get(("plain", None), [])) \
            if ("plain", None) in results else None
        for (path, slab), rs in results.items():
            med = {k: statistics.median(r[k] for r in rs) for k in ("seconds", "gflops",
                                                                   "matmul", "share")}
            peak = max(r["peak_mb"] for r in rs)
            name = path + (f" (slab {slab})" if slab else "")
            ratio = f"{med['seconds'] / plain:.2f}" if plain else "-"
            spread = "/".join(f"{r['share']:.0%}" for r in rs)
            print(f"| {size}^3 | {name} | {med['seconds']:.1f} | {med['gflops']:.0f} "
                  f"| {med['matmul']:.0f} | {med['share']:.0%} ({spread}) | {ratio} "
                  f"| {peak:.0f} | {peak / activation_mb:.2f} |", flush=True)
    print(f"threads: {rs[0]['threads']}; load average after: {load_average()}")


def sample_worker(path: str) -> dict:
    """The network pass alone on the conformed sample scan: ``ours`` (as segment runs it),
    ``grid`` (ours on the whole grid) or ``plain``."""
    import nibabel as nib

    from napari_meshchop.imaging.preprocess import prepare
    from napari_meshchop.network import checkpoint

    ckpt = checkpoint.load(SHARED / "arc-meshchop_meshnet26_fold0_restart0.pt")
    volume = prepare(nib.load(SHARED / "sub-M2265_T2w.nii.gz"), ckpt.preprocess).volume
    make_pass(path, None, 32)(centre(volume))  # warm-up
    forward = make_pass(path, None, volume.shape[0], ckpt.build().eval())
    start = time.perf_counter()
    forward(volume)
    return {"seconds": time.perf_counter() - start}


def segment_table(repeats: int) -> None:
    print(f"load average before: {load_average()}")
    meshchop = Path(sys.executable).with_name("meshchop")
    env = {**os.environ, "MESHCHOP_MIRROR": str(SHARED), "PYTHONPATH": str(ROOT / "src")}
    times = {"segment": [], "ours": [], "grid": [], "plain": []}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(repeats):
            start = time.perf_counter()
            subprocess.run([str(meshchop), "segment", str(SHARED / "sub-M2265_T2w.nii.gz"),
                            "-o", f"{tmp}/mask.nii.gz", "--device", "cpu", "-q"],
                           check=True, env=env, capture_output=True)
            times["segment"].append(time.perf_counter() - start)
            for path in ("ours", "grid", "plain"):
                times[path].append(measure("--sample-worker", path)["seconds"])
    med = {k: statistics.median(v) for k, v in times.items()}
    print("| what | seconds (median) | runs | vs the network pass alone | vs the plain model |")
    print("|---|---:|---|---:|---:|")
    for name, key in (("`meshchop segment` (fresh process, file to file)", "segment"),
                      ("network pass alone, as segment runs it (air skipped)", "ours"),
                      ("network pass alone, whole grid", "grid"),
                      ("plain model pass (whole grid)", "plain")):
        runs = ", ".join(f"{t:.1f}" for t in times[key])
        print(f"| {name} | {med[key]:.1f} | {runs} | {med[key] / med['ours']:.2f} "
              f"| {med[key] / med['plain']:.2f} |")
    print(f"load average after: {load_average()}")


def air_table() -> None:
    """The pass that skips the air against the whole grid's, in this process."""
    import nibabel as nib
    import numpy as np

    from napari_meshchop.imaging.preprocess import prepare
    from napari_meshchop.imaging.spec import PreprocessSpec
    from napari_meshchop.network import checkpoint
    from napari_meshchop.network.fused import FusedMeshNet, scanned_box

    ckpt = checkpoint.load(SHARED / "arc-meshchop_meshnet26_fold0_restart0.pt")
    img = nib.load(SHARED / "sub-M2265_T2w.nii.gz")
    turn = np.eye(4)
    t = np.deg2rad(20)
    turn[1:3, 1:3] = [[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]]
    tilted = nib.Nifti1Image(np.asanyarray(img.dataobj), turn @ img.affine)
    cases = {f"sample scan ({ckpt.preprocess.name})": prepare(img, ckpt.preprocess).volume,
             "sample tilted 20 degrees (conform)":
                 prepare(tilted, PreprocessSpec("conform")).volume}
    print(f"load average before: {load_average()}")
    print("| volume | box / grid | whole grid s | air skipped s | time ratio | lesion voxels "
          "| voxels that differ | Dice | largest P difference |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    model = ckpt.build().eval()
    for name, volume in cases.items():
        make_pass("ours", None, 32, model)(centre(volume))  # warm-up
        grid, skip = make_pass("grid", None, 256, model), make_pass("ours", None, 256, model)
        start = time.perf_counter()
        whole = grid(volume)
        t_grid = time.perf_counter() - start
        start = time.perf_counter()
        got = skip(volume)
        t_skip = time.perf_counter() - start
        box = scanned_box(volume, FusedMeshNet(model).margin)
        share = np.prod([b.stop - b.start for b in box]) / volume.size if box else 1.0
        a, b = got > 0.5, whole > 0.5
        dice = 2 * (a & b).sum() / max(a.sum() + b.sum(), 1)
        print(f"| {name} | {share:.2f} | {t_grid:.1f} | {t_skip:.1f} | {t_skip / t_grid:.2f} "
              f"| {b.sum()} | {(a ^ b).sum()} | {dice:.5f} | {np.abs(got - whole).max():.3f} |",
              flush=True)
    print(f"load average after: {load_average()}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[160, 256])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--paths", nargs="+", choices=PATHS, default=list(PATHS))
    p.add_argument("--slabs", type=int, nargs="+", default=[0],
                   help="slab heights for 'ours' (0: its default)")
    p.add_argument("--segment", action="store_true", help="time a whole `meshchop segment`")
    p.add_argument("--air", action="store_true",
                   help="the pass that skips the air against the whole grid's")
    p.add_argument("--threads", type=int, default=os.cpu_count(),
                   help="PyTorch's threads (default: all the machine's cores)")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="cpu: time each pass and matmul by this process's CPU time "
                   "(meant for --threads 1, on a machine that others share)")
    p.add_argument("--worker", choices=PATHS, help=argparse.SUPPRESS)
    p.add_argument("--sample-worker", choices=("ours", "grid", "plain"), help=argparse.SUPPRESS)
    p.add_argument("--size", type=int, help=argparse.SUPPRESS)
    p.add_argument("--slab", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if not (args.worker or args.sample_worker):  # settings the workers inherit
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
        os.environ["BENCH_CLOCK"] = args.clock
        if args.clock == "cpu":
            os.environ["OMP_WAIT_POLICY"] = "PASSIVE"  # idle threads sleep, not spin
    if args.worker:
        print(json.dumps(worker(args.worker, args.size, args.slab)))
    elif args.sample_worker:
        print(json.dumps(sample_worker(args.sample_worker)))
    elif args.segment:
        segment_table(args.repeats)
    elif args.air:
        air_table()
    else:
        network_table(args.sizes, args.repeats, args.paths, [s or None for s in args.slabs])


if __name__ == "__main__":
    main()
