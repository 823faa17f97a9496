"""The Train widget's plot: napari's theme colours, whole-number steps, the validation Dice
in view, and no "Tight layout not applied" toast however small the dock."""

from __future__ import annotations

import warnings

import pytest
from matplotlib.colors import to_hex
from napari.utils.theme import get_theme


@pytest.fixture(autouse=True)
def _isolated(isolated_settings):
    """QSettings in tmp_path (conftest)."""


def test_plot_follows_the_theme_counts_whole_steps_and_shows_dice(make_napari_viewer, qtbot):
    viewer = make_napari_viewer()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for name in ("Segment stroke lesion", "Download ARC cohort", "Evaluate MeshNet"):
            viewer.window.add_plugin_dock_widget("napari-meshchop", name)
        _, widget = viewer.window.add_plugin_dock_widget("napari-meshchop", "Train MeshNet")
        plot = widget.plot
        for step in range(1, 6):
            plot.add_step(step, 1.0 / step)
        plot.add_epoch(5, 0.4)
        qtbot.wait(100)
        plot.canvas.draw()
    assert not [w for w in caught if "not applied" in str(w.message)]

    shown = [t for t in plot.loss_axes.get_xticks()
             if plot.loss_axes.get_xlim()[0] <= t <= plot.loss_axes.get_xlim()[1]]
    assert shown and all(float(t).is_integer() for t in shown)
    x0, x1 = plot.dice_axes.get_xlim()
    y0, y1 = plot.dice_axes.get_ylim()
    assert x0 <= 5 <= x1 and y0 <= 0.4 <= y1 and plot.dice_line.get_marker() == "o"

    for theme in ("dark", "light"):
        viewer.theme = theme
        colours = get_theme(theme)
        assert to_hex(plot.figure.get_facecolor()) == colours.background.as_hex()
        assert to_hex(plot.loss_axes.xaxis.label.get_color()) == colours.text.as_hex()
        assert to_hex(plot.dice_line.get_color()) == colours.warning.as_hex()
