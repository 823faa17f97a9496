"""What a run leaves on disk to be resumed: checkpoints with the RNG states, the metrics log,
and the one way back into a run (:func:`resume_point`)."""

from __future__ import annotations

import json
import os
import random
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from napari_meshchop import files
from napari_meshchop.errors import InputError, MeshchopError
from napari_meshchop.network import checkpoint as ckpt_io
from napari_meshchop.network.model import MeshNet
from napari_meshchop.training import config as _config
from napari_meshchop.training.config import TrainConfig

LAST, PREVIOUS, BEST = "last.pt", "previous.pt", "best.pt"
CONFIG, METRICS = "config.json", "metrics.jsonl"


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


def state_dict(model: MeshNet) -> dict:
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def to_cpu(obj):
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu().clone()
    if isinstance(obj, dict):
        return {k: to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_cpu(v) for v in obj)
    return obj


def read_metrics(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            pass  # a line cut short by a kill
    return out


def trim_metrics(path: Path, step: int, epoch: int) -> None:
    """Drop the records written after the checkpoint being resumed."""
    kept = [r for r in read_metrics(path)
            if (r["kind"] == "step" and r["step"] <= step)
            or (r["kind"] == "epoch" and r["epoch"] < epoch)]
    files.write_bytes(path, "".join(json.dumps(r) + "\n" for r in kept).encode())



def resume_point(out_dir: str | os.PathLike, given: TrainConfig
                 ) -> tuple[ckpt_io.Checkpoint, TrainConfig, list[str]]:
    """The checkpoint to continue in ``out_dir``, the run's own configuration with this
    session's machine settings (device, memory, workers), and why other files were skipped.

    The recipe and the fold are the run's; the data folder given now is used when it holds
    folds (the data moved to another machine or mount).
    """
    found, problems = find_resumable(out_dir)
    if found is None:
        raise MeshchopError(f"{out_dir}: no valid checkpoint to resume from"
                            + (f" ({'; '.join(problems)})" if problems else ""))
    config = TrainConfig.from_dict(found.training["config"])
    config = replace(config, **{k: getattr(given, k) for k in _config.names("machine")})
    if given.data_dir and (Path(given.data_dir) / "folds.json").is_file():
        config = replace(config, data_dir=given.data_dir)
    return found, config, problems
