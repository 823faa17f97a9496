"""The devices a user can choose; torch-free, so the command line's parser reads it cheaply.

:func:`napari_meshchop.network.inference.resolve_device` turns a choice into a device.
"""

DEVICES = ("auto", "cpu", "cuda", "mps")
