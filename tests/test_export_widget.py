"""The Export button that the Segment and Train widgets carry."""

import pytest
from magicgui.widgets import Container
from qtpy.QtWidgets import QFileDialog, QInputDialog

from napari_meshchop.plugin.widgets import export as export_widget


@pytest.fixture
def shown(monkeypatch):
    """What the button tells the user, by kind."""
    said = {"info": [], "warning": [], "error": []}
    for kind, messages in said.items():
        monkeypatch.setattr(export_widget, f"show_{kind}", messages.append)
    return said


def answer(monkeypatch, fmt: str | None, folder: str):
    label = export_widget.LABELS.get(fmt, "")
    monkeypatch.setattr(QInputDialog, "getItem", lambda *a, **k: (label, fmt is not None))
    monkeypatch.setattr(QFileDialog, "getSaveFileName", lambda *a, **k: (folder, ""))


def test_export_button_writes_the_chosen_format(qtbot, isolated_settings, tiny_checkpoint,
                                               tmp_path, monkeypatch, shown):
    container = Container()
    qtbot.addWidget(container.native)
    button = export_widget.add_export_button(container, lambda: str(tiny_checkpoint))
    assert container[-1] is button
    answer(monkeypatch, "brainchop", str(tmp_path / "tiny-brainchop"))
    button.native.click()
    assert (tmp_path / "tiny-brainchop" / "model.pth").is_file()
    assert (tmp_path / "tiny-brainchop" / "README.md").is_file()
    (warning,) = shown["warning"]  # the tiny model's ras-minmax is not brainchop's input
    assert "'ras-minmax' preprocessing" in warning
    assert shown["info"] == [f"Exported tiny (brainchop) to {tmp_path / 'tiny-brainchop'}"]
    assert shown["error"] == []


def test_export_button_without_a_model_or_with_a_bad_folder(qtbot, isolated_settings,
                                                           tiny_checkpoint, tmp_path,
                                                           monkeypatch, shown):
    container = Container()
    qtbot.addWidget(container.native)
    model = {"path": None}
    button = export_widget.add_export_button(container, lambda: model["path"])
    answer(monkeypatch, "onnx", str(tmp_path / "never"))
    button.native.click()
    assert shown["error"] == ["No model to export yet: choose a checkpoint first"]
    model["path"] = str(tiny_checkpoint)
    answer(monkeypatch, None, str(tmp_path / "never"))  # the format dialog cancelled
    button.native.click()
    answer(monkeypatch, "onnx", str(tmp_path / "no" / "such" / "folder"))
    button.native.click()
    assert "its parent" in shown["error"][-1] and "does not exist" in shown["error"][-1]
    assert not (tmp_path / "never").exists() and shown["info"] == []
