"""A checkpoint as the plain convolutions every runtime understands.

MeshNet at inference is nine 3x3x3 convolutions with ReLU and a 1x1x1 head once each
BatchNorm is folded into its convolution. The folding is :class:`FusedMeshNet`'s (the one
our own inference runs); here its tensors become float32 arrays, and, for runtimes that
feed the voxels in another order, the kernels are turned to match.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import nibabel as nib
import numpy as np

from napari_meshchop.errors import InputError
from napari_meshchop.network import checkpoint as ckpt_io
from napari_meshchop.network.inference import FusedMeshNet


@dataclass(frozen=True)
class Conv:
    """One 'same'-padded convolution: weight (out, in, k, k, k) float32, bias (out,)."""

    weight: np.ndarray
    bias: np.ndarray
    dilation: int
    relu: bool

    @property
    def kernel(self) -> int:
        return int(self.weight.shape[2])

    @property
    def padding(self) -> int:
        return self.dilation * (self.kernel - 1) // 2

    @property
    def channels(self) -> tuple[int, int]:
        """(in, out)"""
        return int(self.weight.shape[1]), int(self.weight.shape[0])


def check_exportable(ckpt: ckpt_io.Checkpoint, label: str) -> None:
    """Only a one-channel, two-class MeshNet has the input and output every target expects."""
    arch = ckpt.arch
    if arch.in_channels != 1 or arch.n_classes != 2:
        raise InputError(label, f"a MeshNet with {arch.in_channels} input channel(s) and "
                         f"{arch.n_classes} classes; export needs 1 input channel and 2 "
                         "classes (background, lesion)")


def folded(ckpt: ckpt_io.Checkpoint) -> list[Conv]:
    """The checkpoint's network, BatchNorm folded, in its network grid's voxel order.

    The blocks come folded from :class:`FusedMeshNet`; the head (no BatchNorm) comes from
    the model as it is, both classes' logits, whatever form the fused pass gives it.
    """
    model = ckpt.build()
    fused = FusedMeshNet(model, "cpu")
    convs = [Conv(_array(w), _array(b), int(d), relu=True) for w, b, d in fused.layers]
    convs.append(Conv(_array(model.head.weight), _array(model.head.bias), 1, relu=False))
    return convs


def reoriented(convs: list[Conv], src: str, dst: str) -> list[Conv]:
    """The same network for voxels ordered along axis codes ``dst`` instead of ``src``.

    A convolution with 'same' padding commutes with permuting and flipping its input's
    axes when its kernel is permuted and flipped alike, so only the kernels change.
    """
    ornt = nib.orientations.ornt_transform(nib.orientations.axcodes2ornt(tuple(src)),
                                           nib.orientations.axcodes2ornt(tuple(dst)))
    if np.array_equal(ornt, [[0, 1], [1, 1], [2, 1]]):
        return list(convs)
    out = []
    for conv in convs:
        spatial_first = np.moveaxis(conv.weight, (2, 3, 4), (0, 1, 2))
        turned = nib.orientations.apply_orientation(spatial_first, ornt)
        # A copy, not ascontiguousarray: a flipped 1x1x1 kernel would keep negative strides.
        weight = np.moveaxis(turned, (0, 1, 2), (2, 3, 4)).copy()
        out.append(replace(conv, weight=weight))
    return out


def receptive_radius(convs: list[Conv]) -> int:
    """How far (voxels) an output voxel sees in each direction."""
    return sum(c.padding for c in convs)


def _array(t) -> np.ndarray:
    return np.ascontiguousarray(t.detach().cpu().numpy(), dtype=np.float32)
