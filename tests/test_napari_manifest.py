"""napari.yaml: valid, installed with the package (wheel and editable), all ids ours."""

from __future__ import annotations

import importlib
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml
from npe2 import PluginManifest

ROOT = Path(__file__).resolve().parents[1]
MANIFEST = ROOT / "napari.yaml"


def test_manifest_is_valid_and_every_command_imports():
    manifest = PluginManifest.from_file(MANIFEST)
    assert manifest.name == "napari-meshchop"
    manifest.validate_imports()
    for command in manifest.contributions.commands:
        assert command.id.startswith("napari-meshchop.")
        module, name = command.python_name.split(":")
        assert callable(getattr(importlib.import_module(module), name))


def test_npe2_validate_command():
    npe2 = Path(sys.executable).with_name("npe2")
    run = subprocess.run([str(npe2), "validate", "napari-meshchop"], capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "valid" in run.stdout


def test_editable_install_resolves_the_top_level_manifest():
    link = ROOT / "src" / "napari_meshchop" / "napari.yaml"
    assert link.is_symlink() and os.readlink(link) == "../../napari.yaml"
    installed = PluginManifest.from_distribution("napari-meshchop")
    assert installed == PluginManifest.from_file(MANIFEST)


def test_dash_w_opens_the_widgets(make_napari_viewer):
    """What ``napari -w napari-meshchop [__all__]`` does once the viewer is up."""
    from napari.plugins import _npe2

    from napari_meshchop.plugin.widgets.segment import SegmentWidget

    viewer = make_napari_viewer()  # napari discovers the plugins here
    assert _npe2.get_widget_contribution("napari-meshchop")  # -w stops early without one
    names = [w.display_name for w in PluginManifest.from_file(MANIFEST).contributions.widgets]
    opened = {name: viewer.window.add_plugin_dock_widget("napari-meshchop", name, tabify=True)[1]
              for name in names}  # __all__
    assert isinstance(opened["Segment stroke lesion"], SegmentWidget)
    _, first = viewer.window.add_plugin_dock_widget("napari-meshchop")  # no name: the first
    assert first is opened[names[0]]


@pytest.mark.slow
def test_wheel_carries_the_manifest(tmp_path):
    """``pip install .`` gets the real file, not a dangling link (offline, no isolation)."""
    tree = tmp_path / "tree"
    for name in ("pyproject.toml", "README.md", "napari.yaml"):
        tree.mkdir(exist_ok=True)
        shutil.copy(ROOT / name, tree / name)
    shutil.copytree(ROOT / "src", tree / "src", symlinks=True,
                    ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]
    env = {**os.environ, "PIP_NO_INDEX": "1"}
    build = subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w",
                            str(tmp_path / "dist"), str(tree)],
                           capture_output=True, text=True, timeout=300, env=env)
    assert build.returncode == 0, build.stdout + build.stderr
    (wheel,) = (tmp_path / "dist").glob("napari_meshchop-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        assert zf.read("napari_meshchop/napari.yaml") == MANIFEST.read_bytes()
        (entry_points,) = [n for n in zf.namelist() if n.endswith("entry_points.txt")]
        assert "napari-meshchop = napari_meshchop:napari.yaml" in zf.read(entry_points).decode()

    site = tmp_path / "site"
    install = subprocess.run([*pip, "install", "--no-deps", "--target", str(site), str(wheel)],
                             capture_output=True, text=True, timeout=300, env=env)
    assert install.returncode == 0, install.stdout + install.stderr
    probe = ("import npe2, napari_meshchop; "
             "m = npe2.PluginManifest.from_distribution('napari-meshchop'); "
             "print(napari_meshchop.__file__); print(m.yaml())")
    found = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                           timeout=120, env={**env, "PYTHONPATH": str(site)})
    assert found.returncode == 0, found.stderr
    where, text = found.stdout.split("\n", 1)
    assert Path(where).is_relative_to(site)
    assert yaml.safe_load(text)["contributions"]["widgets"] == yaml.safe_load(
        MANIFEST.read_text())["contributions"]["widgets"]
