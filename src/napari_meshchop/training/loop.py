"""Training MeshNet: the paper's recipe as one generator, resumable to the step.

:func:`fit` trains a model on any dataset of ``(image, mask)`` pairs and yields typed
events (:class:`Step`, :class:`EpochEnd`, :class:`CheckpointWritten`, ``Notice``); it
checks a stop flag after every step and, when asked to stop, writes a resumable checkpoint
and returns a :class:`TrainResult` with ``stopped=True``. :mod:`.fold` runs it on one fold
of a downloaded cohort. The CLI and the Train widget drive the same generator.

Recipe (every value a :class:`~.config.TrainConfig` setting): AdamW (lr 1e-3, weight decay
3e-5, eps 1e-4), OneCycleLR stepped per batch (max_lr = lr, pct_start 0.01, div_factor 100),
cross-entropy with class weights [0.5, 1.0] and label smoothing 0.01, batch size 1,
50 epochs, fp16 autocast + GradScaler on CUDA and float32 elsewhere.

Exact resume: the data order of an epoch is a function of ``(seed, epoch)``, a crop of
``(seed, epoch, index)`` (:mod:`.sampling`); checkpoints hold model, optimizer, scheduler,
scaler, the RNG states of Python, numpy and torch, the epoch and the step within it
(:mod:`.state`). ``last.pt`` is written after every epoch (and on Stop), the one before it
kept as ``previous.pt``; ``best.pt`` is the epoch with the best validation lesion Dice.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Generator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from napari_meshchop import files
from napari_meshchop.errors import Cancelled, MeshchopError
from napari_meshchop.evaluation.evaluate import SubjectResult, evaluate_dataset
from napari_meshchop.events import (
    CheckpointWritten,
    EpochEnd,
    Notice,
    Progress,
    Step,
    StopFlag,
    relay,
    stop_requested,
)
from napari_meshchop.network import checkpoint as ckpt_io
from napari_meshchop.network.inference import FusedMeshNet, load_model, resolve_device
from napari_meshchop.network.model import MeshNet
from napari_meshchop.training import lean
from napari_meshchop.training.config import TrainConfig
from napari_meshchop.training.memory import (
    MODE_NOTES,
    choose_mode,
    forward,
    trainable_device,
    use_amp,
)
from napari_meshchop.training.sampling import (
    EpochView,
    epoch_order,
    seed_everything,
    seed_worker,
)
from napari_meshchop.training.state import (
    BEST,
    CONFIG,
    LAST,
    METRICS,
    PREVIOUS,
    read_metrics,
    resume_point,
    rng_state,
    set_rng_state,
    state_dict,
    to_cpu,
    trim_metrics,
)

# ---- events -------------------------------------------------------------------------

@dataclass
class TrainResult:
    out_dir: Path
    last: Path
    best: Path | None
    epochs_done: int
    step: int
    stopped: bool
    best_dice: float | None
    history: list[dict] = field(default_factory=list)

    @property
    def checkpoint(self) -> Path:
        """The checkpoint to segment with: the best one if validated, else the last."""
        return self.best if self.best is not None else self.last

# ---- the loop -------------------------------------------------------------------------------

class _Run:
    """A run's live state: the network, its optimizer, schedule and scaler, where it stands
    (epoch, position in the epoch, step, best Dice, history), and how it is saved."""

    def __init__(self, config: TrainConfig, device: torch.device, steps_per_epoch: int,
                 amp: bool):
        self.config, self.device, self.amp = config, device, amp
        self.steps_per_epoch = steps_per_epoch
        self.total = steps_per_epoch * config.epochs
        seed_everything(config.seed)
        self.model = MeshNet(config.arch).to(device)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=config.lr,
                                           weight_decay=config.weight_decay, eps=config.eps)
        self.scheduler = torch.optim.lr_scheduler.OneCycleLR(
            self.optimizer, max_lr=config.lr, total_steps=self.total,
            pct_start=config.pct_start, div_factor=config.div_factor)
        self.scaler = torch.amp.GradScaler("cuda", enabled=amp)
        weights = torch.tensor(config.class_weights, dtype=torch.float32, device=device)
        self.criterion = torch.nn.CrossEntropyLoss(weight=weights,
                                                   label_smoothing=config.label_smoothing)
        self.epoch, self.position, self.step, self.best_dice = 0, 0, 0, None
        self.history: list[dict] = []

    def train_mode(self) -> None:
        """The network in training mode; BatchNorm in eval mode when it is frozen."""
        self.model.train()
        if self.config.batch_norm == "frozen":
            for block in self.model.blocks:
                block.bn.eval()

    def start_from(self, model: str) -> str:
        """Load the weights of ``model`` (a file or pretrained name) before step 0."""
        ckpt, label = load_model(model)
        if ckpt.arch != self.config.arch or ckpt.preprocess != self.config.spec:
            raise MeshchopError(f"{model}: its network ({ckpt.arch.channels} channels, "
                                f"{ckpt.preprocess.name} {ckpt.preprocess.shape}) is not the "
                                "run's; fine-tuning keeps the checkpoint's")
        self.model.load_state_dict(ckpt.state_dict)
        return f"starting from the weights of {label}"

    def restore(self, state: ckpt_io.Checkpoint) -> None:
        t = state.training
        self.model.load_state_dict(state.state_dict)
        self.optimizer.load_state_dict(t["optimizer"])
        self.scheduler.load_state_dict(t["scheduler"])
        self.scaler.load_state_dict(t["scaler"])
        self.epoch, self.position, self.step = t["epoch"], t["position"], t["step"]
        self.best_dice, self.history = t.get("best_dice"), list(t.get("history", []))
        set_rng_state(t["rng"])

    def save(self, path: Path) -> CheckpointWritten:
        """Write a resumable checkpoint (the last one kept as ``previous.pt``)."""
        c = self.config
        training = {
            "config": c.to_dict(), "optimizer": to_cpu(self.optimizer.state_dict()),
            "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
            "epoch": self.epoch, "position": self.position, "step": self.step,
            "best_dice": self.best_dice, "history": self.history, "rng": rng_state(),
        }
        ckpt = ckpt_io.Checkpoint(c.arch, c.spec, state_dict(self.model),
                                  {"source": "napari-meshchop train", "epochs": self.epoch,
                                   "step": self.step, "seed": c.seed,
                                   **({"fine_tuned_from": c.init} if c.init else {})},
                                  training)
        if path.name == LAST and path.exists():
            os.replace(path, path.with_name(PREVIOUS))
        return CheckpointWritten(ckpt.save(path), self.epoch, self.step, path.name == BEST)

    def train_step(self, image: torch.Tensor, mask: torch.Tensor, memory_mode: str
                   ) -> tuple[float, float]:
        """One optimizer step; returns the loss and the learning rate it used."""
        image = image.to(self.device, non_blocking=True)
        target = mask.to(self.device, non_blocking=True).long()
        self.optimizer.zero_grad(set_to_none=True)
        with torch.autocast(self.device.type, dtype=torch.float16, enabled=self.amp):
            logits = forward(self.model, image, memory_mode)
            loss = self.criterion(logits.float(), target)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        lr = self.scheduler.get_last_lr()[0]
        self.scheduler.step()
        self.step += 1
        self.position += 1
        return float(loss.detach()), lr

    def loader(self, dataset) -> torch.utils.data.DataLoader:
        """The rest of this epoch's items, in the epoch's order, from where it stands."""
        c = self.config
        order = epoch_order(len(dataset), c.seed, self.epoch)
        view = EpochView(dataset, order[self.position * c.batch_size:], c, self.epoch)
        return torch.utils.data.DataLoader(
            view, batch_size=c.batch_size, shuffle=False, num_workers=c.workers,
            worker_init_fn=seed_worker,
            generator=torch.Generator().manual_seed(c.seed * 7919 + self.epoch))


def fit(
    dataset,
    out_dir: str | os.PathLike,
    config: TrainConfig | None = None,
    val_dataset=None,
    resume: bool = False,
    stop: StopFlag = None,
) -> Generator[Progress | EpochEnd | CheckpointWritten | Notice, None, TrainResult]:
    """Train MeshNet on ``dataset`` (items ``(image (1, D, H, W) float, mask (D, H, W))``).

    ``resume`` continues the newest valid checkpoint in ``out_dir`` exactly where it
    stopped, with the recipe it was started with and this session's machine settings.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = config or TrainConfig()
    state = None
    if resume:
        state, config, problems = resume_point(out_dir, config)
        for problem in problems:
            yield Notice(f"not resuming from {problem}")
    device = resolve_device(config.device)
    amp = use_amp(config, device)
    if amp and device.type != "cuda":
        raise MeshchopError("fp16 autocast needs a CUDA device; use --amp off")
    device, problem = trainable_device(device, config.arch)
    if problem:
        yield Notice(problem)

    run = _Run(config, device, math.ceil(len(dataset) / config.batch_size), amp)
    if state is not None:
        run.restore(state)
        trim_metrics(out_dir / METRICS, run.step, run.epoch)
        yield Notice(f"resuming at epoch {run.epoch + 1}, step {run.step} of {run.total}")
    else:
        if config.init:
            yield Notice(run.start_from(config.init))
        elif config.batch_norm == "frozen":
            raise MeshchopError("frozen BatchNorm keeps a trained checkpoint's statistics; "
                                "start from one (fine-tuning)")
        files.write_json(out_dir / CONFIG, config.to_dict())
        (out_dir / METRICS).unlink(missing_ok=True)

    sample_shape = tuple(dataset[0][0].shape[-3:]) if len(dataset) else (1, 1, 1)
    if config.crop:
        sample_shape = tuple(min(config.crop, s) for s in sample_shape)
    memory_mode = choose_mode(config, sample_shape, device, config.arch.dropout)
    if memory_mode != "plain":
        yield Notice(f"activation memory: {memory_mode} ({MODE_NOTES[memory_mode]})")
        lean.return_freed_memory()
    best_path = out_dir / BEST if (out_dir / BEST).exists() else None
    stopped = False
    with open(out_dir / METRICS, "a") as metrics_log:
        try:
            while run.epoch < config.epochs and not stopped:
                stopped = yield from _epoch(run, dataset, val_dataset, memory_mode,
                                            out_dir, metrics_log, stop)
                if (out_dir / BEST).exists():
                    best_path = out_dir / BEST
        finally:
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return TrainResult(out_dir, out_dir / LAST, best_path, run.epoch, run.step, stopped,
                       run.best_dice, run.history)


def _epoch(run: _Run, dataset, val_dataset, memory_mode: str, out_dir: Path, metrics_log,
           stop: StopFlag) -> Generator:
    """Train (the rest of) one epoch, validate, checkpoint; return whether it stopped."""
    c, epoch = run.config, run.epoch

    def log(record: dict) -> None:
        metrics_log.write(json.dumps(record) + "\n")
        metrics_log.flush()

    started = time.perf_counter()
    run.train_mode()
    losses = [r["loss"] for r in read_metrics(out_dir / METRICS)
              if r.get("kind") == "step" and r["epoch"] == epoch]
    for image, mask in run.loader(dataset):
        loss, lr = run.train_step(image, mask, memory_mode)
        losses.append(loss)
        log({"kind": "step", "epoch": epoch, "step": run.step, "loss": loss, "lr": lr})
        yield Step("train", run.step, run.total, f"epoch {epoch + 1}/{c.epochs}",
                   epoch=epoch, loss=loss, lr=lr)
        if stop_requested(stop) and run.position < run.steps_per_epoch:
            yield run.save(out_dir / LAST)
            return True
    val = None
    if val_dataset is not None and len(val_dataset):
        try:
            val = yield from validate(FusedMeshNet(run.model, run.device), val_dataset, stop)
        except Cancelled:  # the epoch's training is kept; resume validates it
            yield run.save(out_dir / LAST)
            return True
    seconds = time.perf_counter() - started
    record = {"kind": "epoch", "epoch": epoch, "step": run.step,
              "train_loss": float(np.mean(losses)) if losses else float("nan"),
              "val_dice": val, "seconds": seconds}
    run.history.append(record)
    log(record)
    is_best = val is not None and (run.best_dice is None or val > run.best_dice)
    if is_best:
        run.best_dice = val
    run.epoch, run.position = epoch + 1, 0
    written = run.save(out_dir / LAST)
    yield EpochEnd(epoch, c.epochs, record["train_loss"], val, seconds)
    yield written
    if is_best:
        yield run.save(out_dir / BEST)
    return stop_requested(stop) and run.epoch < c.epochs


def validate(fused, dataset, stop: StopFlag = None) -> Generator[Progress, None, float]:
    """Mean lesion Dice over ``dataset``, through the one evaluation core."""
    results = yield from relay(evaluate_dataset(fused, dataset, stop=stop), _validation_progress)
    return float(np.mean([r.scores["dice"] for r in results]))


def _validation_progress(event):
    if isinstance(event, SubjectResult):
        if event.error:
            raise MeshchopError(f"validation of {event.subject} failed: {event.error}")
        return Progress("validate", event.index + 1, event.total, event.subject)
    return None
