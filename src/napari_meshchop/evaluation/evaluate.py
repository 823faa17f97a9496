"""The one evaluation core: subject by subject, never more than one in memory.

:func:`evaluate_dataset` predicts each subject of a dataset, counts TP, FP, FN and TN on
the network grid (conformed space), yields a :class:`SubjectResult` and lets the volumes
go before it reads the next subject. Validation during training, ``meshchop evaluate``,
the experiment runner and the Evaluate widget all call it. A subject that fails (a damaged
file, say) gets its error in its record and the others go on; Stop raises
:class:`~napari_meshchop.errors.Cancelled` between (and within) subjects.
"""

from __future__ import annotations

import csv
import io
import math
import os
import time
from collections.abc import Generator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from napari_meshchop import files
from napari_meshchop.data.cache import ArcDataset
from napari_meshchop.errors import Cancelled
from napari_meshchop.evaluation.metrics import METRICS, confusion, scores, summarize
from napari_meshchop.events import Progress, StopFlag, check_stop, run
from napari_meshchop.imaging.geometry import voxel_volume_ml
from napari_meshchop.imaging.nifti import save_mask
from napari_meshchop.network.inference import (
    load_predictor,
    resolve_device,
)

THRESHOLD = 0.5
COUNTS = ("tp", "fp", "fn", "tn", "voxel_ml")  # SubjectResult.counts, in its rows


@dataclass(frozen=True)
class SubjectResult:
    """One subject's evaluation: its scores (:mod:`metrics`), or the error that stopped it."""

    subject: str  # the pair id, e.g. sub-M2001_ses-1253
    acquisition: str
    index: int  # 0-based position in this evaluation
    total: int
    scores: dict[str, float] = field(default_factory=dict)
    counts: dict[str, float] = field(default_factory=dict)
    error: str | None = None
    prediction: Path | None = None  # the predicted mask (network grid), when saved
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_row(self) -> dict:
        """A flat record for CSV and JSON."""
        row = {"subject": self.subject, "acquisition": self.acquisition}
        row.update({m: self.scores.get(m, float("nan")) for m in METRICS})
        row.update({k: self.counts.get(k) for k in COUNTS})
        row.update({"error": self.error or "", "seconds": round(self.seconds, 3),
                    "prediction": os.fspath(self.prediction) if self.prediction else ""})
        return row


@dataclass(frozen=True)
class Subject:
    """What the core needs of a subject: its network-grid image and truth."""

    id: str
    acquisition: str
    image: np.ndarray  # float32 in [0, 1] on the network grid
    truth: np.ndarray  # {0, 1} on the same grid
    affine: np.ndarray | None = None  # the grid's affine (for volumes and saved masks)


def predict_mask(predictor, image: np.ndarray, stop: StopFlag = None
                 ) -> Generator[Progress, None, np.ndarray]:
    """The predictor's mask (P(lesion) > 0.5) on the network grid, as bool."""
    prob = yield from predictor.lesion_probability(image, stop)
    return prob > THRESHOLD


def voxel_ml(affine: np.ndarray | None) -> float:
    """The volume of a voxel of the grid in mL; 1 mm^3 when the grid is unknown."""
    return 0.001 if affine is None else voxel_volume_ml(affine)


def evaluate_subjects(predictor, subjects, total: int, predictions_dir=None,
                      stop: StopFlag = None
                      ) -> Generator[Progress | SubjectResult, None, list[SubjectResult]]:
    """Evaluate an iterable of :class:`Subject` (or callables that load one, so that a
    failing load becomes that subject's error); yield each record as it is done."""
    results = []
    out = Path(predictions_dir) if predictions_dir is not None else None
    for index, item in enumerate(subjects):
        check_stop(stop)
        started = time.perf_counter()
        name = getattr(item, "id", f"subject {index + 1}")
        acquisition = getattr(item, "acquisition", "")
        yield Progress("evaluate", index, total, name)
        try:
            subject = item() if callable(item) else item
            name, acquisition = subject.id, subject.acquisition
            # Run the prediction without its per-layer progress, which would drown the
            # per-subject progress; its stop checks still raise Cancelled.
            mask = run(predict_mask(predictor, subject.image, stop))
            counts = confusion(mask, subject.truth, voxel_ml(subject.affine))
            saved = None
            if out is not None and subject.affine is not None:
                saved = save_prediction(out / f"{name}.nii.gz", mask, subject.affine)
            record = SubjectResult(name, acquisition, index, total, scores(counts),
                                   counts.to_dict(), prediction=saved,
                                   seconds=time.perf_counter() - started)
        except Cancelled:
            raise
        except Exception as exc:  # noqa: BLE001 - one bad subject must not end the others
            record = SubjectResult(name, acquisition, index, total,
                                   error=f"{type(exc).__name__}: {exc}",
                                   seconds=time.perf_counter() - started)
        subject = mask = None  # noqa: F841 - one subject in memory at a time
        results.append(record)
        yield record
        yield Progress("evaluate", index + 1, total, name)
    return results


def save_prediction(path: Path, mask: np.ndarray, affine: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return Path(save_mask(mask.astype(np.uint8), affine, path))


def dataset_subjects(dataset) -> list:
    """Subjects of an :class:`~napari_meshchop.data.cache.ArcDataset` (ids, acquisitions and
    grid affines known) or of any dataset of ``(image, mask)`` tensor pairs, loaded lazily."""
    pairs = getattr(dataset, "pairs", None)
    cache = getattr(dataset, "cache", None)

    def loader(i):
        if pairs is not None and cache is not None:
            pair = pairs[i]

            def load():
                c = cache.get(pair)
                return Subject(pair.id, pair.acquisition, c.image_float(), c.mask, c.affine)
            load.id, load.acquisition = pair.id, pair.acquisition
            return load

        def load():
            image, mask = dataset[i]
            return Subject(f"item {i}", "", np.asarray(image)[0], np.asarray(mask))
        load.id, load.acquisition = f"item {i}", ""
        return load

    return [loader(i) for i in range(len(dataset))]


def evaluate_dataset(predictor, dataset, predictions_dir=None, stop: StopFlag = None
                     ) -> Generator[Progress | SubjectResult, None, list[SubjectResult]]:
    """Evaluate every item of ``dataset`` with ``predictor`` (a FusedMeshNet or Ensemble)."""
    subjects = dataset_subjects(dataset)
    return (yield from evaluate_subjects(predictor, subjects, len(subjects), predictions_dir,
                                         stop))


def evaluate(models, data_dir: str | os.PathLike, ids: Sequence[str], device: str = "auto",
             predictions_dir=None, stop: StopFlag = None
             ) -> Generator[Progress | SubjectResult, None, list[SubjectResult]]:
    """Evaluate a model (or an ensemble: a list of models) on pairs of a data folder."""
    yield Progress("model", 0, max(len(ids), 1), "loading model")
    predictor, checkpoint, _ = load_predictor(models, resolve_device(device))
    dataset = ArcDataset(data_dir, list(ids), checkpoint.preprocess)
    return (yield from evaluate_dataset(predictor, dataset, predictions_dir, stop))


def summary(results: Sequence[SubjectResult]) -> dict[str, dict[str, float]]:
    """Per metric: mean +/- SD, median and quartiles over the subjects that succeeded."""
    done = [r for r in results if r.ok]
    return {m: summarize([r.scores[m] for r in done]) for m in METRICS}


RESULTS_JSON, RESULTS_CSV, FORMAT = "results.json", "results.csv", "napari-meshchop-evaluation"


def _plain(value):
    """NaN as None: ``null`` in JSON (which has no NaN), an empty cell in CSV."""
    return None if isinstance(value, float) and math.isnan(value) else value


def write_results(out_dir: str | os.PathLike, results: Sequence[SubjectResult], config: dict,
                  complete: bool = True) -> tuple[Path, Path]:
    """Write ``results.json`` (config, one record per subject, summary) and ``results.csv``
    (the same records, one row per subject), each atomically; return their paths."""
    rows = [{k: _plain(v) for k, v in r.to_row().items()} for r in results]
    doc = {"format": FORMAT, "version": 1, "complete": complete, "config": config,
           "subjects": len(results), "failed": sum(not r.ok for r in results),
           "records": rows,
           "summary": {m: {k: _plain(v) for k, v in stats.items()}
                       for m, stats in summary(results).items()}}
    out = Path(out_dir)
    json_path = files.write_json(out / RESULTS_JSON, doc)
    return json_path, write_csv(out / RESULTS_CSV, results)


def write_csv(path: str | os.PathLike, results: Sequence[SubjectResult]) -> Path:
    """One row per subject (:meth:`SubjectResult.to_row`), atomically; an undefined score
    (NaN) or a failed subject's scores are empty cells."""
    text = io.StringIO()
    fields = list(SubjectResult("", "", 0, 0).to_row())
    writer = csv.DictWriter(text, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    for r in results:
        row = {k: _plain(v) for k, v in r.to_row().items()}
        writer.writerow({k: "" if v is None else v for k, v in row.items()})
    return files.write_bytes(path, text.getvalue().encode())
