"""The Train widget, opened through the manifest: a tiny run that plots, stops and resumes."""

from __future__ import annotations

from pathlib import Path

import pytest
from qtpy.QtCore import QSettings

from napari_meshchop.data import folds
from napari_meshchop.network import checkpoint as ckpt_io
from napari_meshchop.plugin.widgets.segment import Offered


@pytest.fixture(autouse=True)
def _isolated(isolated_settings):
    """QSettings in tmp_path (conftest)."""


def test_train_widget_runs_plots_stops_and_resumes(make_napari_viewer, qtbot, data, tmp_path):
    viewer = make_napari_viewer()
    _, segment = viewer.window.add_plugin_dock_widget("napari-meshchop", "Segment stroke lesion")
    _, widget = viewer.window.add_plugin_dock_widget("napari-meshchop", "Train MeshNet")
    widget._data.value = data
    widget._out.value = tmp_path / "run"
    widget.field("channels").value = 2
    widget.field("epochs").value = 2
    widget.field("device").value = "cpu"
    widget._advanced.value = True
    widget._preprocess.value = "ras-minmax"
    widget._shape.value = 24

    widget.toggle()  # Start ...
    assert widget._start.text == "Stop"
    widget.toggle()  # ... and Stop at once: it ends within the first step
    qtbot.waitUntil(lambda: widget.worker is None, timeout=60_000)
    assert widget.result.stopped and widget.result.step == 1
    assert widget._start.text == "Start" and "Stopped" in widget._status.value
    assert widget.plot.losses and len(widget.plot.losses) == 1
    assert ckpt_io.load(tmp_path / "run" / "last.pt").training["step"] == 1

    widget._resume.value = True
    widget.toggle()
    qtbot.waitUntil(lambda: widget.worker is None, timeout=60_000)
    result = widget.result
    train_ids = folds.load(data).outer[0].inner[0].train
    assert not result.stopped and result.step == 2 * len(train_ids)
    assert len(widget.plot.dices) == 2 and widget._epoch_bar.value == 2
    assert widget.plot.loss_line.get_xdata()[-1] == result.step
    assert result.best is not None
    # The checkpoint is offered to the Segment widget as a labelled choice, not chosen.
    assert segment._model.value == "meshnet26-arc-fold0"
    offers = [c for c in segment._model.choices if isinstance(c, Offered)]
    # the stopped run offered its last.pt, the finished one its best.pt
    assert [Path(o.path).name for o in offers] == ["last.pt", "best.pt"]
    offered = offers[-1]
    assert offered.path == str(result.best)
    best = max(result.history, key=lambda r: r["val_dice"])
    assert offered.label == (f"run run, epoch {best['epoch'] + 1} "
                             f"(best.pt, val Dice {best['val_dice']:.2f})")
    assert QSettings("napari-meshchop", "segment").value("model", "") == ""  # not remembered
    segment._model.value = offered
    assert segment.model_choice() == str(result.best)


def test_search_section_lists_trials_stops_and_resumes(make_napari_viewer, qtbot, data,
                                                       tmp_path):
    viewer = make_napari_viewer()
    _, widget = viewer.window.add_plugin_dock_widget("napari-meshchop", "Train MeshNet")
    widget._data.value = data
    widget._out.value = tmp_path / "hpo"
    widget.field("device").value = "cpu"
    widget._preprocess.value = "ras-minmax"
    widget._shape.value = 16
    widget._search_box.value = True
    search = widget.search
    search._trials.value = 2
    search._min_epochs.value = 1
    search._max_epochs.value = 2

    search.toggle()  # Start ...
    assert search._start.text == "Stop search"
    qtbot.waitUntil(lambda: "Trial 0" in search._status.value, timeout=60_000)
    search.toggle()  # ... and Stop: trial 0 goes back in the queue, unless it just ended
    qtbot.waitUntil(lambda: search.worker is None, timeout=60_000)
    counts = search.result.counts
    assert search.result.stopped and counts.running == 0
    assert counts.finished + counts.waiting == 2  # nothing lost
    assert search._start.text == "Start search" and "Stopped" in search._status.value

    search.toggle()  # Start again: the search completes
    qtbot.waitUntil(lambda: search.worker is None, timeout=60_000)
    result = search.result
    assert not result.stopped and result.counts.finished == 2
    rows = search.table.data.to_list()
    assert [row[0] for row in rows] == [f.number for f in result.finished]
    assert all(row[1] in ("complete", "pruned") for row in rows)
    assert f"trial {result.best['trial']}" in search._best.value
    assert (tmp_path / "hpo" / "best_params.json").is_file()
