"""Training MeshNet: the paper's recipe as one generator, resumable to the step.

:func:`fit` trains a model on any dataset of ``(image, mask)`` pairs and yields typed
events (:class:`Step`, :class:`EpochEnd`, :class:`CheckpointWritten`, :class:`Notice`);
it checks a stop flag after every step and, when asked to stop, writes a resumable
checkpoint and returns a :class:`TrainResult` with ``stopped=True``. :func:`train` runs
it on one fold of a downloaded cohort. The CLI and the Train widget drive the same
generator.

Recipe (every value a :class:`TrainConfig` field): AdamW (lr 1e-3, weight decay 3e-5,
eps 1e-4), OneCycleLR stepped per batch (max_lr = lr, pct_start 0.01, div_factor 100),
cross-entropy with class weights [0.5, 1.0] and label smoothing 0.01, batch size 1,
50 epochs, fp16 autocast + GradScaler on CUDA and float32 elsewhere.

Exact resume: the data order of an epoch is a function of ``(seed, epoch)``, a crop of
``(seed, epoch, index)``; checkpoints hold model, optimizer, scheduler, scaler, the RNG
states of Python, numpy and torch, the epoch and the step within it. ``last.pt`` is
written after every epoch (and on Stop), the one before it kept as ``previous.pt``;
``best.pt`` is the epoch with the best validation lesion Dice.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from collections.abc import Generator, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint as _checkpoint

from napari_meshchop import files
from napari_meshchop.errors import Cancelled, InputError, MeshchopError
from napari_meshchop.events import Progress, StopFlag, stop_requested
from napari_meshchop.imaging.preprocess import PreprocessSpec
from napari_meshchop.network import checkpoint as ckpt_io
from napari_meshchop.network.model import PAPER_DILATIONS, Architecture, Block, MeshNet
from napari_meshchop.training import lean

LAST, PREVIOUS, BEST = "last.pt", "previous.pt", "best.pt"
CONFIG, METRICS = "config.json", "metrics.jsonl"


@dataclass
class TrainConfig:
    channels: int = 26
    dilations: tuple[int, ...] = PAPER_DILATIONS
    epochs: int = 50
    lr: float = 1e-3
    weight_decay: float = 3e-5
    eps: float = 1e-4
    pct_start: float = 0.01
    div_factor: float = 100.0
    class_weights: tuple[float, float] = (0.5, 1.0)
    label_smoothing: float = 0.01
    batch_size: int = 1
    seed: int = 42
    device: str = "auto"
    amp: str = "auto"  # auto (fp16 on CUDA), on, off
    activation_checkpointing: str = "auto"  # auto (when the volume would not fit), on, off
    memory_gb: float | None = None  # memory to plan for; None: what the device has free
    crop: int | None = None  # train on random crops of crop^3 voxels
    lesion_crop_share: float = 0.5  # share of crops centred on a lesion voxel
    workers: int = 0
    preprocess: dict = field(default_factory=lambda: PreprocessSpec().to_dict())
    # Where the data came from (for the record; fit() does not read these).
    data_dir: str = ""
    outer_fold: int | None = None
    inner_fold: int | None = None
    full_outer: bool = False

    def __post_init__(self):
        self.dilations = tuple(int(d) for d in self.dilations)
        self.class_weights = tuple(float(w) for w in self.class_weights)
        if self.epochs < 1 or self.batch_size < 1 or self.lr <= 0:
            raise MeshchopError("epochs, batch size and learning rate must be positive")
        for name, choices in (("amp", ("auto", "on", "off")),
                              ("activation_checkpointing", ("auto", "on", "off"))):
            if getattr(self, name) not in choices:
                raise MeshchopError(f"{name} must be one of {', '.join(choices)}")

    @property
    def arch(self) -> Architecture:
        return Architecture(channels=self.channels, dilations=self.dilations)

    @property
    def spec(self) -> PreprocessSpec:
        return PreprocessSpec.from_dict(self.preprocess)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["dilations"], d["class_weights"] = list(self.dilations), list(self.class_weights)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


def load_params(path: str | os.PathLike) -> dict:
    """Hyperparameters from a JSON file, as :class:`TrainConfig` fields.

    The file is either a flat object of fields (``{"channels": 16, "lr": 0.003}``) or one
    with them under ``"params"`` (what ``meshchop hpo`` writes, beside its provenance).
    """
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise InputError(path, "no such file") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise InputError(path, f"not a JSON file of parameters ({exc})") from None
    params = raw.get("params", raw) if isinstance(raw, dict) else None
    if not isinstance(params, dict):
        raise InputError(path, "expected a JSON object of training parameters")
    known = {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(params) - known)
    if unknown:
        raise InputError(path, f"unknown parameters {', '.join(unknown)} "
                         f"(known: {', '.join(sorted(known))})")
    try:
        TrainConfig(**params)
    except (TypeError, ValueError, MeshchopError) as exc:
        raise InputError(path, f"invalid parameters: {exc}") from None
    return params


# ---- events -------------------------------------------------------------------------

@dataclass(frozen=True)
class Step(Progress):
    """One optimizer step: ``done`` of ``total`` steps of the whole run."""

    epoch: int = 0
    loss: float = float("nan")
    lr: float = float("nan")


@dataclass(frozen=True)
class EpochEnd:
    epoch: int  # 0-based; epochs done = epoch + 1
    epochs: int
    train_loss: float
    val_dice: float | None
    seconds: float


@dataclass(frozen=True)
class CheckpointWritten:
    path: Path
    epoch: int
    step: int
    best: bool = False


@dataclass(frozen=True)
class Notice:
    message: str


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


# ---- memory-lean forward ---------------------------------------------------------------

def _block_forward(block: Block, x: torch.Tensor, update_stats: bool) -> torch.Tensor:
    """A block in training mode; ``update_stats=False`` leaves BN running stats alone.

    The output is the same either way (training-mode BN normalises with batch statistics).
    """
    bn = block.bn
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
_MODE_NOTES = {"lean": "one activation kept per block, ReLU outputs recomputed",
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
    import psutil

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


# ---- data ---------------------------------------------------------------------------------

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


class _EpochView(torch.utils.data.Dataset):
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


def _seed_worker(worker_id: int) -> None:
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    np.random.seed(seed)


def rng_state() -> dict:
    py = random.getstate()
    npy = np.random.get_state()
    return {
        "python": {"version": py[0], "state": torch.tensor(py[1], dtype=torch.int64),
                   "gauss": py[2]},
        "numpy": {"name": npy[0], "keys": torch.from_numpy(npy[1].astype(np.int64)),
                  "pos": int(npy[2]), "has_gauss": int(npy[3]), "gauss": float(npy[4])},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict) -> None:
    py = state["python"]
    random.setstate((py["version"], tuple(int(v) for v in py["state"].tolist()), py["gauss"]))
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"],
                         n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---- checkpoints --------------------------------------------------------------------------

def find_resumable(out_dir: str | os.PathLike) -> tuple[ckpt_io.Checkpoint | None, list[str]]:
    """The newest readable training checkpoint in ``out_dir`` and why others were skipped.

    A damaged or truncated file is never chosen; its problem is in the returned list.
    """
    out_dir = Path(out_dir)
    found, problems = [], []
    for name in (LAST, PREVIOUS):
        path = out_dir / name
        if not path.exists():
            continue
        try:
            ckpt = ckpt_io.load(path)
        except InputError as exc:
            problems.append(str(exc))
            continue
        if "optimizer" not in ckpt.training:
            problems.append(f"{path}: holds no training state")
            continue
        found.append(ckpt)
    if not found:
        return None, problems
    return max(found, key=lambda c: c.training["step"]), problems


def _state_dict(model: MeshNet) -> dict:
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def _to_cpu(obj):
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu().clone()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


# ---- the loop -------------------------------------------------------------------------------

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
    stopped, with the configuration it was started with (the device may differ).
    """
    from napari_meshchop.network.inference import FusedMeshNet, resolve_device

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = config or TrainConfig()
    state = None
    if resume:
        found, problems = find_resumable(out_dir)
        for problem in problems:
            yield Notice(f"not resuming from {problem}")
        if found is None:
            raise MeshchopError(f"{out_dir}: no valid checkpoint to resume from"
                                + (f" ({'; '.join(problems)})" if problems else ""))
        device_choice = config.device
        config = TrainConfig.from_dict(found.training["config"])
        config.device = device_choice
        state = found
    device = resolve_device(config.device)
    amp = use_amp(config, device)
    if amp and device.type != "cuda":
        raise MeshchopError("fp16 autocast needs a CUDA device; use --amp off")

    device, problem = trainable_device(device, config.arch)
    if problem:
        yield Notice(problem)

    seed_everything(config.seed)
    model = MeshNet(config.arch).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr,
                                  weight_decay=config.weight_decay, eps=config.eps)
    steps_per_epoch = math.ceil(len(dataset) / config.batch_size)
    total = steps_per_epoch * config.epochs
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=config.lr, total_steps=total, pct_start=config.pct_start,
        div_factor=config.div_factor)
    scaler = torch.amp.GradScaler("cuda", enabled=amp)
    weights = torch.tensor(config.class_weights, dtype=torch.float32, device=device)
    criterion = torch.nn.CrossEntropyLoss(weight=weights, label_smoothing=config.label_smoothing)

    epoch, position, step, best_dice, history = 0, 0, 0, None, []
    if state is not None:
        t = state.training
        model.load_state_dict(state.state_dict)
        optimizer.load_state_dict(t["optimizer"])
        scheduler.load_state_dict(t["scheduler"])
        scaler.load_state_dict(t["scaler"])
        epoch, position, step = t["epoch"], t["position"], t["step"]
        best_dice, history = t.get("best_dice"), list(t.get("history", []))
        set_rng_state(t["rng"])
        _trim_metrics(out_dir / METRICS, step, epoch)
        yield Notice(f"resuming at epoch {epoch + 1}, step {step} of {total}")
    else:
        files.write_json(out_dir / CONFIG, config.to_dict())
        (out_dir / METRICS).unlink(missing_ok=True)

    sample_shape = tuple(dataset[0][0].shape[-3:]) if len(dataset) else (1, 1, 1)
    if config.crop:
        sample_shape = tuple(min(config.crop, s) for s in sample_shape)
    memory_mode = choose_mode(config, sample_shape, device, config.arch.dropout)
    if memory_mode != "plain":
        yield Notice(f"activation memory: {memory_mode} ({_MODE_NOTES[memory_mode]})")
        lean.return_freed_memory()
    spec = config.spec
    best_path = out_dir / BEST if (out_dir / BEST).exists() else None
    metrics_log = open(out_dir / METRICS, "a")  # noqa: SIM115 - closed in the finally below

    def save(path: Path, epoch_: int, position_: int) -> Path:
        training = {
            "config": config.to_dict(), "optimizer": _to_cpu(optimizer.state_dict()),
            "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
            "epoch": epoch_, "position": position_, "step": step, "best_dice": best_dice,
            "history": history, "rng": rng_state(),
        }
        ckpt = ckpt_io.Checkpoint(config.arch, spec, _state_dict(model),
                                  {"source": "napari-meshchop train", "epochs": epoch_,
                                   "step": step, "seed": config.seed}, training)
        if path.name == LAST and path.exists():
            os.replace(path, out_dir / PREVIOUS)
        return ckpt.save(path)

    def log(record: dict) -> None:
        metrics_log.write(json.dumps(record) + "\n")
        metrics_log.flush()

    stopped = False
    try:
        while epoch < config.epochs and not stopped:
            started = time.perf_counter()
            model.train()
            order = epoch_order(len(dataset), config.seed, epoch)
            view = _EpochView(dataset, order[position * config.batch_size:], config, epoch)
            loader = torch.utils.data.DataLoader(
                view, batch_size=config.batch_size, shuffle=False, num_workers=config.workers,
                worker_init_fn=_seed_worker,
                generator=torch.Generator().manual_seed(config.seed * 7919 + epoch))
            losses = [r["loss"] for r in _read_metrics(out_dir / METRICS)
                      if r.get("kind") == "step" and r["epoch"] == epoch]
            for image, mask in loader:
                image = image.to(device, non_blocking=True)
                target = mask.to(device, non_blocking=True).long()
                optimizer.zero_grad(set_to_none=True)
                with torch.autocast(device.type, dtype=torch.float16, enabled=amp):
                    logits = forward(model, image, memory_mode)
                    loss = criterion(logits.float(), target)
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
                lr = scheduler.get_last_lr()[0]
                scheduler.step()
                step += 1
                position += 1
                value = float(loss.detach())
                losses.append(value)
                log({"kind": "step", "epoch": epoch, "step": step, "loss": value, "lr": lr})
                yield Step("train", step, total, f"epoch {epoch + 1}/{config.epochs}",
                           epoch=epoch, loss=value, lr=lr)
                if stop_requested(stop) and position < steps_per_epoch:
                    stopped = True
                    break
            if stopped:
                path = save(out_dir / LAST, epoch, position)
                yield CheckpointWritten(path, epoch, step)
                break
            val = None
            if val_dataset is not None and len(val_dataset):
                try:
                    val = yield from validate(FusedMeshNet(model, device), val_dataset, stop)
                except Cancelled:  # the epoch's training is kept; resume validates it
                    stopped = True
                    path = save(out_dir / LAST, epoch, position)
                    yield CheckpointWritten(path, epoch, step)
                    break
            seconds = time.perf_counter() - started
            record = {"kind": "epoch", "epoch": epoch, "step": step,
                      "train_loss": float(np.mean(losses)) if losses else float("nan"),
                      "val_dice": val, "seconds": seconds}
            history.append(record)
            log(record)
            is_best = val is not None and (best_dice is None or val > best_dice)
            if is_best:
                best_dice = val
            epoch, position = epoch + 1, 0
            path = save(out_dir / LAST, epoch, position)
            yield EpochEnd(epoch - 1, config.epochs, record["train_loss"], val, seconds)
            yield CheckpointWritten(path, epoch, step)
            if is_best:
                best_path = save(out_dir / BEST, epoch, position)
                yield CheckpointWritten(best_path, epoch, step, best=True)
            if stop_requested(stop) and epoch < config.epochs:
                stopped = True
    finally:
        metrics_log.close()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return TrainResult(out_dir, out_dir / LAST, best_path, epoch, step, stopped, best_dice,
                       history)


def validate(fused, dataset, stop: StopFlag = None) -> Generator[Progress, None, float]:
    """Mean lesion Dice over ``dataset``, through the one evaluation core."""
    from napari_meshchop.evaluation.evaluate import SubjectResult, evaluate_dataset

    job = evaluate_dataset(fused, dataset, stop=stop)
    while True:
        try:
            event = next(job)
        except StopIteration as finished:
            results = finished.value
            break
        if isinstance(event, SubjectResult):
            if event.error:
                raise MeshchopError(f"validation of {event.subject} failed: {event.error}")
            yield Progress("validate", event.index + 1, event.total, event.subject)
    return float(np.mean([r.scores["dice"] for r in results]))


def _read_metrics(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            pass  # a line cut short by a kill
    return out


def _trim_metrics(path: Path, step: int, epoch: int) -> None:
    """Drop the records written after the checkpoint being resumed."""
    kept = [r for r in _read_metrics(path)
            if (r["kind"] == "step" and r["step"] <= step)
            or (r["kind"] == "epoch" and r["epoch"] < epoch)]
    files.write_bytes(path, "".join(json.dumps(r) + "\n" for r in kept).encode())


# ---- one fold of a cohort -------------------------------------------------------------------

def train(config: TrainConfig, out_dir: str | os.PathLike, resume: bool = False,
          stop: StopFlag = None):
    """Train on the fold of ``config.data_dir`` that the config names."""
    from napari_meshchop.data.cache import ArcDataset
    from napari_meshchop.evaluation.evaluate import fold_ids

    if resume:  # the fold and recipe are those of the run being resumed
        found, problems = find_resumable(out_dir)
        if found is None:
            raise MeshchopError(f"{out_dir}: no valid checkpoint to resume from"
                                + (f" ({'; '.join(problems)})" if problems else ""))
        here = config
        config = TrainConfig.from_dict(found.training["config"])
        config.device = here.device
        # The data may have moved (another machine, a shared disk mounted elsewhere).
        if here.data_dir and (Path(here.data_dir) / "folds.json").is_file():
            config.data_dir = here.data_dir
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
