"""brainchop's command line: a custom model folder (``brainchop --custom FOLDER``).

brainchop 0.2.x builds its own MeshNet from ``model.json`` (a list of convolution layers,
each followed by ReLU; ``bnorm`` would add an instance norm, so it is off and BatchNorm is
folded into the kernels instead) and loads ``model.pth`` into it: a PyTorch file by the
order of its keys, so they are named and ordered as that MeshNet's (layer ``i``'s
convolution is ``model.{2 i}``, each block being [conv, relu]). It is a plain state dict,
loadable with ``torch.load(weights_only=True)``.

Whatever the folder says, brainchop conforms the scan with niimath (256^3, 1 mm, LIA,
uint8), feeds the voxels in LIA order and clips them to their 2%-98% quantile range: the
``brainchop`` preprocessing, exactly (:mod:`napari_meshchop.imaging.preprocess`).
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import torch

from napari_meshchop import files
from napari_meshchop.network.export.layers import Conv

AXIS_CODES = "LIA"
CONFIG, WEIGHTS = "model.json", "model.pth"
MATCHING_SPEC = "brainchop"
CONTRACT = ("brainchop's command line conforms the scan with niimath (256^3, 1 mm, LIA, "
            "uint8), feeds the voxels in LIA order and clips them to their 2%-98% quantile "
            "range (the 'brainchop' preprocessing)")


def config(convs: list[Conv]) -> dict:
    """brainchop's MeshNet config: explicit channels, no BatchNorm, biases, no dropout."""
    layers = []
    for conv in convs:
        c_in, c_out = conv.channels
        layers.append({"in_channels": c_in, "out_channels": c_out, "kernel_size": conv.kernel,
                       "padding": conv.padding, "stride": 1, "dilation": conv.dilation})
    return {"bnorm": False, "dropout_p": 0, "bias": True, "layers": layers}


def state_dict(convs: list[Conv]) -> OrderedDict:
    """Named and ordered as brainchop's MeshNet's state dict."""
    state = OrderedDict()
    for i, conv in enumerate(convs):
        index = 2 * i  # [conv, relu] per block; the head comes last
        state[f"model.{index}.weight"] = torch.from_numpy(conv.weight.copy())
        state[f"model.{index}.bias"] = torch.from_numpy(conv.bias.copy())
    return state


def write(convs: list[Conv], folder: Path) -> list[Path]:
    with files.atomic_file(folder / WEIGHTS) as fh:
        torch.save(state_dict(convs), fh)
    return [folder / WEIGHTS, files.write_json(folder / CONFIG, config(convs))]
