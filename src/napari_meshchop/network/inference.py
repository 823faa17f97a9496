"""Segmenting one MRI: preprocessing, the fused MeshNet pass (:mod:`.fused`), and the way back."""

from __future__ import annotations

import os
from collections.abc import Generator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from napari_meshchop.errors import MeshchopError
from napari_meshchop.events import Progress, StopFlag, check_stop, relay
from napari_meshchop.imaging.geometry import voxel_volume_ml
from napari_meshchop.imaging.nifti import load_volume, save_mask
from napari_meshchop.imaging.preprocess import prepare, to_source
from napari_meshchop.network import checkpoint as ckpt_io
from napari_meshchop.network import onnx_predictor, registry
from napari_meshchop.network.devices import DEVICES
from napari_meshchop.network.fused import FusedMeshNet

Model = str | os.PathLike | ckpt_io.Checkpoint
Models = Model | Sequence[Model]  # several: an ensemble


def available_devices() -> list[str]:
    """The device choices that work on this machine, ``auto`` first."""
    found = ["auto", "cpu"]
    if torch.cuda.is_available():
        found.append("cuda")
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        found.append("mps")
    return found


def resolve_device(name: str = "auto") -> torch.device:
    if name not in DEVICES:
        raise MeshchopError(f"unknown device {name!r}; choose from {', '.join(DEVICES)}")
    if name == "auto":
        name = next((d for d in ("cuda", "mps") if d in available_devices()), "cpu")
    elif name not in available_devices():
        raise MeshchopError(f"device {name!r} is not available here; "
                            f"available: {', '.join(available_devices())}")
    return torch.device(name)


class Ensemble:
    """Several fused MeshNets on one grid: P(lesion) is the mean of their softmax outputs."""

    def __init__(self, members: list[FusedMeshNet]):
        if not members:
            raise MeshchopError("an ensemble needs at least one model")
        self.members = members

    @property
    def n_steps(self) -> int:
        return sum(m.n_steps for m in self.members)

    def lesion_probability(self, volume: np.ndarray, stop: StopFlag = None
                           ) -> Generator[Progress, None, np.ndarray]:
        return (yield from self.lesion_statistics(volume, stop=stop, spread=False)).mean

    def lesion_statistics(self, volume: np.ndarray, threshold: float = 0.5,
                          stop: StopFlag = None, spread: bool = True
                          ) -> Generator[Progress, None, EnsembleOutput]:
        """The members' mean P(lesion); with ``spread``, also its standard deviation over
        the members (population SD, Welford's update in float32) and the voxels where they
        disagree (some members above ``threshold``, some not). All on the network grid."""
        total, offset, n = self.n_steps, 0, 0
        mean = m2 = votes = None
        for member in self.members:
            prob = yield from _rebase(member.lesion_probability(volume, stop), offset, total)
            offset += member.n_steps
            n += 1
            if mean is None:
                mean = prob
                if spread:
                    m2 = np.zeros_like(prob)
                    votes = (prob > threshold).astype(np.uint8)
                continue
            if spread:
                votes += prob > threshold
                delta = prob - mean
                mean += delta / np.float32(n)
                prob -= mean  # now x - new mean
                m2 += delta * prob
                del delta
            else:
                mean += prob
            del prob
        if not spread:
            mean /= np.float32(n)
            return EnsembleOutput(mean)
        sd = np.sqrt(np.maximum(m2 / np.float32(n), 0, out=m2), out=m2)
        return EnsembleOutput(mean, sd, (votes > 0) & (votes < n))


@dataclass
class EnsembleOutput:
    """What an ensemble says about each voxel of the network grid."""

    mean: np.ndarray  # mean P(lesion), float32
    sd: np.ndarray | None = None  # its standard deviation over the members, float32
    disagree: np.ndarray | None = None  # bool: the members' thresholded masks differ


def load_predictor(models, device: torch.device | str = "cpu", precision: str = "auto"
                   ) -> tuple[FusedMeshNet | Ensemble, ckpt_io.Checkpoint, str]:
    """One model, or several as an :class:`Ensemble`: the predictor, the first checkpoint
    (its preprocessing is everyone's) and a label for reports.

    ``models`` is a checkpoint file, a registry name, a Checkpoint, or a list of them, or one
    exported ``.onnx`` file, run by onnxruntime; ``precision`` is one of
    :data:`fused.PRECISIONS` (``auto``: float16 on CUDA only).
    """
    if isinstance(models, (str, os.PathLike, ckpt_io.Checkpoint)):
        models = [models]
    if any(onnx_predictor.is_onnx(m) for m in models):
        return onnx_predictor.load_predictor(models, device)
    loaded = [load_model(m) for m in models]
    if not loaded:
        raise MeshchopError("no model given")
    first = loaded[0][0]
    for ckpt, label in loaded[1:]:
        if ckpt.preprocess != first.preprocess:
            raise MeshchopError(f"{label}: its preprocessing ({ckpt.preprocess.name}, "
                                f"{ckpt.preprocess.shape}) differs from {loaded[0][1]}'s; "
                                "an ensemble needs one network grid")
    fused = [FusedMeshNet(ckpt.build(), device, precision=precision) for ckpt, _ in loaded]
    if len(fused) == 1:
        return fused[0], first, loaded[0][1]
    return Ensemble(fused), first, f"ensemble of {len(fused)} ({', '.join(l for _, l in loaded)})"


@dataclass
class SegmentResult:
    mask: np.ndarray  # uint8 {0, 1} on the input's grid
    affine: np.ndarray  # the input's affine
    lesion_ml: float
    lesion_voxels: int
    model: str
    device: str
    probability: np.ndarray | None = None  # float32 P(lesion) on the input's grid


def load_model(model: str | os.PathLike | ckpt_io.Checkpoint) -> tuple[ckpt_io.Checkpoint, str]:
    """A checkpoint from a file path or a registry name, with a label for reports."""
    if isinstance(model, ckpt_io.Checkpoint):
        return model, "checkpoint"
    text = os.fspath(model)
    if text in registry.REGISTRY and registry.REGISTRY[text].kind == "model":
        return ckpt_io.load(registry.fetch(text)), text
    if Path(text).exists():
        return ckpt_io.load(text), Path(text).name
    raise MeshchopError(f"{text}: neither a checkpoint file nor a known model "
                        f"(known: {', '.join(registry.names('model'))})")


def segment(
    img: nib.Nifti1Image,
    model: Models = registry.DEFAULT_MODEL,
    device: str = "auto",
    stop: StopFlag = None,
    precision: str = "auto",
) -> Generator[Progress, None, SegmentResult]:
    """Segment the lesion in one checked 3D image (see :func:`nifti.load_volume`).

    ``model`` is one checkpoint file, registry name or Checkpoint, or a list of them: an
    :class:`Ensemble` (the mean of their lesion probabilities).
    """
    yield Progress("model", 0, 1, "loading model")
    dev = resolve_device(device)
    predictor, checkpoint, label = load_predictor(model, dev, precision)
    total = predictor.n_steps + 3  # model, preprocessing, the layers, mapping back
    check_stop(stop)
    yield Progress("preprocess", 1, total, checkpoint.preprocess.name)
    prepared = prepare(img, checkpoint.preprocess)
    check_stop(stop)
    try:
        prob = yield from _rebase(predictor.lesion_probability(prepared.volume, stop), 2, total)
    except (NotImplementedError, RuntimeError) as exc:
        if dev.type != "mps":
            raise
        # Some 3D operations are missing or broken on Apple's MPS: run on the CPU.
        yield Progress("network", 2, total, f"MPS failed ({exc}); using the CPU")
        dev = torch.device("cpu")
        predictor, _, _ = load_predictor(model, dev)
        prob = yield from _rebase(predictor.lesion_probability(prepared.volume, stop), 2, total)
    del prepared.volume
    yield Progress("map back", total - 1, total, "to the input grid")
    prob = to_source(prob, prepared)
    mask = (prob > 0.5).astype(np.uint8)
    check_stop(stop)
    voxels = int(mask.sum())
    yield Progress("done", total, total)
    return SegmentResult(mask, np.asarray(img.affine), voxels * voxel_volume_ml(img.affine),
                         voxels, label, dev.type, prob)


def _rebase(job: Generator[Progress, None, np.ndarray], offset: int, total: int):
    """Re-number a sub-job's progress as steps of the whole job."""
    return relay(job, lambda event: replace(event, done=offset + event.done, total=total))


def segment_file(
    input_path: str | os.PathLike,
    output_path: str | os.PathLike,
    model: Models = registry.DEFAULT_MODEL,
    device: str = "auto",
    stop: StopFlag = None,
    precision: str = "auto",
) -> Generator[Progress, None, SegmentResult]:
    """Read a NIfTI, segment it, write the mask on the input's grid (atomically)."""
    yield Progress("load", 0, 1, os.fspath(input_path))
    img = load_volume(input_path)
    result = yield from segment(img, model, device, stop, precision)
    save_mask(result.mask, result.affine, output_path)
    return result


