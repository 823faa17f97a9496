"""Before Start: how long an epoch takes here (one timed step), and the two one-click
recipes, CPU-sized crops or the paper's."""

from __future__ import annotations

from dataclasses import replace

import pytest

from napari_meshchop.data import folds
from napari_meshchop.training import probe
from napari_meshchop.training.config import TrainConfig


@pytest.fixture(autouse=True)
def _isolated(isolated_settings):
    """QSettings in tmp_path (conftest)."""


def test_estimate_scales_one_timed_step_by_voxels(monkeypatch):
    timed = []

    def fake_step(config, shape, device, mode):
        timed.append((shape, mode))
        return 2.0

    monkeypatch.setattr(probe, "time_step", fake_step)
    monkeypatch.setattr(probe, "time_inference", lambda config, shape, device: 0.5)
    config = TrainConfig(channels=2, device="cpu", activation_checkpointing="off")
    whole = probe.estimate(config, probe_edge=32)
    assert timed[-1] == ((32, 32, 32), "plain") and whole.step_shape == (256, 256, 256)
    assert whole.step_seconds == pytest.approx(2.0 * 8**3)  # (256/32)^3 times the voxels
    assert whole.validation_seconds == pytest.approx(0.5 * 8**3)
    assert whole.epoch_seconds(10, 4) == pytest.approx(10 * 1024 + 4 * 256)
    cropped = probe.estimate(probe.cpu_sized(config), probe_edge=32)
    assert cropped.step_shape == (64, 64, 64) and cropped.step_seconds == pytest.approx(16.0)


def test_a_real_step_is_timed():
    config = TrainConfig(channels=2, dilations=(1, 2), device="cpu", crop=12)
    found = probe.estimate(config, probe_edge=8)
    assert found.probe_shape == (8, 8, 8) and found.step_shape == (12, 12, 12)
    assert 0 < found.step_seconds < 60 and 0 < found.validation_seconds


def test_presets_set_the_recipe_and_keep_the_users_data_fold_and_device():
    mine = TrainConfig(channels=5, epochs=3, lr=0.01, crop=None, device="cpu",
                            data_dir="/data/arc", outer_fold=2, inner_fold=1, seed=7)
    cpu = probe.cpu_sized(mine)
    assert (cpu.crop, cpu.channels, cpu.epochs, cpu.lr) == (64, 26, 50, 1e-3)
    assert (cpu.device, cpu.data_dir, cpu.outer_fold, cpu.inner_fold, cpu.seed) == (
        "cpu", "/data/arc", 2, 1, 7)
    paper = probe.paper_recipe(cpu)
    assert paper == replace(TrainConfig(), device="cpu", data_dir="/data/arc",
                            outer_fold=2, inner_fold=1, seed=7)


def test_widget_estimates_an_epoch_and_applies_presets(make_napari_viewer, qtbot, data):
    viewer = make_napari_viewer()
    _, widget = viewer.window.add_plugin_dock_widget("napari-meshchop", "Train MeshNet")
    widget._data.value = data
    widget.field("device").value = "cpu"
    widget._cpu_sized.clicked.emit()
    assert widget.field("crop").value == 64 and widget.field("channels").value == 26
    widget._paper.clicked.emit()
    assert widget.field("crop").value == 0 and widget.field("epochs").value == 50

    widget.field("channels").value, widget.field("epochs").value = 2, 4
    widget._advanced.value = True
    widget._preprocess.value, widget._shape.value = "ras-minmax", 16
    widget.estimate_time()
    qtbot.waitUntil(lambda: widget.prober is None, timeout=60_000)
    inner = folds.load(data).outer[0].inner[0]
    text = widget._estimate.value
    assert text.startswith("About ") and " an epoch on cpu " in text
    assert f"({len(inner.train)} steps" in text and f"{len(inner.val)} validation" in text
    assert "4 epochs: " in text


def test_training_without_a_cohort_says_what_to_do_in_napari(make_napari_viewer, tmp_path):
    viewer = make_napari_viewer()
    _, widget = viewer.window.add_plugin_dock_widget("napari-meshchop", "Train MeshNet")
    widget._data.value = tmp_path
    widget.toggle()
    assert widget.worker is None
    assert "Download ARC cohort" in widget._status.value and "meshchop " not in \
        widget._status.value
