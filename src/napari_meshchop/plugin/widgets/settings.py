"""Widgets for training settings, made from their metadata (training/config.py).

A setting with a ``label`` gets a field here with its bounds, choices, default and help as
tooltip; the Train widget lays them out and reads them back as TrainConfig fields.
"""

from __future__ import annotations

import math

from magicgui.widgets import ComboBox, Container, FloatSpinBox, SpinBox, Widget

from napari_meshchop.network.inference import available_devices
from napari_meshchop.training import config as _config


def shown() -> tuple[str, ...]:
    """The settings the Train widget shows: those with a label."""
    return tuple(name for name, (_, s) in _config.settings().items() if s.label)


def setting_widget(name: str) -> Widget:
    _, s = _config.settings()[name]
    default = _config.default(name)
    common = {"label": s.label, "tooltip": s.help, "name": name}
    if name == "device":  # only what this machine has
        return ComboBox(choices=available_devices(), value=default, **common)
    if name == "preprocess":
        return ComboBox(choices=list(s.choices), value=default["name"], **common)
    if s.choices:
        return ComboBox(choices=list(s.choices), value=default, **common)
    if _config.value_type(name) is int:
        # An optional int (crop) shows 0 for "none".
        low = 0 if default is None else int(s.low if s.low is not None else 0)
        return SpinBox(min=low, max=int(s.high if s.high is not None else 2**31 - 1),
                       value=default or 0, **common)
    step = 10.0 ** (math.floor(math.log10(default)) - 1) if default else 0.01
    return FloatSpinBox(min=s.low or 0.0, max=s.high if s.high is not None else 1e9,
                        step=step, value=default, **common)


class SettingsForm(Container):
    """Labelled fields for ``names``; :meth:`values` gives them as TrainConfig fields."""

    def __init__(self, names: tuple[str, ...], **kwargs):
        self.fields = {name: setting_widget(name) for name in names}
        super().__init__(widgets=list(self.fields.values()), labels=True, **kwargs)

    def values(self) -> dict:
        out = {}
        for name, widget in self.fields.items():
            value = widget.value
            if name == "preprocess":
                continue  # with its grid, by the owner (PreprocessSpec)
            if _config.default(name) is None and value == 0:
                value = None
            out[name] = value
        return out
