"""The core imports without napari, Qt or magicgui: only napari_meshchop.plugin may need them."""

import json
import os
import subprocess
import sys

from conftest import ROOT

# Run in a fresh interpreter: the test session itself has napari and Qt loaded.
PROBE = r"""
import importlib, importlib.abc, json, pkgutil, sys

GUI = {"napari", "qtpy", "PyQt5", "PyQt6", "PySide2", "PySide6", "magicgui", "superqt",
       "vispy"}

class NoGui(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in GUI:
            raise ImportError(f"{name} is not importable in this test", name=name)
        return None

sys.meta_path.insert(0, NoGui())

import napari_meshchop

def core(name):
    parts = name.split(".")
    return parts[1:2] != ["plugin"] and parts[1:] != ["cli", "__main__"]

names = [m.name for m in pkgutil.walk_packages(napari_meshchop.__path__, "napari_meshchop.")]
needs = {}
for name in ["napari_meshchop", *names]:
    if core(name):
        try:
            importlib.import_module(name)
        except ImportError as exc:
            needs[name] = str(exc)
try:  # the blocker works: a widget module does need Qt
    importlib.import_module("napari_meshchop.plugin.widgets.segment")
    blocked = False
except ImportError:
    blocked = True
print(json.dumps({"imported": [n for n in names if core(n)], "needs_gui": needs,
                  "blocker_works": blocked,
                  "gui_loaded": sorted(m for m in sys.modules if m.partition(".")[0] in GUI)}))
"""


def test_core_modules_import_without_napari_qt_or_magicgui():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(ROOT / "src"), *filter(None, [os.environ.get("PYTHONPATH")])])}
    proc = subprocess.run([sys.executable, "-c", PROBE], check=False, capture_output=True,
                          text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    assert seen["blocker_works"] and not seen["gui_loaded"], seen
    # pkgutil walked the whole package, so a new core module is covered without a list here.
    for expected in ("napari_meshchop.events", "napari_meshchop.imaging.conform",
                     "napari_meshchop.network.inference", "napari_meshchop.training.lean",
                     "napari_meshchop.studies.engine", "napari_meshchop.cli"):
        assert expected in seen["imported"], seen["imported"]
    assert seen["needs_gui"] == {}, "core modules that need napari, Qt or magicgui:\n" + "\n".join(
        f"  {name}: {why}" for name, why in seen["needs_gui"].items())
