"""A MeshNet exported to ONNX (``meshchop export --format onnx``), run by onnxruntime.

It stands in for :class:`inference.FusedMeshNet`: the same ``lesion_probability``
generator on a network-grid volume, with the preprocessing read from the model's
``metadata_props``, so ``meshchop segment --model model.onnx`` prepares the scan and maps
the mask back exactly as for the checkpoint it came from. onnxruntime is an optional
extra (``pip install 'napari-meshchop[onnx]'``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Generator
from pathlib import Path

import numpy as np
import torch

from napari_meshchop.errors import InputError, MeshchopError
from napari_meshchop.events import Progress, StopFlag, check_stop
from napari_meshchop.imaging.preprocess import PreprocessSpec
from napari_meshchop.network import checkpoint as ckpt_io
from napari_meshchop.network.model import Architecture

SUFFIX = ".onnx"
# The graph's names and the metadata_props keys that hold JSON (see export/onnx.py).
INPUT, LOGITS, PROBABILITY = "volume", "logits", "lesion_probability"
JSON_KEYS = ("preprocessing", "architecture", "class_names", "provenance")


def is_onnx(model) -> bool:
    return isinstance(model, (str, os.PathLike)) and Path(model).suffix.lower() == SUFFIX


def read_metadata(props: dict[str, str]) -> dict:
    """``metadata_props`` as the exporter writes them, JSON values decoded."""
    out = dict(props)
    for key in JSON_KEYS:
        if key in out:
            out[key] = json.loads(out[key])
    return out


class OnnxMeshNet:
    """An onnxruntime session over an exported MeshNet; one step (the whole graph)."""

    n_steps = 1

    def __init__(self, path: str | os.PathLike, device: torch.device | str = "cpu"):
        ort = _onnxruntime()
        self.path = Path(path)
        if not self.path.is_file():
            raise InputError(self.path, "ONNX model not found")
        options = ort.SessionOptions()
        threads = torch.get_num_threads()  # the same budget as our own pass
        options.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(str(self.path), options,
                                                providers=_providers(ort, device))
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own types
            raise InputError(self.path, f"not a readable ONNX model ({_first_line(exc)})") from None
        meta = read_metadata(self.session.get_modelmeta().custom_metadata_map)
        if "preprocessing" not in meta or PROBABILITY not in {
                o.name for o in self.session.get_outputs()}:
            raise InputError(self.path, "not an ONNX MeshNet exported by napari-meshchop "
                             "(no preprocessing in its metadata or no lesion_probability "
                             "output)")
        self.metadata = meta
        self.preprocess = PreprocessSpec.from_dict(meta["preprocessing"])

    def checkpoint(self) -> ckpt_io.Checkpoint:
        """What callers of :func:`inference.load_predictor` read of a checkpoint: the
        preprocessing and provenance. It holds no weights (they are in the graph)."""
        arch = {k: v for k, v in self.metadata.get("architecture", {}).items()
                if k in Architecture.__dataclass_fields__}
        return ckpt_io.Checkpoint(
            Architecture.from_dict(arch) if arch else Architecture(), self.preprocess, {},
            {**self.metadata.get("provenance", {}), "onnx": self.path.name})

    def lesion_probability(self, volume: np.ndarray, stop: StopFlag = None
                           ) -> Generator[Progress, None, np.ndarray]:
        check_stop(stop)
        x = np.ascontiguousarray(volume, dtype=np.float32)[None, None]
        (prob,) = self.session.run([PROBABILITY], {INPUT: x})
        yield Progress("network", 1, 1, "onnxruntime")
        return prob[0, 0]


def load_predictor(models, device: torch.device | str = "cpu"
                   ) -> tuple[OnnxMeshNet, ckpt_io.Checkpoint, str]:
    """:func:`inference.load_predictor` for one ``.onnx`` file (no ensembles)."""
    if not isinstance(models, (str, os.PathLike)):
        models = list(models)
        if len(models) != 1:
            raise MeshchopError("an ONNX model runs alone: ensembles take checkpoints")
        models = models[0]
    predictor = OnnxMeshNet(models, device)
    return predictor, predictor.checkpoint(), Path(models).name


def _providers(ort, device) -> list[str]:
    available = ort.get_available_providers()
    if torch.device(device).type == "cuda" and "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def _onnxruntime():
    try:
        import onnxruntime  # an optional extra: napari-meshchop[onnx]
    except ImportError:
        raise MeshchopError("running an ONNX model needs onnxruntime: "
                            "pip install 'napari-meshchop[onnx]'") from None
    return onnxruntime


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:200]
