"""Stroke-lesion segmentation on MRI with MeshNet, in napari and on the command line."""

__version__ = "0.1.0"
