"""How long training takes on this machine, from one timed step; and recipe presets.

The paper's recipe (MeshNet-26, whole 256^3 volumes, 50 epochs) takes a GPU hours and a
CPU days. :func:`estimate` times one real training step (forward, backward, optimizer;
the memory mode the run would use) on a small synthetic volume and scales it by the
number of voxels a step of the run would see (convolutions cost in proportion to voxels),
and one validation pass likewise; :func:`cpu_sized` and :func:`paper_recipe` are the two
one-click settings the Train widget offers.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace

import numpy as np
import torch

from napari_meshchop.network.inference import FusedMeshNet, resolve_device
from napari_meshchop.network.model import MeshNet
from napari_meshchop.training import config as _config
from napari_meshchop.training.config import TrainConfig
from napari_meshchop.training.memory import choose_mode, forward

PROBE_EDGE = 48  # voxels a side of the timed volume: seconds on a laptop CPU
CPU_CROP = 64  # the CPU-sized recipe trains on random 64^3 crops (half on a lesion)
# What a preset sets: the recipe's settings and the memory mode; the data, the fold, the
# device, the seed and the preprocessing (the data's) stay the user's.
RECIPE = tuple(n for n in _config.names("recipe") if n not in ("seed", "preprocess")) + (
    "activation_checkpointing",)


@dataclass(frozen=True)
class Estimate:
    """Seconds per training step and per validated subject at the run's sizes."""

    device: str
    step_shape: tuple[int, ...]  # what one training step sees: a crop or the whole grid
    step_seconds: float
    validation_seconds: float  # one subject, whole grid
    probe_shape: tuple[int, ...]
    memory_mode: str

    def epoch_seconds(self, train_subjects: int, val_subjects: int = 0) -> float:
        return self.step_seconds * train_subjects + self.validation_seconds * val_subjects


def _voxels(shape) -> int:
    return int(np.prod(shape))


def time_step(config: TrainConfig, shape, device: torch.device, mode: str) -> float:
    """Seconds for one training step of batch 1 on random data of ``shape``: the faster of
    two after a warm-up, so start-up costs (kernel choice, allocation) are left out."""
    torch.manual_seed(config.seed)
    model = MeshNet(config.arch).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr,
                                  weight_decay=config.weight_decay, eps=config.eps)
    weights = torch.tensor(config.class_weights, dtype=torch.float32, device=device)
    criterion = torch.nn.CrossEntropyLoss(weight=weights, label_smoothing=config.label_smoothing)
    image = torch.rand((1, 1, *shape), device=device)
    target = (torch.rand((1, *shape), device=device) > 0.9).long()
    timings = []
    for _ in range(3):
        started = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss = criterion(forward(model, image, mode).float(), target)
        loss.backward()
        optimizer.step()
        _synchronize(device)
        timings.append(time.perf_counter() - started)
    return min(timings[1:])


def time_inference(config: TrainConfig, shape, device: torch.device) -> float:
    """Seconds for one validation pass (the memory-lean inference) on ``shape``."""
    fused = FusedMeshNet(MeshNet(config.arch).eval(), device)
    volume = np.random.default_rng(0).random(shape, dtype=np.float32)
    timings = []
    for _ in range(2):
        started = time.perf_counter()
        job = fused.lesion_probability(volume)
        for _event in job:
            pass
        _synchronize(device)
        timings.append(time.perf_counter() - started)
    return timings[-1]


def estimate(config: TrainConfig, probe_edge: int = PROBE_EDGE) -> Estimate:
    """Time one step and one validation pass at ``probe_edge``^3, scaled to the run."""
    device = resolve_device(config.device)
    grid = tuple(config.spec.shape)
    step_shape = tuple(min(config.crop, s) for s in grid) if config.crop else grid
    probe = tuple(min(probe_edge, s) for s in step_shape)
    mode = choose_mode(config, step_shape, device, config.arch.dropout)
    step = time_step(config, probe, device, mode) * _voxels(step_shape) / _voxels(probe)
    val_probe = tuple(min(probe_edge, s) for s in grid)
    val = time_inference(config, val_probe, device) * _voxels(grid) / _voxels(val_probe)
    return Estimate(device.type, step_shape, step, val, probe, mode)


def cpu_sized(config: TrainConfig) -> TrainConfig:
    """The paper's recipe on random ``CPU_CROP``^3 crops: about (256/64)^3 = 64 times less
    work a step than whole volumes; the model, the schedule and the validation (on whole
    volumes) are the paper's."""
    return replace(paper_recipe(config), crop=CPU_CROP)


def paper_recipe(config: TrainConfig) -> TrainConfig:
    """``config`` with the paper's recipe (every :data:`RECIPE` field at its default)."""
    return replace(config, **{name: _config.default(name) for name in RECIPE})


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def duration(seconds: float) -> str:
    """'40 s', '12 min', '3.5 h', '2.1 days'."""
    if seconds < 90:
        return f"{math.ceil(seconds)} s"
    if seconds < 90 * 60:
        return f"{round(seconds / 60)} min"
    if seconds < 36 * 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"
