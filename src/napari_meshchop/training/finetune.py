"""Fine-tuning: a trained checkpoint taught with corrected masks, through the one training
loop (:func:`.loop.fit` with ``TrainConfig.init``), then scored before and after.

The checkpoint's architecture and preprocessing are kept; the recipe's defaults change to
what adapting a trained network wants (``config.FINETUNE``): a learning rate ten times lower,
random 128^3 crops, three of four centred on a lesion voxel (the rest fall anywhere, where
deleted false positives live), and the lean step, so that a CPU fine-tunes 256^3 scans in
minutes per epoch and under 4 GB. Stop and ``resume`` work as in training.

Which pairs: with an outer fold K of the folder's folds, it trains on K's training part and
then scores the old and the new checkpoint on K's test part (held-out corrected pairs) with
the one evaluation core; with ``outer_fold=None`` it trains on every pair and scores nothing.
"""

from __future__ import annotations

import os
from collections.abc import Generator
from dataclasses import dataclass, field
from pathlib import Path

from napari_meshchop.data import folds as _folds
from napari_meshchop.data import manifest as _manifest
from napari_meshchop.data.cache import ArcDataset
from napari_meshchop.errors import MeshchopError
from napari_meshchop.evaluation.compare import Comparison, compare
from napari_meshchop.events import StopFlag
from napari_meshchop.network import registry
from napari_meshchop.network.inference import load_model
from napari_meshchop.training.config import FINETUNE, TrainConfig, names
from napari_meshchop.training.loop import TrainResult, fit
from napari_meshchop.training.state import resume_point


@dataclass
class FinetuneResult:
    training: TrainResult
    held_out: list[str] = field(default_factory=list)
    comparison: Comparison | None = None  # None: nothing held out, or stopped

    @property
    def checkpoint(self) -> Path:
        return self.training.checkpoint


def default_fold(data_dir: str | os.PathLike) -> int | None:
    """Outer fold 0 when the folder has folds, else None (train on every pair)."""
    return 0 if (Path(data_dir) / _folds.NAME).is_file() else None


def finetune_config(model: str | os.PathLike, data_dir: str | os.PathLike,
                    outer_fold: int | None = 0, **settings) -> TrainConfig:
    """The run's settings: the checkpoint's network and grid, ``config.FINETUNE``, then
    ``settings`` (TrainConfig fields; None leaves the default)."""
    ckpt, _ = load_model(model)
    text = os.fspath(model)
    init = text if text in registry.REGISTRY else str(Path(text).resolve())
    chosen = {**FINETUNE, **{k: v for k, v in settings.items() if v is not None}}
    return TrainConfig(**chosen, channels=ckpt.arch.channels, dilations=ckpt.arch.dilations,
                       preprocess=ckpt.preprocess.to_dict(), init=init,
                       data_dir=str(data_dir), outer_fold=outer_fold,
                       full_outer=outer_fold is not None)


def resume_config(data_dir: str | os.PathLike = "", **machine) -> TrainConfig:
    """What ``finetune(..., resume=True)`` needs: this session's machine settings (those
    given, else fine-tuning's defaults) and, when the data moved, the data folder."""
    chosen = {k: v for k, v in FINETUNE.items() if k in names("machine")}
    chosen.update({k: v for k, v in machine.items() if v is not None})
    return TrainConfig(**chosen, data_dir=str(data_dir or ""))


def parts(config: TrainConfig) -> tuple[list[str], list[str]]:
    """The pairs to train on and those held out for before and after."""
    if config.outer_fold is None:
        return sorted(p.id for p in _manifest.load_complete(config.data_dir).pairs), []
    return (_folds.fold_ids(config.data_dir, config.outer_fold, "train"),
            _folds.fold_ids(config.data_dir, config.outer_fold, "test"))


def finetune(config: TrainConfig, out_dir: str | os.PathLike, resume: bool = False,
             stop: StopFlag = None) -> Generator[object, None, FinetuneResult]:
    """Fine-tune ``config.init`` on the folder's pairs, then score it before and after."""
    if resume:  # the run's own recipe, checkpoint and pairs
        _, config, _ = resume_point(out_dir, config)
    if not config.init:
        raise MeshchopError(f"{out_dir}: not a fine-tuning run (no starting checkpoint)")
    train_ids, held_out = parts(config)
    if not train_ids:
        raise MeshchopError(f"{config.data_dir}: no pairs to fine-tune on")
    data = ArcDataset(config.data_dir, train_ids, config.spec)
    trained = yield from fit(data, out_dir, config, None, resume, stop)
    result = FinetuneResult(trained, held_out)
    if held_out and not trained.stopped:
        result.comparison = yield from compare(config.init, trained.last, config.data_dir,
                                               held_out, config.device, stop)
        result.comparison.write(out_dir)
    return result
