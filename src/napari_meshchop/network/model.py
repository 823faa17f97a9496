"""MeshNet: a fully convolutional 3D CNN with dilated convolutions and no down-sampling.

Fedorov et al. (2017); stroke lesions in arXiv 2503.05531. Every block keeps the
full resolution, so the receptive field grows only through dilation: with the
paper's dilations it spans 1 + 2 * sum(d) = 123 voxels.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from napari_meshchop.network.architecture import (  # noqa: F401 - part of this module's API
    BRAINCHOP_DILATIONS,
    PAPER_DILATIONS,
    PRESETS,
    Architecture,
)


class Block(nn.Sequential):
    """Conv3d(3, dilation d, 'same' padding) -> BatchNorm3d -> ReLU [-> Dropout3d]."""

    def __init__(self, c_in: int, c_out: int, dilation: int, dropout: float = 0.0):
        layers = [
            nn.Conv3d(c_in, c_out, kernel_size=3, padding=dilation, dilation=dilation),
            nn.BatchNorm3d(c_out),
            nn.ReLU(inplace=True),
        ]
        if dropout > 0:
            layers.append(nn.Dropout3d(dropout))
        super().__init__(*layers)

    @property
    def conv(self) -> nn.Conv3d:
        return self[0]

    @property
    def bn(self) -> nn.BatchNorm3d:
        return self[1]


class MeshNet(nn.Module):
    def __init__(self, arch: Architecture | None = None):
        super().__init__()
        self.arch = arch or Architecture()
        widths = [self.arch.in_channels] + [self.arch.channels] * len(self.arch.dilations)
        self.blocks = nn.ModuleList(
            Block(c_in, c_out, d, self.arch.dropout)
            for c_in, c_out, d in zip(widths[:-1], widths[1:], self.arch.dilations)
        )
        self.head = nn.Conv3d(self.arch.channels, self.arch.n_classes, kernel_size=1)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        gain = nn.init.calculate_gain("relu")
        for m in self.modules():
            if isinstance(m, nn.Conv3d):
                nn.init.xavier_normal_(m.weight, gain=gain)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def meshnet(channels: int = 26, dilations: Sequence[int] = PAPER_DILATIONS, **kw) -> MeshNet:
    return MeshNet(Architecture(channels=channels, dilations=tuple(dilations), **kw))
