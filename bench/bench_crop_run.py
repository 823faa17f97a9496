"""Peak memory of a whole `meshchop train` run on 256^3 data with random crops.

Builds a small cohort (tests/arc_replica.py: a few sessions laid out like the ARC dataset on
the hub), downloads it with `meshchop download`, makes 2 x 2 folds, and runs `meshchop train`
with the conform preprocessing (every pair on the 256^3, 1 mm grid), ``--crop`` and one
inner fold: training steps on crops, validation on whole 256^3 volumes. Each run is its own
process; its peak RSS is read from the kernel's accounting of the waited-for child. Run
from the repository root::

    python bench/bench_crop_run.py --crop 128 --channels 26 --modes auto on
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def meshchop(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "napari_meshchop.cli", *args], check=True,
                   capture_output=True)


def peak_of(command: list[str], quiet: bool = False) -> tuple[float, float]:
    """(peak RSS in MB, seconds) of a child process, via wait4's resource usage."""
    start = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL if quiet else None)
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status):
        raise SystemExit(f"{' '.join(command)} failed")
    return usage.ru_maxrss / 1024, time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--crop", type=int, default=128)
    p.add_argument("--channels", type=int, default=26)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--modes", nargs="+", default=["auto", "on"],
                   help="--activation-checkpointing values to run")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        subprocess.run([sys.executable, str(ROOT / "tests" / "arc_replica.py"),
                        str(tmp / "replica")], check=True, capture_output=True)
        meshchop("download", "--repo", str(tmp / "replica"), "--data-dir", str(tmp / "arc"),
                 "--no-folds", "-q")
        meshchop("folds", "--data-dir", str(tmp / "arc"), "--outer-folds", "2",
                 "--inner-folds", "2")
        print("| crop | --activation-checkpointing | peak RSS (MB) | run time (s) |")
        print("|---:|---|---:|---:|")
        for mode in args.modes:
            mb, seconds = peak_of([
                sys.executable, "-m", "napari_meshchop.cli", "train", "--data-dir",
                str(tmp / "arc"), "--outer-fold", "0", "--inner-fold", "0", "--preprocess",
                "conform", "--crop", str(args.crop), "--channels", str(args.channels),
                "--epochs", str(args.epochs), "--device", "cpu", "--activation-checkpointing",
                mode, "--out", str(tmp / f"run-{mode}"), "-q"], quiet=True)
            print(f"| {args.crop}^3 | {mode} | {mb:.0f} | {seconds:.0f} |", flush=True)


if __name__ == "__main__":
    main()
