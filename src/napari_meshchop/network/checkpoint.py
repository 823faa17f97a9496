"""One checkpoint format: architecture, preprocessing, weights and provenance.

Saved with ``torch.save`` as a dict of plain types and tensors, so it loads with
``torch.load(weights_only=True)``: opening a downloaded checkpoint never runs code.
Checkpoints of arc-meshchop (the public reproduction of the paper) are imported
on load, with the preprocessing they were trained with.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from napari_meshchop import files
from napari_meshchop.errors import InputError, reason
from napari_meshchop.imaging.preprocess import PreprocessSpec
from napari_meshchop.network.model import PAPER_DILATIONS, Architecture, MeshNet

FORMAT = "napari-meshchop/checkpoint"
VERSION = 1


@dataclass
class Checkpoint:
    arch: Architecture
    preprocess: PreprocessSpec
    state_dict: dict[str, torch.Tensor]
    provenance: dict = field(default_factory=dict)
    # Training state (optimizer, scheduler, epoch, ...) lives here so that one
    # file serves both resuming and inference.
    training: dict = field(default_factory=dict)

    def build(self) -> MeshNet:
        model = MeshNet(self.arch)
        model.load_state_dict(self.state_dict)
        return model.eval()

    def to_dict(self) -> dict:
        return {
            "format": FORMAT,
            "version": VERSION,
            "arch": self.arch.to_dict(),
            "preprocess": self.preprocess.to_dict(),
            "state_dict": self.state_dict,
            "provenance": dict(self.provenance),
            "training": dict(self.training),
        }

    def save(self, path: str | os.PathLike) -> Path:
        """Write atomically: a crash mid-write never leaves a half checkpoint at ``path``."""
        with files.atomic_file(path) as fh:
            torch.save(self.to_dict(), fh)
        return Path(path)


def from_model(model: MeshNet, preprocess: PreprocessSpec, **provenance) -> Checkpoint:
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    return Checkpoint(model.arch, preprocess, state, provenance)


def load(path: str | os.PathLike) -> Checkpoint:
    """Load our checkpoint or an arc-meshchop one; raise InputError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "checkpoint file not found")
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a damaged or foreign file
        raise InputError(path, f"not a readable checkpoint ({reason(exc)})") from None
    if not isinstance(raw, dict):
        raise InputError(path, f"not a MeshNet checkpoint (holds a {type(raw).__name__})")
    if raw.get("format") == FORMAT:
        ckpt = _from_ours(raw, path)
    elif "model_state_dict" in raw and any(k.startswith("network.") for k in raw["model_state_dict"]):
        ckpt = import_arc_meshchop(raw, path)
    else:
        raise InputError(path, "not a MeshNet checkpoint (unknown format)")
    _check_weights(ckpt, path)
    return ckpt


def _from_ours(raw: dict, path: Path) -> Checkpoint:
    if raw.get("version", 0) > VERSION:
        raise InputError(path, f"checkpoint version {raw['version']} is newer than this "
                         f"napari-meshchop understands ({VERSION}); upgrade the package")
    try:
        return Checkpoint(
            arch=Architecture.from_dict(raw["arch"]),
            preprocess=PreprocessSpec.from_dict(raw["preprocess"]),
            state_dict=raw["state_dict"],
            provenance=raw.get("provenance", {}),
            training=raw.get("training", {}),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise InputError(path, f"damaged checkpoint ({reason(exc)})") from None


def import_arc_meshchop(raw: dict, path: str | os.PathLike = "") -> Checkpoint:
    """Translate arc-meshchop's keys (``network.{i}.conv``/``.bn``, ``network.9``) to ours."""
    sd = raw["model_state_dict"]
    n_blocks = 1 + max(int(k.split(".")[1]) for k in sd if ".conv." in k)
    head = f"network.{n_blocks}"
    try:
        channels = sd["network.0.conv.weight"].shape[0]
        n_classes = sd[f"{head}.weight"].shape[0]
    except KeyError as exc:
        raise InputError(path, f"arc-meshchop checkpoint lacks {exc}") from None
    dilations = PAPER_DILATIONS if n_blocks == len(PAPER_DILATIONS) else None
    if dilations is None:
        raise InputError(path, f"arc-meshchop checkpoint with {n_blocks} blocks; "
                         f"only the paper's {len(PAPER_DILATIONS)} are known")
    ours = {}
    for key, value in sd.items():
        _, index, *rest = key.split(".")
        if int(index) == n_blocks:
            ours[".".join(["head", *rest])] = value
        else:
            layer = {"conv": "0", "bn": "1"}[rest[0]]
            ours[".".join(["blocks", index, layer, *rest[1:]])] = value
    config = raw.get("config", {})
    state = raw.get("training_state", {})
    provenance = {
        "source": "arc-meshchop",
        "imported_from": Path(path).name if path else "",
        "epochs": int(config.get("epochs", state.get("epoch", -1) + 1)),
        "learning_rate": float(config.get("learning_rate", float("nan"))),
        "weight_decay": float(config.get("weight_decay", float("nan"))),
        "global_step": int(state.get("global_step", -1)),
    }
    arch = Architecture(channels=channels, dilations=dilations, n_classes=n_classes)
    return Checkpoint(arch, PreprocessSpec(name="ras-minmax"), ours, provenance)


def _check_weights(ckpt: Checkpoint, path: Path) -> None:
    expected = MeshNet(ckpt.arch).state_dict()
    missing = sorted(set(expected) - set(ckpt.state_dict))
    extra = sorted(set(ckpt.state_dict) - set(expected))
    wrong = [k for k in expected if k in ckpt.state_dict
             and tuple(ckpt.state_dict[k].shape) != tuple(expected[k].shape)]
    if missing or extra or wrong:
        detail = "; ".join(filter(None, [
            f"missing {', '.join(missing[:3])}" if missing else "",
            f"unexpected {', '.join(extra[:3])}" if extra else "",
            f"wrong shape for {', '.join(wrong[:3])}" if wrong else "",
        ]))
        raise InputError(path, f"weights do not fit MeshNet(channels={ckpt.arch.channels}, "
                         f"dilations={list(ckpt.arch.dilations)}): {detail}")

