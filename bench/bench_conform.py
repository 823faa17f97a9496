"""Time napari_meshchop's conform against ``niimath IN -conform OUT -odt char``.

Both sides are timed file to file: niimath as a fresh process per run (reading and
writing its files), ours as ``nib.load`` + ``conform`` + ``nib.save`` inside one warm
Python worker process (imports done before the clock starts, as in the napari plugin).
Peak RSS is each process's high-water mark (``ru_maxrss``); for ours it includes the
interpreter with numpy, scipy and nibabel loaded, reported separately as the baseline.
The parent stays lean (standard library only), because a child's ``ru_maxrss`` starts
from its parent's size at fork.

    python bench/bench_conform.py --repeats 5

prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _make_inputs(folder: str, ext: str) -> None:
    """Child process: write the 1 mm MNI152 template and an oblique 1 x 1 x 3 mm int16
    copy of it; print JSON {label: path}."""
    import nibabel as nib
    import numpy as np
    from nilearn import datasets

    mni = datasets.load_mni152_template(resolution=1)
    data = mni.get_fdata(dtype=np.float32)
    nz = data.shape[2] // 3 * 3
    thick = data[:, :, :nz].reshape(*data.shape[:2], -1, 3).mean(-1)
    affine = mni.affine @ np.diag([1.0, 1.0, 3.0, 1.0])
    affine[:3, 3] = mni.affine[:3, :3] @ [0, 0, 1] + mni.affine[:3, 3]
    t = np.deg2rad(15)
    rot = np.eye(4)
    rot[[0, 0, 2, 2], [0, 2, 0, 2]] = [np.cos(t), np.sin(t), -np.sin(t), np.cos(t)]
    oblique = nib.Nifti1Image(thick, rot @ affine)
    oblique.set_data_dtype(np.int16)  # nibabel stores it with scl_slope != 1
    paths = {
        f"MNI152 1 mm {mni.shape}": f"{folder}/mni1{ext}",
        f"oblique 15 deg 1x1x3 mm int16 {thick.shape}": f"{folder}/oblique{ext}",
    }
    for img, path in zip((mni, oblique), paths.values()):
        nib.save(img, path)
    print(json.dumps(paths))


def _run_niimath(niimath: str, src: Path, dst: Path, env: dict) -> tuple[float, int]:
    """Seconds and peak RSS (KiB) of one niimath process."""
    start = time.perf_counter()
    proc = subprocess.Popen([niimath, str(src), "-conform", str(dst), "-odt", "char"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"niimath failed on {src}")
    return seconds, usage.ru_maxrss


def _worker(src: str, dst: str, repeats: int) -> None:
    """Child process: time load + conform + save; print JSON with times and RSS."""
    import nibabel as nib

    from napari_meshchop.imaging.conform import conform

    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        nib.save(conform(nib.load(src)), dst)
        times.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"times": times, "baseline_kib": baseline, "peak_kib": peak}))


def _child(*args) -> dict:
    """Run this script in a child process and return the JSON it prints last."""
    out = subprocess.run([sys.executable, __file__, *map(str, args)], check=True,
                         capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="runs per image (default 5)")
    parser.add_argument("--ext", nargs="+", default=[".nii.gz", ".nii"],
                        help="file formats to time, for input and output alike")
    parser.add_argument("--niimath", default=None, help="niimath executable (default: found "
                        "on PATH or next to this Python)")
    parser.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    parser.add_argument("--make-inputs", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return _worker(args.worker[0], args.worker[1], int(args.worker[2]))
    if args.make_inputs:
        return _make_inputs(*args.make_inputs)

    beside = Path(sys.executable).parent / "niimath"
    niimath = args.niimath or shutil.which("niimath") or (str(beside) if beside.exists() else None)
    if niimath is None:
        parser.error("niimath not found; pass --niimath")
    # niimath decides the output format from FSLOUTPUTTYPE, not from the name.
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for ext in args.ext:
            env = {**os.environ, "FSLOUTPUTTYPE": "NIFTI_GZ" if ext.endswith(".gz") else "NIFTI"}
            for label, src in _child("--make-inputs", tmp, ext).items():
                theirs = [_run_niimath(niimath, src, folder / f"niimath{ext}", env)
                          for _ in range(args.repeats)]
                ours = _child("--worker", src, folder / f"ours{ext}", args.repeats)
                t_ours = statistics.median(ours["times"])
                t_theirs = statistics.median(t for t, _ in theirs)
                rows.append((label, ext, t_ours, t_theirs, t_ours / t_theirs,
                             ours["peak_kib"] / 1024, ours["baseline_kib"] / 1024,
                             max(rss for _, rss in theirs) / 1024))

    print(f"{args.repeats} runs each; median seconds, file to file; "
          f"{os.cpu_count()} CPUs; niimath: {niimath}\n")
    print("| image | files | ours (s) | niimath (s) | ours / niimath | ours peak RSS (MiB) "
          "| ours baseline RSS (MiB) | niimath peak RSS (MiB) |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for label, ext, t_ours, t_theirs, ratio, peak, base, theirs_rss in rows:
        print(f"| {label} | {ext} | {t_ours:.2f} | {t_theirs:.2f} | {ratio:.2f} | {peak:.0f} "
              f"| {base:.0f} | {theirs_rss:.0f} |")


if __name__ == "__main__":
    main()
