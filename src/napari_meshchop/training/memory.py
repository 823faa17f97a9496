"""How a training step keeps its activations: plain autograd, lean, or checkpointed.

A 256^3 volume at width 26 is 1.7 GB per activation, and plain autograd keeps two per block;
:func:`choose_mode` picks the lightest mode that is needed for the memory at hand, and
:func:`forward` runs the network in it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import psutil
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint as _checkpoint

from napari_meshchop.errors import MeshchopError
from napari_meshchop.network.architecture import Architecture
from napari_meshchop.network.model import Block, MeshNet
from napari_meshchop.training import lean
from napari_meshchop.training.config import TrainConfig


def _block_forward(block: Block, x: torch.Tensor, update_stats: bool) -> torch.Tensor:
    """A block in training mode; ``update_stats=False`` leaves BN running stats alone.

    The output is the same either way (training-mode BN normalises with batch statistics;
    a frozen BN, in eval mode, with its running ones, never updated).
    """
    bn = block.bn
    if not bn.training:
        return block(x)
    y = block.conv(x)
    # On recomputation the update goes to throwaway copies, so that autograd sees the
    # very same operation as in the forward pass.
    mean = bn.running_mean if update_stats else bn.running_mean.clone()
    var = bn.running_var if update_stats else bn.running_var.clone()
    y = F.batch_norm(y, mean, var, bn.weight, bn.bias, training=True, momentum=bn.momentum,
                     eps=bn.eps)
    if update_stats:
        bn.num_batches_tracked.add_(1)
    y = F.relu(y)
    if len(block) > 3:
        y = F.dropout3d(y, block[3].p, training=True)
    return y


def _checkpointed(block: Block):
    """The first call (forward) updates BN running stats, the recomputation does not.

    Without this guard, recomputing under torch.utils.checkpoint would update BatchNorm's
    running statistics twice per step (PyTorch issue 96136).
    """
    calls = [0]

    def run(x):
        calls[0] += 1
        return _block_forward(block, x, update_stats=calls[0] == 1)

    return run


MODES = ("plain", "lean", "checkpoint")
MODE_NOTES = {"lean": "one activation kept per block, ReLU outputs recomputed",
               "checkpoint": "each block recomputed in the backward pass"}


def forward(model: MeshNet, x: torch.Tensor, mode: str = "plain") -> torch.Tensor:
    """The model's logits in training mode, keeping activations for backward by ``mode``:

    * ``plain``: autograd as usual (two full-size activations per block);
    * ``lean``: one per block, the ReLU output recomputed elementwise (:mod:`lean`);
    * ``checkpoint``: one per block, each block recomputed whole (``torch.utils.checkpoint``;
      slower, but works with dropout and fp16 autocast, which ``lean`` does not support).
    """
    if mode not in MODES:
        raise MeshchopError(f"unknown memory mode {mode!r}; choose from {', '.join(MODES)}")
    if mode == "plain" or not model.training:
        return model(x)
    if mode == "lean":
        return lean.forward(model, x)
    for block in model.blocks:
        x = _checkpoint(_checkpointed(block), x, use_reentrant=False)
    return model.head(x)


def activation_bytes(shape: Sequence[int], channels: int, n_blocks: int, mode: str,
                     bytes_per_value: int = 4) -> int:
    """A rough peak of activation memory for one training step of batch 1 on ``shape``.

    Plain autograd keeps 2 full-size activations per block (convolution and ReLU outputs),
    lean and checkpointed steps 1; the backward pass needs about 3 more at its peak.
    """
    volume = int(np.prod(shape)) * channels * bytes_per_value
    return volume * ((2 if mode == "plain" else 1) * n_blocks + 3)


def available_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    return int(psutil.virtual_memory().available)


def choose_mode(config: TrainConfig, shape: Sequence[int], device: torch.device,
                dropout: float = 0.0) -> str:
    """How to keep activations (see :func:`forward`): plain when the step fits in 70% of
    the memory to plan for, otherwise (or when asked) lean, or checkpoint where lean cannot
    run (fp16 autocast, dropout)."""
    amp = use_amp(config, device)
    wanted = config.activation_checkpointing
    if wanted == "auto":
        budget = config.memory_gb * 2**30 if config.memory_gb else available_bytes(device)
        need = activation_bytes(shape, config.channels, len(config.dilations), "plain",
                                2 if amp else 4)
        wanted = "on" if need > 0.7 * budget else "off"
    if wanted == "off":
        return "plain"
    return "checkpoint" if amp or dropout > 0 else "lean"


def use_amp(config: TrainConfig, device: torch.device) -> bool:
    return device.type == "cuda" if config.amp == "auto" else config.amp == "on"


def trainable_device(device: torch.device, arch: Architecture) -> tuple[torch.device, str | None]:
    """``device``, or the CPU with the reason when a tiny training step fails on Apple MPS
    (3D convolutions and their gradients have been missing or wrong there)."""
    if device.type != "mps":
        return device, None
    try:
        probe = MeshNet(Architecture(channels=2, dilations=arch.dilations[:2])).to(device)
        x = torch.rand(1, 1, 8, 8, 8, device=device)
        for mode in ("plain", "lean"):
            forward(probe.train(), x, mode).sum().backward()
        torch.mps.synchronize()
    except (RuntimeError, NotImplementedError, AttributeError) as exc:
        return torch.device("cpu"), f"MPS cannot train MeshNet here ({exc}); using the CPU"
    return device, None

