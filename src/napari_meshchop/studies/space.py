"""The hyperparameter search's space, read from the settings' metadata (``Search``).

Light (no torch, no Optuna at import): the command line builds its ``--*-range`` and
``--*-choices`` flags from :func:`dimensions`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from napari_meshchop.errors import MeshchopError
from napari_meshchop.training import config as _config
from napari_meshchop.training.config import Search, TrainConfig

STUDY = "meshchop-hpo"  # the study's default name
TRIALS = 50  # trials in a study, set by its first worker
MIN_EPOCHS, MAX_EPOCHS = 15, 50  # ASHA's first rung and a full trial's epochs
REDUCTION_FACTOR = 3  # ASHA keeps the top 1/N at each rung
# Not searched and not the recipe every trial shares: the machine's settings, where the
# data is, and the seed (each trial's runs use the base seed, so trials differ only by the
# sampled values).
LOCAL = _config.names("machine", "data") + ("seed",)


def dimensions() -> dict[str, tuple[str, Search]]:
    """The searched settings by the study's parameter name: (setting, how it is sampled)."""
    return {s.search.param: (name, s.search)
            for name, (_, s) in _config.settings().items() if s.search}


def _defaults() -> dict:
    return {param: (search.choices if search.choices else (search.low, search.high))
            for param, (_, search) in dimensions().items()}


@dataclass
class Space:
    """Where each searched parameter is sampled (``(low, high)`` or choices); epochs is the
    fidelity, from ``min_epochs`` to ``max_epochs``."""

    bounds: dict = field(default_factory=_defaults)
    min_epochs: int = MIN_EPOCHS
    max_epochs: int = MAX_EPOCHS

    def __post_init__(self):
        known = dimensions()
        unknown = set(self.bounds) - set(known)
        if unknown:
            raise MeshchopError(f"not searched: {', '.join(sorted(unknown))}")
        self.bounds = {**_defaults(), **self.bounds}
        for param, (_, search) in known.items():
            value = tuple(self.bounds[param])
            if search.choices:
                if not value or not all(0 < float(v) < 1 for v in value) \
                        and param == "pct_start":
                    raise MeshchopError("warm-up shares must lie between 0 and 1")
                value = tuple(type(search.choices[0])(v) for v in value)
            else:
                cast = int if search.kind == "int" else float
                low, high = (cast(v) for v in value)
                if not low <= high or (search.kind in ("log", "int") and low <= 0):
                    raise MeshchopError(f"the {param} range must be low <= high"
                                        + (", above 0" if search.kind != "uniform" else ""))
                value = (low, high)
            self.bounds[param] = value
        if not 1 <= self.min_epochs <= self.max_epochs:
            raise MeshchopError("epochs must satisfy 1 <= min epochs <= max epochs")

    def suggest(self, trial) -> dict:
        """Sample a trial's TrainConfig fields."""
        params = {}
        for param, (_, search) in dimensions().items():
            bounds = self.bounds[param]
            if search.choices:
                params[param] = trial.suggest_categorical(param, list(bounds))
            elif search.kind == "int":
                params[param] = trial.suggest_int(param, *bounds)
            else:
                params[param] = trial.suggest_float(param, *bounds, log=search.kind == "log")
        return self.config_fields(params)

    def config_fields(self, params: dict) -> dict:
        """A trial's parameters (the study's names) as TrainConfig fields."""
        fields = {"epochs": self.max_epochs}
        for param, (name, search) in dimensions().items():
            value = params[param]
            if search.index is not None:  # one element of a tuple-valued setting
                whole = list(_config.default(name))
                whole[search.index] = float(value)
                value = whole
            elif search.kind == "int":
                value = int(value)
            else:
                value = float(value)
            fields[name] = value
        return fields

    def to_dict(self) -> dict:
        return json.loads(json.dumps({**self.bounds, "min_epochs": self.min_epochs,
                                      "max_epochs": self.max_epochs}))


def recipe(config: TrainConfig) -> dict:
    """The fixed part of the recipe: what every trial shares, the searched and the
    machine's fields left out."""
    skip = set(_config.searched()) | set(LOCAL)
    return {k: v for k, v in config.to_dict().items() if k not in skip}
