"""Sample data contribution: the ARC stroke scan, fetched and verified like the weights."""

from __future__ import annotations

from typing import TYPE_CHECKING

from napari_meshchop.network import registry
from napari_meshchop.plugin.reader import prefer_for_nifti, read_layer

if TYPE_CHECKING:
    from napari.types import LayerDataTuple


def arc_stroke_t2w() -> list[LayerDataTuple]:
    """ARC sub-M2265 T2w: downloaded once (or taken from MESHCHOP_MIRROR), sha256-checked."""
    prefer_for_nifti()
    return [read_layer(registry.fetch(registry.SAMPLE_SCAN))]
