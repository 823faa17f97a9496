"""What an experiment is: the recipe, the outer folds and the restarts, and its plan.json.

Light (no torch): the command line reads it to build and check plans.

* :func:`plan` (pure) lists the runs (``fold0-restart3``; restart R has seed ``seed + R``);
* :func:`settle` writes ``plan.json`` or checks that the folder holds this very plan, and
  returns the plan to run.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path

from napari_meshchop import files
from napari_meshchop.data import folds as _folds
from napari_meshchop.errors import InputError, MeshchopError
from napari_meshchop.training import config as _config
from napari_meshchop.training.config import TrainConfig

PLAN = "plan.json"
FORMAT = "napari-meshchop/experiment"
RESTARTS = 10  # runs per fold, as in the paper
# How a run is computed, not what: a later session (or another machine) may change these
# without changing the experiment.
HOW = _config.names("machine")


@dataclass(frozen=True)
class Run:
    """One training run: outer fold ``fold``, restart ``restart`` (seed ``seed``)."""

    fold: int
    restart: int
    seed: int

    @property
    def key(self) -> str:
        return f"fold{self.fold}-restart{self.restart}"

    def folder(self, out: str | os.PathLike) -> Path:
        return Path(out) / f"fold{self.fold}" / f"restart{self.restart}"

    def identity(self) -> dict:
        """What its results.json records as its ``experiment`` entry."""
        return {"run": self.key, "fold": self.fold, "restart": self.restart, "seed": self.seed}


@dataclass(frozen=True)
class Plan:
    """The experiment: a recipe (``config.seed`` is restart 0's seed), folds, restarts."""

    config: TrainConfig
    folds: tuple[int, ...] = (0, 1, 2)
    restarts: int = RESTARTS
    folds_sha256: str = ""  # of the folds' train and test ids; set by settle()

    @property
    def runs(self) -> list[Run]:
        return [Run(k, r, self.config.seed + r) for k in self.folds for r in range(self.restarts)]

    def run(self, key: str) -> Run:
        for run in self.runs:
            if run.key == key:
                return run
        raise MeshchopError(f"no run {key!r} in this experiment")

    def run_config(self, run: Run) -> TrainConfig:
        d = self.config.to_dict()
        d.update(seed=run.seed, outer_fold=run.fold, inner_fold=None, full_outer=True)
        return TrainConfig.from_dict(d)

    @property
    def data_dir(self) -> str:
        return self.config.data_dir

    def to_dict(self) -> dict:
        return {"format": FORMAT, "version": 1, "folds": list(self.folds),
                "restarts": self.restarts, "seeds": [r.seed for r in self.runs[:self.restarts]],
                "folds_sha256": self.folds_sha256, "config": self.config.to_dict(),
                "runs": [r.key for r in self.runs]}

    @classmethod
    def from_dict(cls, d: dict) -> Plan:
        return cls(TrainConfig.from_dict(d["config"]), tuple(d["folds"]), int(d["restarts"]),
                   d.get("folds_sha256", ""))

    def identity(self) -> dict:
        """What makes two plans the same experiment."""
        config = {k: v for k, v in self.config.to_dict().items() if k not in HOW}
        return {"folds": list(self.folds), "restarts": self.restarts,
                "folds_sha256": self.folds_sha256, **config}


def plan(config: TrainConfig, folds: Iterable[int] = (0, 1, 2), restarts: int = RESTARTS
         ) -> Plan:
    """The runs of an experiment with ``config``'s recipe: every fold x ``restarts``."""
    folds = tuple(int(k) for k in folds)
    if restarts < 1:
        raise MeshchopError("restarts must be at least 1")
    if not folds or len(set(folds)) != len(folds) or min(folds) < 0:
        raise MeshchopError(f"folds must be distinct outer fold numbers, not {list(folds)}")
    d = config.to_dict()
    d.update(outer_fold=None, inner_fold=None, full_outer=True,
             data_dir=os.path.abspath(config.data_dir) if config.data_dir else "")
    return Plan(TrainConfig.from_dict(d), folds, int(restarts))


def load_plan(out: str | os.PathLike) -> Plan:
    _, raw = files.read_json(out, PLAN, FORMAT, "experiment plan",
                             "no experiment here (no plan.json); run `meshchop experiment` first")
    try:
        return Plan.from_dict(raw)
    except (KeyError, TypeError, ValueError, MeshchopError) as exc:
        raise InputError(Path(out) / PLAN, f"not a valid experiment plan ({exc})") from None


def settle(out: str | os.PathLike, plan_: Plan) -> Plan:
    """Write ``OUT/plan.json``, or check that OUT holds this very experiment.

    Returns the plan to run: the saved one (with this session's device and other ``HOW``
    fields) when OUT already has one.
    """
    if not plan_.data_dir:
        raise MeshchopError("the experiment needs a data folder (--data-dir)")
    made = _folds.load(plan_.data_dir)
    for k in plan_.folds:
        made.outer_fold(k)
    ids = [[made.outer[k].train, made.outer[k].test] for k in plan_.folds]
    plan_ = replace(plan_, folds_sha256=hashlib.sha256(json.dumps(ids).encode()).hexdigest())
    path = Path(out) / PLAN
    if not path.exists():
        files.write_json(path, plan_.to_dict())
        return plan_
    saved = load_plan(out)
    mine, theirs = plan_.identity(), saved.identity()
    differ = [f"{k}: {theirs.get(k)!r} there, {mine.get(k)!r} now"
              if k != "folds_sha256" else "the data folder's folds are not those it started with"
              for k in sorted(set(mine) | set(theirs)) if mine.get(k) != theirs.get(k)]
    if differ:
        raise InputError(path, "this folder holds another experiment ("
                         + "; ".join(differ) + "); use another --out, or give no recipe "
                         "flags to continue the one there")
    how = {k: getattr(plan_.config, k) for k in HOW}
    return replace(saved, config=replace(saved.config, **how))
