"""Segmenting one MRI: preprocessing, a memory-lean MeshNet pass, and the way back.

The pass folds each BatchNorm into its convolution, keeps activations in the
channels-last layout that oneDNN's CPU kernels (and cuDNN) prefer, and applies
ReLU in place, so at most two full-size activations are alive at any moment:
the input and the output of the current convolution.
"""

from __future__ import annotations

import os
from collections.abc import Generator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F

from napari_meshchop.errors import MeshchopError
from napari_meshchop.events import Progress, StopFlag, check_stop
from napari_meshchop.imaging.nifti import load_volume, save_mask
from napari_meshchop.imaging.preprocess import prepare, to_source
from napari_meshchop.network import checkpoint as ckpt_io
from napari_meshchop.network import registry
from napari_meshchop.network.devices import DEVICES
from napari_meshchop.network.model import MeshNet

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


class FusedMeshNet:
    """A MeshNet for inference only: each Conv3d+BatchNorm3d folded into one conv."""

    def __init__(self, model: MeshNet, device: torch.device | str = "cpu", slab: int = 32):
        self.device = torch.device(device)
        self.slab = slab
        self.layers: list[tuple[torch.Tensor, torch.Tensor, int]] = []
        with torch.no_grad():
            for block in model.blocks:
                conv, bn = block.conv, block.bn
                scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
                weight = conv.weight * scale.view(-1, 1, 1, 1, 1)
                bias = (conv.bias - bn.running_mean) * scale + bn.bias
                self.layers.append((self._put(weight), self._put(bias), conv.dilation[0]))
            self.head = (self._put(model.head.weight), self._put(model.head.bias))

    def _put(self, t: torch.Tensor) -> torch.Tensor:
        t = t.detach().float().to(self.device)
        return t.contiguous(memory_format=torch.channels_last_3d) if t.dim() == 5 else t

    @property
    def n_steps(self) -> int:
        return len(self.layers) + 1

    def lesion_probability(self, volume: np.ndarray, stop: StopFlag = None
                           ) -> Generator[Progress, None, np.ndarray]:
        """Yield after each layer; return P(lesion) on the network grid as float32."""
        with torch.inference_mode():
            x = torch.from_numpy(np.ascontiguousarray(volume, dtype=np.float32))
            x = x[None, None].to(self.device).contiguous(memory_format=torch.channels_last_3d)
            for i, (weight, bias, d) in enumerate(self.layers):
                x = _conv_relu_in_slabs(x, weight, bias, d, self.slab)
                yield Progress("network", i + 1, self.n_steps, f"layer {i + 1}")
                check_stop(stop)
            logits = F.conv3d(x, *self.head)
            del x
            # Two-class softmax, class 1, without a second full-size tensor.
            prob = torch.sigmoid(logits[0, 1] - logits[0, 0])
            del logits
            out = prob.float().cpu().numpy()
        yield Progress("network", self.n_steps, self.n_steps, "output")
        return out


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
        total, offset, mean = self.n_steps, 0, None
        for member in self.members:
            prob = yield from _rebase(member.lesion_probability(volume, stop), offset, total)
            offset += member.n_steps
            mean = prob if mean is None else np.add(mean, prob, out=mean)
            del prob
        if len(self.members) > 1:
            mean /= np.float32(len(self.members))
        return mean


def load_predictor(models, device: torch.device | str = "cpu"
                   ) -> tuple[FusedMeshNet | Ensemble, ckpt_io.Checkpoint, str]:
    """One model, or several as an :class:`Ensemble`: the predictor, the first checkpoint
    (its preprocessing is everyone's) and a label for reports.

    ``models`` is a checkpoint file, a registry name, a Checkpoint, or a list of them.
    """
    if isinstance(models, (str, os.PathLike, ckpt_io.Checkpoint)):
        models = [models]
    loaded = [load_model(m) for m in models]
    if not loaded:
        raise MeshchopError("no model given")
    first = loaded[0][0]
    for ckpt, label in loaded[1:]:
        if ckpt.preprocess != first.preprocess:
            raise MeshchopError(f"{label}: its preprocessing ({ckpt.preprocess.name}, "
                                f"{ckpt.preprocess.shape}) differs from {loaded[0][1]}'s; "
                                "an ensemble needs one network grid")
    fused = [FusedMeshNet(ckpt.build(), device) for ckpt, _ in loaded]
    if len(fused) == 1:
        return fused[0], first, loaded[0][1]
    return Ensemble(fused), first, f"ensemble of {len(fused)} ({', '.join(l for _, l in loaded)})"


def _conv_relu_in_slabs(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                        d: int, slab: int) -> torch.Tensor:
    """relu(conv3d(x, dilation d, 'same' padding)), computed ``slab`` output slices at a time.

    A whole-volume conv3d on the CPU holds a hidden output-sized buffer besides its
    output (3 activations at the peak); slab by slab, that buffer is one slab.
    """
    depth = x.shape[2]
    out = torch.empty((1, weight.shape[0], *x.shape[2:]), dtype=x.dtype, device=x.device,
                      memory_format=torch.channels_last_3d)
    for z0 in range(0, depth, slab):
        z1 = min(z0 + slab, depth)
        lo, hi = max(z0 - d, 0), min(z1 + d, depth)
        part = x[:, :, lo:hi]
        if lo > z0 - d or hi < z1 + d:  # zero padding in depth at the volume's faces
            part = F.pad(part, (0, 0, 0, 0, lo - (z0 - d), (z1 + d) - hi))
        out[:, :, z0:z1] = F.conv3d(part, weight, bias, padding=(0, d, d), dilation=d).relu_()
    return out


@dataclass
class SegmentResult:
    mask: np.ndarray  # uint8 {0, 1} on the input's grid
    affine: np.ndarray  # the input's affine
    lesion_ml: float
    lesion_voxels: int
    model: str
    device: str
    probability: np.ndarray | None = None  # float32 P(lesion) on the input's grid


def voxel_volume_ml(affine: np.ndarray) -> float:
    return abs(float(np.linalg.det(np.asarray(affine)[:3, :3]))) / 1000.0


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
) -> Generator[Progress, None, SegmentResult]:
    """Segment the lesion in one checked 3D image (see :func:`nifti.load_volume`).

    ``model`` is one checkpoint file, registry name or Checkpoint, or a list of them: an
    :class:`Ensemble` (the mean of their lesion probabilities).
    """
    yield Progress("model", 0, 1, "loading model")
    dev = resolve_device(device)
    predictor, checkpoint, label = load_predictor(model, dev)
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
    while True:
        try:
            event = next(job)
        except StopIteration as finished:
            return finished.value
        yield replace(event, done=offset + event.done, total=total)


def segment_file(
    input_path: str | os.PathLike,
    output_path: str | os.PathLike,
    model: Models = registry.DEFAULT_MODEL,
    device: str = "auto",
    stop: StopFlag = None,
) -> Generator[Progress, None, SegmentResult]:
    """Read a NIfTI, segment it, write the mask on the input's grid (atomically)."""
    yield Progress("load", 0, 1, os.fspath(input_path))
    img = load_volume(input_path)
    result = yield from segment(img, model, device, stop)
    save_mask(result.mask, result.affine, output_path)
    return result


