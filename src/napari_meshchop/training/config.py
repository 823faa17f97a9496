"""The training settings: the one list of them, their defaults, help and bounds.

Every setting is a :class:`TrainConfig` field whose metadata (:class:`Setting`) says what
it is for. The command line's flags (``train``, ``experiment``, ``hpo``), the Train widget's
fields, the fields an experiment plan compares, the hyperparameter search's space and the
``--params`` files are all derived from here, so a setting and its default exist once.

Roles:

* ``recipe``: what is computed. Runs that differ here are different experiments.
* ``machine``: how it is computed on this machine (device, memory, workers); another
  session or machine may change these without changing the results' meaning.
* ``data``: where the data comes from (recorded; set by the command, not by a flag here).

Kept free of torch, so that ``meshchop --help`` and the widgets read it cheaply.
"""

from __future__ import annotations

import json
import os
import typing
from dataclasses import MISSING, Field, asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from napari_meshchop.errors import InputError, MeshchopError
from napari_meshchop.imaging.spec import KNOWN as PREPROCESSINGS
from napari_meshchop.imaging.spec import PreprocessSpec
from napari_meshchop.network.architecture import PAPER_DILATIONS, Architecture
from napari_meshchop.network.devices import DEVICES

ROLES = ("recipe", "machine", "data")
SWITCH = ("auto", "on", "off")


@dataclass(frozen=True)
class Search:
    """How the hyperparameter search samples a setting: ``int`` or ``log`` or ``uniform``
    over ``[low, high]``, or one of ``choices``."""

    kind: str
    low: float = 0.0
    high: float = 0.0
    choices: tuple = ()
    param: str = ""  # the study's name for it (default: the setting's)
    index: int | None = None  # of a tuple-valued setting: the element sampled

    def flag(self) -> str:
        """The search's command-line flag (``--lr-range``, ``--pct-start-choices``)."""
        return f"--{self.param.replace('_', '-')}-{'choices' if self.choices else 'range'}"


@dataclass(frozen=True)
class Setting:
    help: str
    role: str = "recipe"
    label: str = ""  # the Train widget's label; empty: not in the widget
    low: float | None = None  # bounds a value must lie in (inclusive)
    high: float | None = None
    choices: tuple = ()
    flag: bool = True  # a command-line flag of the same name
    metavar: tuple | str | None = None
    search: Search | None = None


def setting(default: Any = MISSING, *, factory: Any = MISSING, **meta) -> Field:
    return field(default=default, default_factory=factory, metadata={"setting": Setting(**meta)})


@dataclass
class TrainConfig:
    """Everything a training run needs; what ``config.json`` and checkpoints record."""

    channels: int = setting(26, help="MeshNet width (5, 16, 26 or any)", label="Model width",
                            low=1, high=512, search=Search("int", 5, 21))
    dilations: tuple[int, ...] = setting(PAPER_DILATIONS, flag=False,
                                         help="dilation of each block's convolution")
    epochs: int = setting(50, help="passes over the training set", label="Epochs", low=1,
                          high=100_000)
    lr: float = setting(1e-3, help="AdamW and OneCycle maximum learning rate",
                        label="Learning rate", low=1e-8, high=10.0,
                        search=Search("log", 1e-4, 4e-2))
    weight_decay: float = setting(3e-5, help="AdamW weight decay", label="Weight decay",
                                  low=0.0, high=1.0, search=Search("log", 1e-4, 4e-2))
    eps: float = setting(1e-4, help="AdamW epsilon", low=0.0, high=1.0)
    pct_start: float = setting(0.01, help="OneCycle warm-up share of the steps", low=0.0,
                               high=1.0, search=Search("choice", choices=(0.02, 0.1, 0.2)))
    div_factor: float = setting(100.0, help="OneCycle initial lr = lr / div-factor", low=1.0,
                                high=1e6)
    # The search samples the background weight; the lesion's stays 1.
    class_weights: tuple[float, float] = setting(
        (0.5, 1.0), help="cross-entropy weights of background and lesion", low=0.0,
        metavar=("BACKGROUND", "LESION"),
        search=Search("uniform", 0.0, 1.0, param="background_weight", index=0))
    label_smoothing: float = setting(0.01, help="cross-entropy label smoothing",
                                     label="Label smoothing", low=0.0, high=0.5)
    batch_size: int = setting(1, help="volumes per step", low=1, high=64)
    seed: int = setting(42, help="seed of the weights, the data order and the crops",
                        label="Seed", low=0, high=2**31 - 1)
    amp: str = setting("auto", choices=SWITCH,
                       help="fp16 autocast with a gradient scaler (auto: on CUDA only)")
    crop: int | None = setting(None, help="train on random crops of N^3 voxels (none: whole "
                               "volumes)", label="Crop (0: whole)", low=2, high=512)
    lesion_crop_share: float = setting(0.5, help="share of crops centred on a lesion voxel",
                                       low=0.0, high=1.0)
    preprocess: dict = setting(factory=lambda: PreprocessSpec().to_dict(), flag=False,
                               choices=PREPROCESSINGS, label="Preprocessing",
                               help="the preprocessing spec (--preprocess NAME, --shape N)")
    batch_norm: str = setting(
        "batch", choices=("batch", "frozen"),
        help="BatchNorm while training: batch statistics (updating the running ones), or "
        "frozen: the starting checkpoint's running statistics, as at inference (for "
        "fine-tuning on crops, whose statistics are not the whole volume's)")
    init: str = setting("", flag=False, help="start from this checkpoint's weights (a file "
                        "or a pretrained name): fine-tuning; its architecture and "
                        "preprocessing must be the run's")
    device: str = setting("auto", role="machine", choices=DEVICES, label="Device",
                          help="where to train (auto: CUDA, else MPS, else the CPU)")
    activation_checkpointing: str = setting(
        "auto", role="machine", choices=SWITCH, label="Act. checkpointing",
        help="keep one activation per block to save memory (auto: when the step would not "
        "fit)")
    memory_gb: float | None = setting(None, role="machine", low=0.1,
                                      help="memory to plan for (default: what the device "
                                      "has free)")
    workers: int = setting(0, role="machine", low=0, high=64, help="data loader workers")
    # Where the data came from: set by the command (data folder and fold), recorded.
    data_dir: str = setting("", role="data", flag=False, help="the cohort's folder")
    outer_fold: int | None = setting(None, role="data", flag=False, help="outer fold K")
    inner_fold: int | None = setting(None, role="data", flag=False, help="inner fold J")
    full_outer: bool = setting(False, role="data", flag=False,
                               help="the whole outer training set, without validation")

    def __post_init__(self):
        self.dilations = tuple(int(d) for d in self.dilations)
        self.class_weights = tuple(float(w) for w in self.class_weights)
        if self.crop == 0:  # the widget's "whole volume"
            self.crop = None
        for f in fields(self):
            problem = check(f.name, getattr(self, f.name))
            if problem:
                raise MeshchopError(problem)
        PreprocessSpec.from_dict(self.preprocess)

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


# Fine-tuning's defaults where they differ from training's (``meshchop finetune``, the
# Fine-tune section): a rate ten times lower, 128^3 crops mostly centred on a lesion,
# BatchNorm frozen (with a crop's own statistics the pretrained MeshNet-26 finds a quarter
# of the lesion it finds with its running ones), and the lean step (under 4 GB on a CPU).
FINETUNE = {"lr": 1e-4, "epochs": 5, "crop": 128, "lesion_crop_share": 0.75,
            "batch_norm": "frozen", "activation_checkpointing": "on"}


def settings() -> dict[str, tuple[Field, Setting]]:
    """Every setting by name, in the order of the fields."""
    return {f.name: (f, _with_param(f.name, f.metadata["setting"])) for f in fields(TrainConfig)}


def _with_param(name: str, s: Setting) -> Setting:
    if s.search is None or s.search.param:
        return s
    return replace(s, search=replace(s.search, param=name))


def value_type(name: str) -> type:
    """The type of a setting's value, or of its elements when it is a tuple."""
    hint = typing.get_type_hints(TrainConfig)[name]
    args = [a for a in typing.get_args(hint) if a is not type(None) and a is not Ellipsis]
    return args[0] if args else hint


def names(*roles: str) -> tuple[str, ...]:
    """The settings of these roles, in field order."""
    unknown = set(roles) - set(ROLES)
    if unknown:
        raise ValueError(f"unknown roles {unknown}")
    return tuple(name for name, (_, s) in settings().items() if s.role in roles)


def searched() -> tuple[str, ...]:
    """The settings the hyperparameter search samples (epochs is its fidelity)."""
    return tuple(name for name, (_, s) in settings().items() if s.search) + ("epochs",)


def default(name: str) -> Any:
    f, _ = settings()[name]
    return f.default_factory() if f.default is MISSING else f.default


def check(name: str, value: Any) -> str | None:
    """Why ``value`` cannot be setting ``name`` (None when it can)."""
    _, s = settings()[name]
    if value is None:
        return None
    if s.choices and name != "preprocess" and value not in s.choices:
        return f"{name} must be one of {', '.join(map(str, s.choices))}, not {value!r}"
    values = value if isinstance(value, tuple) else (value,)
    for v in values:
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            if (s.low is not None and v < s.low) or (s.high is not None and v > s.high):
                bounds = f"[{s.low}, {s.high}]" if s.high is not None else f">= {s.low}"
                return f"{name} must lie in {bounds}, not {v}"
    return None


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
    known = settings()
    unknown = sorted(set(params) - set(known))
    if unknown:
        raise InputError(path, f"unknown parameters {', '.join(unknown)} "
                         f"(known: {', '.join(sorted(known))})")
    try:
        TrainConfig(**params)
    except (TypeError, ValueError, MeshchopError) as exc:
        raise InputError(path, f"invalid parameters: {exc}") from None
    return params
