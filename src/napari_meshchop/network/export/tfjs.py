"""brainchop's web app: a TensorFlow.js layers model, its colour map and its model-list entry.

The web app loads ``model.json`` with ``tf.loadLayersModel``: a Keras functional model
whose input is [null, 256, 256, 256, 1] (channels last), Conv3D layers ('same' padding,
dilation_rate, linear) each followed by a ReLU Activation layer, and a 1x1x1 Conv3D to the
two classes named ``output``. The weights are one little-endian float32 shard listed in
``weightsManifest``, kernels stored as (k, k, k, in, out).

What the app feeds a model is decided by its entry in the app's model list
(:func:`model_list_entry`): niivue's conform to a uint8 256^3 LIA volume, min-max scaling
to [0, 1] (``enableQuantileNorm: false``), the voxels in LIA order (``enableTranspose:
true`` undoes the slice-major order it reads them in), and a crop to the non-zero voxels
padded by ``cropPadding``, which we set to the network's receptive radius so that every
voxel of the head sees what it would see in the whole volume.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from napari_meshchop import __version__, files
from napari_meshchop.network.export.layers import Conv, receptive_radius

AXIS_CODES = "LIA"  # the voxel order the app feeds (after its transpose)
SHAPE = (256, 256, 256)
MODEL, WEIGHTS, COLORMAP, ENTRY = "model.json", "model.bin", "colormap.json", "model-list-entry.json"
CONTRACT = ("brainchop's web app conforms the scan with niivue (256^3, 1 mm, LIA, uint8 "
            "scaled as FreeSurfer does), min-max scales it to [0, 1], feeds the voxels in LIA "
            "order and crops to the non-zero voxels")


def layer_names(convs: list[Conv]) -> list[str]:
    return [f"conv{i}" if c.relu else "output" for i, c in enumerate(convs)]


def model_json(convs: list[Conv]) -> dict:
    """The Keras layers-model topology and its weights manifest."""
    layers = [{
        "class_name": "InputLayer", "name": "input", "inbound_nodes": [],
        "config": {"batch_input_shape": [None, *SHAPE, 1], "dtype": "float32",
                   "sparse": False, "ragged": False, "name": "input"},
    }]
    weights, previous = [], "input"
    for conv, name in zip(convs, layer_names(convs)):
        c_in, c_out = conv.channels
        layers.append({
            "class_name": "Conv3D", "name": name,
            "inbound_nodes": [[[previous, 0, 0, {}]]],
            "config": {
                "name": name, "trainable": True, "dtype": "float32", "filters": c_out,
                "kernel_size": [conv.kernel] * 3, "strides": [1, 1, 1], "padding": "same",
                "data_format": "channels_last", "dilation_rate": [conv.dilation] * 3,
                "groups": 1, "activation": "linear", "use_bias": True,
                "kernel_initializer": {"class_name": "Zeros", "config": {}},
                "bias_initializer": {"class_name": "Zeros", "config": {}},
                "kernel_regularizer": None, "bias_regularizer": None,
                "activity_regularizer": None, "kernel_constraint": None,
                "bias_constraint": None,
            },
        })
        weights += [{"name": f"{name}/kernel", "shape": [conv.kernel] * 3 + [c_in, c_out],
                     "dtype": "float32"},
                    {"name": f"{name}/bias", "shape": [c_out], "dtype": "float32"}]
        previous = name
        if conv.relu:
            relu = f"{name}_relu"
            layers.append({"class_name": "Activation", "name": relu,
                           "inbound_nodes": [[[previous, 0, 0, {}]]],
                           "config": {"name": relu, "trainable": True, "dtype": "float32",
                                      "activation": "relu"}})
            previous = relu
    return {
        "format": "layers-model",
        "generatedBy": f"napari-meshchop {__version__}",
        "convertedBy": f"napari-meshchop {__version__}",
        "modelTopology": {"model_config": {"class_name": "Functional", "config": {
            "name": "meshnet", "layers": layers,
            "input_layers": [["input", 0, 0]], "output_layers": [["output", 0, 0]]}}},
        "weightsManifest": [{"paths": [WEIGHTS], "weights": weights}],
    }


def weight_bytes(convs: list[Conv]) -> bytes:
    """Kernels as (k, k, k, in, out) then biases, layer by layer, little-endian float32."""
    parts = []
    for conv in convs:
        parts.append(np.transpose(conv.weight, (2, 3, 4, 1, 0)).astype("<f4").tobytes())
        parts.append(conv.bias.astype("<f4").tobytes())
    return b"".join(parts)


def colormap() -> dict:
    return {"R": [0, 255], "G": [0, 0], "B": [0, 0], "labels": ["background", "lesion"]}


def model_list_entry(convs: list[Conv], folder_name: str, description: str) -> dict:
    """An entry for the app's ``inferenceModelsList`` (brainchop-parameters.js); set ``id``
    to the next free number there."""
    return {
        "id": None,
        "type": "Segmentation",
        "path": f"/models/{folder_name}/{MODEL}",
        "modelName": "Stroke lesion (MeshNet, napari-meshchop)",
        "colormapPath": f"./models/{folder_name}/{COLORMAP}",
        "preModelId": None,
        "preModelPostProcess": False,
        "isBatchOverlapEnable": False,
        "numOverlapBatches": 0,
        "enableTranspose": True,
        "enableCrop": True,
        "cropPadding": receptive_radius(convs),
        "autoThreshold": 0,
        "enableQuantileNorm": False,
        "filterOutWithPreMask": False,
        "enableSeqConv": False,
        "textureSize": 0,
        "warning": "For research only, not for clinical decisions.",
        "inferenceDelay": 100,
        "description": description,
    }


def write(convs: list[Conv], folder: Path, description: str) -> list[Path]:
    return [
        files.write_bytes(folder / WEIGHTS, weight_bytes(convs)),
        files.write_json(folder / MODEL, model_json(convs)),
        files.write_json(folder / COLORMAP, colormap()),
        files.write_json(folder / ENTRY, model_list_entry(convs, folder.name, description)),
    ]
