"""The Download widget, opened through the manifest, driven against the local replica."""

from __future__ import annotations

import arc_replica
import pytest

from napari_meshchop import files
from napari_meshchop.data import manifest
from napari_meshchop.plugin.widgets.download import DownloadWidget


@pytest.fixture(autouse=True)
def _isolated(isolated_settings):
    """QSettings in tmp_path (conftest)."""


@pytest.fixture(scope="module")
def replica(tmp_path_factory):
    return arc_replica.build(tmp_path_factory.mktemp("replica"))


def _open(viewer, replica, folder) -> DownloadWidget:
    _, widget = viewer.window.add_plugin_dock_widget("napari-meshchop", "Download ARC cohort")
    assert isinstance(widget, DownloadWidget)
    widget._repo.value = str(replica)  # a local copy laid out like the hub
    widget._folder.value = str(folder)
    return widget


def test_widget_downloads_and_summarises_the_cohort(make_napari_viewer, qtbot, replica,
                                                    tmp_path):
    widget = _open(make_napari_viewer(), replica, tmp_path / "arc")
    widget._start.native.click()
    assert widget._start.text == "Stop" and not widget._folder.enabled
    qtbot.waitUntil(lambda: widget.worker is None, timeout=120_000)
    assert widget._start.text == "Start" and widget._folder.enabled
    assert widget.result is not None and widget.result.downloaded == 4
    assert widget._progress.value == widget._progress.max == 4
    summary = widget._summary.value
    assert "4 pairs by acquisition" in summary
    assert "space_2x        2" in summary and "space_no_accel  2" in summary
    assert "(203, 33619] " in summary and "█" in summary  # the lesion-size histogram
    assert "1 turbo spin echo" in summary and "2 no lesion mask" in summary
    assert "Cohort: 4 image/mask pairs" in widget._status.value
    assert manifest.load(tmp_path / "arc").complete
    # the destination folder is remembered for next time
    assert str(DownloadWidget(make_napari_viewer())._folder.value) == str(tmp_path / "arc")


def test_stop_leaves_nothing_half_made_and_start_resumes(make_napari_viewer, qtbot, replica,
                                                        tmp_path):
    folder = tmp_path / "arc"
    widget = _open(make_napari_viewer(), replica, folder)
    widget.toggle()  # Start
    widget.toggle()  # Stop, before the first row has been read
    qtbot.waitUntil(lambda: widget.worker is None, timeout=120_000)
    assert widget.result is None and widget._status.value.startswith("Stopped.")
    assert not list(folder.rglob(f".*{files.PART_SUFFIX}"))
    widget.toggle()
    qtbot.waitUntil(lambda: widget.worker is None, timeout=120_000)
    assert widget.result.manifest.complete and len(widget.result.manifest.pairs) == 4


def test_errors_are_shown_not_raised(make_napari_viewer, qtbot, tmp_path):
    widget = _open(make_napari_viewer(), tmp_path / "missing", tmp_path / "arc")
    widget.start()
    qtbot.waitUntil(lambda: widget.worker is None, timeout=60_000)
    assert widget._status.value.startswith("Error: ") and "no such folder" in widget._status.value
