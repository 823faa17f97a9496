"""Training on one fold of a downloaded cohort: the fold's subjects from the saved folds,
through the preprocessing cache, into :func:`.loop.fit`."""

from __future__ import annotations

import os

from napari_meshchop.data.cache import ArcDataset
from napari_meshchop.data.folds import fold_ids
from napari_meshchop.errors import MeshchopError
from napari_meshchop.events import StopFlag
from napari_meshchop.training.config import TrainConfig
from napari_meshchop.training.loop import fit
from napari_meshchop.training.state import resume_point


def train(config: TrainConfig, out_dir: str | os.PathLike, resume: bool = False,
          stop: StopFlag = None):
    """Train on the fold of ``config.data_dir`` that the config names."""
    if resume:  # the fold and recipe are those of the run being resumed
        _, config, _ = resume_point(out_dir, config)
    if config.outer_fold is None:
        raise MeshchopError("choose an outer fold (--outer-fold)")
    inner = None if config.full_outer else config.inner_fold
    train_ids = fold_ids(config.data_dir, config.outer_fold, "train", inner)
    val_ids = fold_ids(config.data_dir, config.outer_fold, "val", inner) if inner is not None \
        else []
    spec = config.spec
    data = ArcDataset(config.data_dir, train_ids, spec)
    val = ArcDataset(config.data_dir, val_ids, spec) if val_ids else None
    return (yield from fit(data, out_dir, config, val, resume, stop))
