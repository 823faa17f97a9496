"""The data of an epoch: its order and crops, functions of (seed, epoch, index) only, so that
a resumed run sees exactly the data it would have seen."""

from __future__ import annotations

import random

import numpy as np
import torch

from napari_meshchop.training.config import TrainConfig


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The data order of an epoch: a function of ``(seed, epoch)`` only."""
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(n, generator=g).tolist()


def random_crop(image: torch.Tensor, mask: torch.Tensor, size: int, lesion_share: float,
                rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A ``size``^3 crop; with probability ``lesion_share`` centred on a lesion voxel."""
    shape = mask.shape[-3:]
    size3 = [min(size, s) for s in shape]
    lesion = torch.nonzero(mask.reshape(shape)) if rng.random() < lesion_share else None
    if lesion is not None and len(lesion):
        centre = lesion[int(rng.integers(len(lesion)))].tolist()
        start = [min(max(c - k // 2, 0), s - k) for c, k, s in zip(centre, size3, shape)]
    else:
        start = [int(rng.integers(s - k + 1)) for k, s in zip(size3, shape)]
    sl = tuple(slice(a, a + k) for a, k in zip(start, size3))
    return image[(..., *sl)], mask[(..., *sl)]


class EpochView(torch.utils.data.Dataset):
    """The items of one epoch, in order, from a given position; cropped if asked."""

    def __init__(self, dataset, order: list[int], config: TrainConfig, epoch: int):
        self.dataset, self.order, self.config, self.epoch = dataset, order, config, epoch

    def __len__(self):
        return len(self.order)

    def __getitem__(self, i):
        index = self.order[i]
        image, mask = self.dataset[index]
        if self.config.crop:
            rng = np.random.default_rng([self.config.seed, self.epoch, index])
            image, mask = random_crop(image, mask, self.config.crop,
                                      self.config.lesion_crop_share, rng)
        return image, mask


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def seed_worker(worker_id: int) -> None:
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    np.random.seed(seed)

