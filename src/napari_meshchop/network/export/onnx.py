"""ONNX: the folded MeshNet as a graph of Conv and Relu nodes, any depth, height and width.

Input ``volume``: float32 (1, 1, D, H, W), the network-grid volume exactly as
:func:`preprocess.prepare` makes it (the checkpoint's preprocessing, in its voxel order).
Outputs ``logits`` (1, 2, D, H, W) and ``lesion_probability`` (1, 1, D, H, W), the
two-class softmax's lesion channel written as sigmoid(logit 1 - logit 0), as our own pass
computes it. ``metadata_props`` carry the preprocessing and provenance; those listed in
:data:`onnx_predictor.JSON_KEYS` hold JSON, the others text.
"""

from __future__ import annotations

import json
from pathlib import Path

from napari_meshchop import __version__, files
from napari_meshchop.errors import MeshchopError
from napari_meshchop.network.export.layers import Conv
from napari_meshchop.network.onnx_predictor import INPUT, LOGITS, PROBABILITY

OPSET = 21
IR_VERSION = 10  # what opset 21 came with: onnxruntime 1.20 and newer load it
FILENAME = "model.onnx"


def require_onnx():
    """The optional ``onnx`` package, or an error that says how to get it."""
    try:
        import onnx  # an optional extra: napari-meshchop[onnx]
    except ImportError:
        raise MeshchopError("ONNX export needs the onnx package: "
                            "pip install 'napari-meshchop[onnx]'") from None
    return onnx


def build(convs: list[Conv], metadata: dict, doc: str = ""):
    """An ``onnx.ModelProto``; ``metadata`` values that are not strings are stored as JSON."""
    onnx = require_onnx()
    from onnx import TensorProto, helper, numpy_helper

    nodes, weights = [], []
    x = INPUT
    for i, conv in enumerate(convs):
        name = f"conv{i}" if conv.relu else "head"
        weights += [numpy_helper.from_array(conv.weight, f"{name}.weight"),
                    numpy_helper.from_array(conv.bias, f"{name}.bias")]
        y = f"{name}.out" if conv.relu else LOGITS
        nodes.append(helper.make_node(
            "Conv", [x, f"{name}.weight", f"{name}.bias"], [y], name=name,
            kernel_shape=[conv.kernel] * 3, dilations=[conv.dilation] * 3,
            pads=[conv.padding] * 6, strides=[1, 1, 1]))
        if conv.relu:
            x = f"{name}.relu"
            nodes.append(helper.make_node("Relu", [y], [x], name=f"{name}.relu"))
    nodes += [
        helper.make_node("Split", [LOGITS], ["background", "lesion"], axis=1, num_outputs=2,
                         name="classes"),
        helper.make_node("Sub", ["lesion", "background"], ["margin"], name="margin"),
        helper.make_node("Sigmoid", ["margin"], [PROBABILITY], name="probability"),
    ]
    spatial = ["depth", "height", "width"]
    graph = helper.make_graph(
        nodes, "meshnet",
        [helper.make_tensor_value_info(INPUT, TensorProto.FLOAT, [1, 1, *spatial])],
        [helper.make_tensor_value_info(LOGITS, TensorProto.FLOAT, [1, 2, *spatial]),
         helper.make_tensor_value_info(PROBABILITY, TensorProto.FLOAT, [1, 1, *spatial])],
        initializer=weights)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="napari-meshchop", producer_version=__version__,
                              doc_string=doc)
    model.ir_version = IR_VERSION
    helper.set_model_props(model, {k: v if isinstance(v, str) else json.dumps(v)
                                   for k, v in metadata.items()})
    onnx.checker.check_model(model, full_check=True)
    return model


def write(convs: list[Conv], folder: Path, metadata: dict, doc: str = "") -> list[Path]:
    model = build(convs, metadata, doc)
    return [files.write_bytes(folder / FILENAME, model.SerializeToString())]
