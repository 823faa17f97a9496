"""Start-up costs: ``meshchop --help``, and napari's start with the plugin installed or not.

Each measurement is a fresh process, timed from its start to its exit (wall clock), the
cases alternating. napari runs on the X display if there is one, else offscreen: the script
builds a ``napari.Viewer``, lets Qt process its events, closes it and reports which of our
modules and which heavy libraries got imported. "Without the plugin" hides this
package's distribution from ``importlib.metadata``, which is where npe2 discovers plugin
manifests: the same as not having it installed. From the repository root::

    xvfb-run -a python bench/bench_startup.py --repeats 5
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "scipy", "nibabel", "pooch", "optuna", "sqlalchemy", "datasets", "sklearn")

VIEWER = """
import importlib.metadata, json, sys
if {hide}:
    everything = importlib.metadata.distributions
    importlib.metadata.distributions = lambda **kw: (
        d for d in everything(**kw) if d.metadata["Name"] != "napari-meshchop")
import napari
viewer = napari.Viewer()
napari.qt.get_qapp().processEvents()
from npe2 import PluginManager
found = "napari-meshchop" in PluginManager.instance()._manifests
viewer.close()
ours = sorted(m for m in sys.modules if m.startswith("napari_meshchop"))
heavy = sorted(m for m in {heavy!r} if m in sys.modules)
print(json.dumps({{"found": found, "ours": ours, "heavy": heavy}}))
"""


def timed(cmd: list[str], env: dict) -> tuple[float, str]:
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
    return time.perf_counter() - start, proc.stdout


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    # A real display where there is one (``xvfb-run -a python bench/bench_startup.py``).
    platform = "xcb" if os.environ.get("DISPLAY") else "offscreen"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "QT_QPA_PLATFORM": platform}
    meshchop = str(Path(sys.executable).with_name("meshchop"))
    cases = {
        "python -c pass": [sys.executable, "-c", "pass"],
        "meshchop --help": [meshchop, "--help"],
        "napari viewer, plugin installed": [sys.executable, "-c",
                                            VIEWER.format(hide=False, heavy=HEAVY)],
        "napari viewer, plugin hidden": [sys.executable, "-c",
                                         VIEWER.format(hide=True, heavy=HEAVY)],
    }
    for cmd in cases.values():  # warm the page cache
        timed(cmd, env)
    times, reports = {name: [] for name in cases}, {}
    print(f"Qt platform: {platform}; load average before: "
          f"{' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    for _ in range(args.repeats):
        for name, cmd in cases.items():
            seconds, out = timed(cmd, env)
            times[name].append(seconds)
            if out.startswith("{"):
                reports[name] = json.loads(out)
    print("| process | median s | runs (s) |")
    print("|---|---:|---|")
    for name, ts in times.items():
        print(f"| {name} | {statistics.median(ts):.2f} | {', '.join(f'{t:.2f}' for t in ts)} |")
    with_, without = (statistics.median(times[f"napari viewer, plugin {k}"])
                      for k in ("installed", "hidden"))
    print(f"\nnapari start-up with the plugin minus without: {with_ - without:+.2f} s")
    for name, report in reports.items():
        print(f"{name}: manifest discovered: {report['found']}; our modules imported: "
              f"{report['ours'] or 'none'}; heavy libraries imported: {report['heavy'] or 'none'}")
    print(f"load average after: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
