"""A session that never loses a result: a Segment run belongs to its widget and its image.

Closing the widget, removing the image or closing the viewer stops the run (the core checks
its stop flag slab by slab) and drops its result; time is reported as elapsed and left.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from napari_meshchop.errors import Cancelled
from napari_meshchop.events import Progress
from napari_meshchop.network.inference import FusedMeshNet
from napari_meshchop.network.model import Architecture, MeshNet
from napari_meshchop.plugin.widgets.feedback import Timer, clock
from napari_meshchop.plugin.widgets.segment import CHECKPOINT, SegmentWidget


@pytest.fixture(autouse=True)
def _isolated(isolated_settings):
    """QSettings in tmp_path (conftest)."""


@pytest.fixture
def tiny_model(tiny_checkpoint) -> Path:
    return tiny_checkpoint  # conftest's small untrained MeshNet


def _scan(tmp_path, name="scan") -> Path:
    rng = np.random.default_rng(0)
    path = tmp_path / f"{name}.nii.gz"
    nib.save(nib.Nifti1Image((rng.random((24, 26, 22)) * 100).astype(np.int16), np.eye(4)),
             path)
    return path


def _widget(viewer, model) -> SegmentWidget:
    _, widget = viewer.window.add_plugin_dock_widget("napari-meshchop", "Segment stroke lesion")
    widget._model.value = CHECKPOINT
    widget._checkpoint.value = model
    widget._device.value = "cpu"
    return widget


def _watch(widget) -> list:
    """What the running worker returns (nothing, when it was stopped)."""
    returned: list = []
    widget.worker.returned.connect(returned.append)
    return returned


def test_closing_the_widget_stops_its_run_and_drops_the_result(
        make_napari_viewer, qtbot, tiny_model, tmp_path):
    viewer = make_napari_viewer()
    viewer.open(str(_scan(tmp_path)), plugin="napari-meshchop")
    widget = _widget(viewer, tiny_model)
    widget.run()
    worker, returned = widget.worker, _watch(widget)
    viewer.window.remove_dock_widget(widget.native)  # what the dock's close button does
    qtbot.waitUntil(lambda: widget.worker is None, timeout=30_000)
    assert not worker.is_running and returned == []
    assert [layer.name for layer in viewer.layers] == ["scan"]
    assert widget._status.value.startswith("Stopped: the widget was closed")


def test_removing_the_image_stops_its_run_and_never_jumps_to_another(
        make_napari_viewer, qtbot, tiny_model, tmp_path):
    viewer = make_napari_viewer()
    (scan,) = viewer.open(str(_scan(tmp_path)), plugin="napari-meshchop")
    (other,) = viewer.open(str(_scan(tmp_path, "other")), plugin="napari-meshchop")
    widget = _widget(viewer, tiny_model)
    widget._image.value = scan
    widget.run()
    returned = _watch(widget)
    viewer.layers.remove(scan)
    assert widget._image.value is None and other in widget._image.choices
    qtbot.waitUntil(lambda: widget.worker is None, timeout=30_000)
    assert returned == [] and [layer.name for layer in viewer.layers] == ["other"]
    assert widget._status.value == "Stopped: 'scan' was removed; nothing will be added."
    assert widget._run.enabled  # ready for the next run, once an image is chosen


def test_closing_the_viewer_stops_the_run(make_napari_viewer, qtbot, tiny_model, tmp_path):
    viewer = make_napari_viewer()
    viewer.open(str(_scan(tmp_path)), plugin="napari-meshchop")
    widget = _widget(viewer, tiny_model)
    widget.run()
    worker, returned = widget.worker, _watch(widget)
    viewer.close()
    qtbot.waitUntil(lambda: not worker.is_running, timeout=30_000)
    assert returned == []


def test_the_network_checks_the_stop_flag_slab_by_slab():
    """A stop lands within a slab of one layer (about a second at 256^3 on a CPU), not
    at the end of the layer (ten seconds or more)."""
    torch.manual_seed(0)
    fused = FusedMeshNet(MeshNet(Architecture(channels=2, dilations=(1, 2))).eval(), slab=4)
    checks = itertools.count()
    stop = lambda: next(checks) >= 3  # noqa: E731 - the third check asks to stop
    job = fused.lesion_probability(np.ones((16, 8, 8), np.float32), stop)
    with pytest.raises(Cancelled):
        next(job)  # the first layer (4 slabs) is cut short: it never reports
    assert next(checks) == 4


def test_timer_reports_elapsed_and_time_left_from_the_stage_steps():
    now = [100.0]
    timer = Timer("network", now=lambda: now[0])
    now[0] = 104.0
    assert timer.update(Progress("preprocess", 1, 13)) == "0:04 elapsed"
    now[0] = 110.0
    assert timer.update(Progress("network", 3, 13)) == "0:10 elapsed"  # one step: no rate
    now[0] = 130.0  # 2 layers in 20 s: 10 s each, 8 steps to go
    assert timer.update(Progress("network", 5, 13)) == "0:30 elapsed, about 1:20 left"
    assert clock(3725) == "1:02:05" and clock(59.6) == "1:00"


def test_all_widgets_docked_fit_a_1600_by_1000_window(make_napari_viewer, qtbot):
    """Opened one by one from the Plugins menu, the widgets share one tabbed dock, each
    scrolling within it: the window still fits a 1600 x 1000 screen, titles and all."""
    from npe2 import PluginManifest
    from test_napari_manifest import MANIFEST

    viewer = make_napari_viewer()
    names = [w.display_name for w in PluginManifest.from_file(MANIFEST).contributions.widgets]
    widgets = [viewer.window.add_plugin_dock_widget("napari-meshchop", name)[1]
               for name in names]
    qtbot.wait(50)  # docks join their siblings' tabs on the next turn of the event loop
    window = viewer.window._qt_window
    hint = window.minimumSizeHint()
    assert hint.width() <= 1600 and hint.height() <= 1000, hint
    docks = [widget.native.parent() for widget in widgets]
    assert set(window.tabifiedDockWidgets(docks[0])) == set(docks[1:])  # one dock, 4 tabs


def test_paths_show_both_ends_and_start_under_the_users_data_folder(
        make_napari_viewer, monkeypatch, tmp_path):
    from napari_meshchop.plugin.widgets.paths import shown_text

    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))  # platformdirs' data folder
    viewer = make_napari_viewer()
    opened = {name: viewer.window.add_plugin_dock_widget("napari-meshchop", name)[1]
              for name in ("Segment stroke lesion", "Download ARC cohort", "Train MeshNet",
                           "Evaluate MeshNet")}
    home = tmp_path / "xdg" / "napari-meshchop"
    segment, download = opened["Segment stroke lesion"], opened["Download ARC cohort"]
    train, evaluate = opened["Train MeshNet"], opened["Evaluate MeshNet"]
    assert Path(download._folder.value) == home / "arc"
    assert Path(train._data.value) == home / "arc" == Path(evaluate._data.value)
    assert Path(train._out.value) == home / "runs" / "meshnet"

    deep = tmp_path / ("a-long-folder-name-" * 4) / "run-k0" / "best.pt"
    segment._model.value = CHECKPOINT
    segment._checkpoint.value = deep
    shown = shown_text(segment._checkpoint, 220)
    assert shown.startswith("/") and shown.endswith("run-k0/best.pt") and "…" in shown
    assert str(deep) in segment._checkpoint.tooltip
    assert not segment._checkpoint.native.grab().isNull()  # drawn through the elision


def test_file_menu_saves_the_selected_lesion_as_nifti(make_napari_viewer, tmp_path,
                                                      monkeypatch):
    """File > IO Utilities > Save lesion as NIfTI...: NIfTI on the scan's grid, whatever
    type napari's own Save dialog would preselect."""
    from napari._app_model import get_app_model
    from qtpy.QtWidgets import QFileDialog

    viewer = make_napari_viewer()
    path = _scan(tmp_path)
    (scan,) = viewer.open(str(path), plugin="napari-meshchop")
    lesion = viewer.add_labels((np.asarray(scan.data) > 50).astype(np.uint8),
                               name="scan_lesion_x", metadata=dict(scan.metadata),
                               scale=scan.scale, translate=scan.translate)
    asked = []

    def answer(parent, caption, start, kinds):
        asked.append(start)
        return str(tmp_path / "out"), kinds  # a bare name, as a user might type

    monkeypatch.setattr(QFileDialog, "getSaveFileName", staticmethod(answer))
    viewer.layers.selection.active = lesion
    get_app_model().commands.execute_command("napari-meshchop.save_nifti").result()
    assert asked == [str(tmp_path / "scan_lesion_x.nii.gz")]
    written = nib.load(tmp_path / "out.nii.gz")
    assert np.array_equal(written.affine, nib.load(path).affine)
    assert int(np.asarray(written.dataobj).sum()) == int(lesion.data.sum())
