"""Before and after: two models scored on the same subjects by the one evaluation core, and
the change per subject (what fine-tuning did to held-out corrected pairs)."""

from __future__ import annotations

import csv
import io
import math
import os
from collections.abc import Generator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from napari_meshchop import files
from napari_meshchop.evaluation.evaluate import SubjectResult, evaluate
from napari_meshchop.events import Progress, StopFlag, relay

FORMAT = "napari-meshchop/before-after"
JSON, CSV = "before_after.json", "before_after.csv"
COLUMNS = ("subject", "true_ml", "pred_ml_before", "pred_ml_after", "dice_before",
           "dice_after", "dice_change")


@dataclass(frozen=True)
class Change:
    """One subject, scored with both models (or the error of either)."""

    subject: str
    before: dict[str, float]
    after: dict[str, float]
    error: str | None = None

    def score(self, which: str, metric: str = "dice") -> float:
        return getattr(self, which).get(metric, float("nan"))

    @property
    def dice_change(self) -> float:
        return self.score("after") - self.score("before")

    def row(self) -> dict:
        return {"subject": self.subject, "true_ml": self.score("before", "true_ml"),
                "pred_ml_before": self.score("before", "pred_ml"),
                "pred_ml_after": self.score("after", "pred_ml"),
                "dice_before": self.score("before"), "dice_after": self.score("after"),
                "dice_change": self.dice_change}


@dataclass
class Comparison:
    before: str  # the models, as given
    after: str
    changes: list[Change]

    def mean(self, which: str, metric: str = "dice") -> float:
        values = [c.score(which, metric) for c in self.changes if c.error is None]
        values = [v for v in values if not math.isnan(v)]
        return float(np.mean(values)) if values else float("nan")

    @property
    def mean_change(self) -> float:
        return self.mean("after") - self.mean("before")

    def lines(self) -> list[str]:
        """The table the CLI prints: a row per subject, then the means."""
        out = [f"{'subject':<24} {'true mL':>8} {'Dice before':>11} {'Dice after':>10} "
               f"{'change':>7}"]
        for c in self.changes:
            if c.error:
                out.append(f"{c.subject:<24} error: {c.error}")
                continue
            out.append(f"{c.subject:<24} {c.score('before', 'true_ml'):8.2f} "
                       f"{c.score('before'):11.3f} {c.score('after'):10.3f} "
                       f"{c.dice_change:+7.3f}")
        out.append(f"{'mean':<24} {'':>8} {self.mean('before'):11.3f} "
                   f"{self.mean('after'):10.3f} {self.mean_change:+7.3f}")
        return out

    def to_dict(self) -> dict:
        return {"format": FORMAT, "version": 1, "before": self.before, "after": self.after,
                "subjects": [{**_plain(c.row()), "error": c.error} for c in self.changes],
                "mean_dice_before": _nan_none(self.mean("before")),
                "mean_dice_after": _nan_none(self.mean("after")),
                "mean_dice_change": _nan_none(self.mean_change)}

    def write(self, out_dir: str | os.PathLike) -> tuple[Path, Path]:
        """``before_after.json`` and ``before_after.csv`` in ``out_dir``, atomically."""
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=COLUMNS, lineterminator="\n")
        writer.writeheader()
        for c in self.changes:
            writer.writerow({k: "" if v is None else v for k, v in _plain(c.row()).items()})
        out = Path(out_dir)
        return (files.write_json(out / JSON, self.to_dict()),
                files.write_bytes(out / CSV, text.getvalue().encode()))


def compare(before, after, data_dir: str | os.PathLike, ids: Sequence[str],
            device: str = "auto", stop: StopFlag = None
            ) -> Generator[Progress, None, Comparison]:
    """Score ``before`` and then ``after`` (each a model or a list of them: an ensemble) on
    the pairs ``ids`` of ``data_dir``, one subject in memory at a time."""
    scored = {}
    for which, models in (("before", before), ("after", after)):
        results = yield from relay(evaluate(models, data_dir, ids, device, stop=stop),
                                   _as_stage(f"score {which}"))
        scored[which] = {r.subject: r for r in results}
    changes = []
    for subject in ids:
        old, new = scored["before"].get(subject), scored["after"].get(subject)
        error = next((r.error for r in (old, new) if r is not None and r.error), None)
        changes.append(Change(subject, dict(old.scores) if old else {},
                              dict(new.scores) if new else {}, error))
    return Comparison(_label(before), _label(after), changes)


def _as_stage(stage: str):
    def translate(event):
        if isinstance(event, SubjectResult):
            return None
        return replace(event, stage=stage) if isinstance(event, Progress) else event
    return translate


def _label(models) -> str:
    if isinstance(models, (list, tuple)):
        return " + ".join(os.fspath(m) for m in models)
    return os.fspath(models)


def _nan_none(value: float) -> float | None:
    return None if isinstance(value, float) and math.isnan(value) else value


def _plain(row: dict) -> dict:
    return {k: _nan_none(v) if isinstance(v, float) else v for k, v in row.items()}
