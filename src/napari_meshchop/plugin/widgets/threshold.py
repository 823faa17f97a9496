"""P(lesion) kept beside the mask, and a threshold slider that redraws the mask from it.

The Segment widget embeds a :class:`ThresholdControl` and hands it each result
(:meth:`ThresholdControl.show`): the probability becomes an Image layer (hidden; show it to
see where the network hesitates) on the scan's transform, and moving the slider rewrites
the lesion Labels layer as ``P(lesion) > threshold`` without running the network again
(about 0.03 s at 256^3). The threshold goes into the layer's metadata, where the statistics
panel and "Save corrected mask" read it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from magicgui.widgets import Container, FloatSlider, Label
from napari.layers import Image, Labels

from napari_meshchop.data import corrections
from napari_meshchop.network.inference import voxel_volume_ml

if TYPE_CHECKING:
    import napari

    from napari_meshchop.network.inference import SegmentResult

DEFAULT = 0.5  # what segment() thresholds at
SUFFIX = "_probability"  # no spaces: a save dialog proposes the name as a file name


class ThresholdControl(Container):
    """A threshold slider bound to the last segmentation's Labels and probability layers."""

    def __init__(self, viewer: napari.viewer.Viewer):
        super().__init__(labels=True)
        self._viewer = viewer
        self.labels: Labels | None = None
        self.probability: Image | None = None
        self._affine: np.ndarray | None = None
        self.slider = FloatSlider(
            label="Threshold", min=0.01, max=0.99, step=0.01, value=DEFAULT, enabled=False,
            tooltip="the lesion is where P(lesion) exceeds this; moving it redraws the mask "
            "from the probability (edits painted since are replaced)")
        self._note = Label(value="")
        self.extend([self.slider, self._note])
        self.slider.changed.connect(self.apply)
        viewer.layers.events.removed.connect(self._on_removed)

    def show(self, result: SegmentResult, labels: Labels, transform: dict,
             model: str | list[str] | None = None) -> Image | None:
        """Keep ``result``'s probability as a hidden Image layer beside ``labels`` (on the
        same ``transform``: scale, translate, rotate, shear, affine, units) and bind the
        slider to both; the slider goes back to 0.5, where ``labels`` was drawn.

        ``model``, what the Segment widget ran (a registry name, a checkpoint path or a list
        of them), goes into the layer's metadata with its sha256, for the saved sidecar."""
        if model is not None:
            models = model if isinstance(model, list) else [model]
            shas = [corrections.model_sha256(m) for m in models]
            labels.metadata = {**labels.metadata, "model_path": " + ".join(map(str, models)),
                               "model_sha256": None if None in shas else " + ".join(shas)}
        if result.probability is None:
            self._unbind()
            return None
        name = labels.name + SUFFIX
        old = next((lay for lay in self._viewer.layers
                    if lay.name == name and isinstance(lay, Image)), None)
        if old is None:
            layer = self._viewer.add_image(result.probability, name=name, visible=False,
                                           colormap="magma", contrast_limits=(0.0, 1.0),
                                           metadata={"probability_of": labels.name},
                                           **transform)
        else:
            layer = old
            layer.data = result.probability
            for key, value in transform.items():
                setattr(layer, key, value)
        self.labels, self.probability = labels, layer
        self._viewer.layers.selection.active = labels  # the lesion stays what a save takes
        self._affine = np.asarray(result.affine)
        with self.slider.changed.blocked():
            self.slider.value = DEFAULT
        labels.metadata = {**labels.metadata, "threshold": DEFAULT}
        self.slider.enabled = True
        self._note.value = f"P(lesion) in '{name}' (hidden)"
        return layer

    def apply(self, threshold: float | None = None) -> None:
        """Redraw the bound Labels layer as P(lesion) > ``threshold`` (the slider's)."""
        if self.labels is None or self.probability is None:
            return
        threshold = float(self.slider.value if threshold is None else threshold)
        mask = (np.asarray(self.probability.data) > threshold).astype(np.uint8)
        voxels = int(mask.sum())
        lesion_ml = voxels * voxel_volume_ml(self._affine)
        self.labels.metadata = {**self.labels.metadata, "threshold": threshold,
                                "lesion_ml": lesion_ml, "edited": False}
        self.labels.data = mask
        self._note.value = f"{lesion_ml:.1f} mL above {threshold:.2f}"

    def _on_removed(self, event) -> None:
        if event.value is self.labels or event.value is self.probability:
            self._unbind()

    def _unbind(self) -> None:
        self.labels = self.probability = None
        self.slider.enabled = False
        self._note.value = ""
