"""Segmenting a cohort: the participant level, the group level, and the same for plain files.

:func:`participant` segments every image of a :class:`~napari_meshchop.cohort.find.Cohort`
into BIDS derivatives (see :mod:`derivatives`). It is a generator of events
(:class:`ImageDone` per image, :class:`~napari_meshchop.events.Progress` of the network, a
``Notice`` now and then) that checks a stop flag between network layers, and it is
resumable: an image whose sidecar says it was made with the same models, preprocessing and
threshold is reused, in the time it takes to read the sidecar; any other is done again.

Speed: the models are loaded and fused once per run. While the network runs on image *i*,
one thread reads and preprocesses image *i + 1* and another maps image *i - 1* back to its
grid and writes its files, so the network is rarely idle.

Robustness: an image that cannot be read or used (truncated, 4D, not NIfTI, blank) becomes
a failed record with its error, in ``logs/`` and in the group's table, and the others go
on. Each file is written atomically and the sidecar last, so a killed run leaves no image
that looks finished and is not.

Sharing: with ``storage`` (a database URL or a journal file), each image is a unit of a
study of the work engine (:mod:`napari_meshchop.studies.engine`): claimed by one worker,
and retried by another when its worker's heartbeat stops.

:func:`group` writes ``lesions.tsv``, its data dictionary, a plot of the volumes and the
HTML report from what the output folder holds.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Generator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from scipy import ndimage

from napari_meshchop import files
from napari_meshchop.cohort import derivatives, find, qc
from napari_meshchop.cohort.derivatives import Measures, ModelRef, Record, Settings
from napari_meshchop.cohort.find import Cohort, Image
from napari_meshchop.errors import Cancelled, InputError, MeshchopError
from napari_meshchop.events import (
    Claimed,
    Finished,
    Notice,
    Progress,
    StopFlag,
    Waiting,
    check_stop,
    relay,
)
from napari_meshchop.imaging.geometry import voxel_volume_ml
from napari_meshchop.imaging.nifti import load_volume, save_mask, save_probability
from napari_meshchop.imaging.preprocess import Prepared, prepare, to_source
from napari_meshchop.network import checkpoint, registry
from napari_meshchop.network.inference import (
    Ensemble,
    EnsembleOutput,
    load_predictor,
    resolve_device,
)
from napari_meshchop.studies import engine

STUDY_KIND = "napari-meshchop/cohort"
# A .part file this old is a dead writer's: writers of the same folder (other array jobs,
# other workers) finish a file in seconds.
STALE_PART_SECONDS = 3600


@dataclass(frozen=True)
class Options:
    """How to segment: the same for every image of a run."""

    models: tuple[str, ...] = (registry.DEFAULT_MODEL,)  # several: an ensemble
    device: str = "auto"
    threshold: float = 0.5
    probability: bool = False  # also write P(lesion) (and an ensemble's SD) as probseg


@dataclass(frozen=True)
class ImageDone(Progress):
    """An image finished (done now, reused, or failed): ``done`` of ``total`` images."""

    record: Record | None = None


@dataclass
class CohortResult:
    out_dir: Path
    records: list[Record] = field(default_factory=list)

    @property
    def failed(self) -> list[Record]:
        return [r for r in self.records if r.status == "failed"]


@dataclass
class GroupResult:
    out_dir: Path
    records: list[Record]
    table: Path
    report: Path

    def count(self, status: str) -> int:
        return sum(r.status == status for r in self.records)


# ---- the models ------------------------------------------------------------------------------

def model_file(model: str | os.PathLike) -> tuple[Path, ModelRef]:
    """A registry name or a checkpoint file: its path and its name and sha256."""
    text = os.fspath(model)
    entry = registry.REGISTRY.get(text)
    if entry is not None and entry.kind == "model":
        return registry.fetch(text), ModelRef(text, entry.sha256)
    path = Path(text).expanduser()
    if path.is_file():
        return path, ModelRef(path.name, files.sha256_file(path))
    raise MeshchopError(f"{text}: neither a checkpoint file nor a known model "
                        f"(known: {', '.join(registry.names('model'))})")


class Segmenter:
    """The run's models: read once; fused onto the device when the first image needs them
    (a rerun with nothing to do never builds them)."""

    def __init__(self, options: Options):
        if not options.models:
            raise MeshchopError("no model given")
        if not 0 < options.threshold < 1:
            raise MeshchopError(f"threshold {options.threshold} is not between 0 and 1")
        refs, self.checkpoints = [], []
        for model in options.models:
            path, ref = model_file(model)
            ckpt = checkpoint.load(path)
            if self.checkpoints and ckpt.preprocess != self.checkpoints[0].preprocess:
                raise MeshchopError(f"{ref.name}: its preprocessing ({ckpt.preprocess.name}, "
                                    f"{ckpt.preprocess.shape}) differs from {refs[0].name}'s; "
                                    "an ensemble needs one network grid")
            refs.append(ref)
            self.checkpoints.append(ckpt)
        self.spec = self.checkpoints[0].preprocess
        self.settings = Settings(tuple(refs), self.spec.to_dict(), float(options.threshold),
                                 bool(options.probability))
        self.device = resolve_device(options.device)
        self._predictor = None

    def predict(self, volume: np.ndarray, stop: StopFlag = None
                ) -> Generator[Any, None, EnsembleOutput]:
        """P(lesion) on the network grid; an ensemble's spread too."""
        if self._predictor is None:
            self._predictor, _, _ = load_predictor(self.checkpoints, self.device)
        try:
            return (yield from self._pass(volume, stop))
        except (NotImplementedError, RuntimeError) as exc:
            if self.device.type != "mps":
                raise
            # Some 3D operations are missing or broken on Apple's MPS: the CPU from now on.
            yield Notice(f"MPS failed ({exc}); using the CPU")
            self.device = torch.device("cpu")
            self._predictor, _, _ = load_predictor(self.checkpoints, self.device)
            return (yield from self._pass(volume, stop))

    def _pass(self, volume, stop):
        if isinstance(self._predictor, Ensemble):
            return (yield from self._predictor.lesion_statistics(
                volume, self.settings.threshold, stop))
        return EnsembleOutput((yield from self._predictor.lesion_probability(volume, stop)))


# ---- one image --------------------------------------------------------------------------------

@dataclass
class Loaded:
    """An image read and on the network grid (the reader thread's work)."""

    image: Image
    img: nib.Nifti1Image
    prepared: Prepared
    seconds: float  # this image's own work so far (reading, preprocessing, the network)


def load(image: Image, segmenter: Segmenter) -> Loaded:
    started = time.perf_counter()
    img = load_volume(image.path)
    try:
        prepared = prepare(img, segmenter.spec)
    except MeshchopError:
        raise
    except Exception as exc:  # noqa: BLE001 - an odd header (a singular affine, say)
        raise InputError(image.path, f"cannot be preprocessed ({type(exc).__name__}: "
                         f"{exc})") from None
    return Loaded(image, img, prepared, time.perf_counter() - started)


def measure(mask: np.ndarray, affine: np.ndarray, disagree: np.ndarray | None = None
            ) -> Measures:
    voxels = int(np.count_nonzero(mask))
    _, components = ndimage.label(mask, structure=np.ones((3, 3, 3), dtype=bool))
    unit = voxel_volume_ml(affine)
    return Measures(voxels * unit, voxels, int(components),
                    None if disagree is None else int(np.count_nonzero(disagree)) * unit)


def write(loaded: Loaded, output: EnsembleOutput, out_dir: Path, settings: Settings,
          device: str) -> Record:
    """Map the network's output back to the image's grid and write its files, the
    sidecar last (the writer thread's work)."""
    started = time.perf_counter()
    image, prepared, affine = loaded.image, loaded.prepared, loaded.img.affine
    where = derivatives.outputs(image, out_dir)
    prob = to_source(output.mean, prepared)
    mask = (prob > settings.threshold).astype(np.uint8)
    disagree = None
    if output.disagree is not None:
        disagree = to_source(output.disagree.astype(np.float32), prepared) > 0.5
    measures = measure(mask, affine, disagree)
    # The sidecar says "done": take it away before any file changes, put it back last.
    where.sidecar.unlink(missing_ok=True)
    written = [save_mask(mask, affine, where.mask)]
    if settings.probability:
        what = ("P(lesion): the mean of the models' softmax outputs" if output.sd is not None
                else "P(lesion): the model's softmax output")
        maps = [(where.probseg, prob, what)]
        if output.sd is not None:
            maps.append((where.disagreement, to_source(output.sd, prepared),
                         "Disagreement: the standard deviation of the models' P(lesion)"))
        for path, values, what in maps:
            written.append(save_probability(values, affine, path))
            written.append(files.write_json(derivatives.sidecar_of(path),
                                            derivatives.probseg_sidecar(image, settings, what)))
        del maps
    del prob
    title = (f"{image.key}: {measures.lesion_ml:.2f} mL, {measures.components} "
             f"component{'s' * (measures.components != 1)}")
    written.append(files.write_bytes(where.mosaic, qc.mosaic(
        np.asarray(loaded.img.dataobj), affine, mask, title)))
    for stale in derivatives.stale_files(where, [*written, where.sidecar]):
        stale.unlink(missing_ok=True)
    seconds = loaded.seconds + time.perf_counter() - started
    files.write_json(where.sidecar, derivatives.mask_sidecar(image, settings, measures, device,
                                                             seconds))
    return Record(image, "done", measures, settings.model_label, seconds=seconds, device=device)


def fail(image: Image, out_dir: Path, settings: Settings, exc: BaseException) -> Record:
    """Record why an image could not be segmented; its earlier outputs (other settings) go."""
    message = str(exc) if isinstance(exc, MeshchopError) else f"{image.path}: " \
        f"{type(exc).__name__}: {exc}"
    where = derivatives.outputs(image, out_dir)
    where.sidecar.unlink(missing_ok=True)
    for stale in derivatives.stale_files(where, [where.error]):
        stale.unlink(missing_ok=True)
    files.write_json(where.error, {"Source": image.source, "Status": "failed",
                                   "Error": message, "Model": settings.model_label})
    return Record(image, "failed", model=settings.model_label, error=message)


def _safely_written(loaded, output, out_dir, settings, device) -> Record:
    try:
        return write(loaded, output, out_dir, settings, device)
    except OSError:
        raise  # the output folder's problem (full, read-only), not the image's: stop
    except Exception as exc:  # noqa: BLE001 - this image's problem: record it, go on
        return fail(loaded.image, out_dir, settings, exc)


# ---- many images --------------------------------------------------------------------------------

class _Counter:
    def __init__(self, total: int, done: int = 0):
        self.total, self.done = total, done

    def event(self, record: Record) -> ImageDone:
        self.done += 1
        return ImageDone("images", self.done, self.total, record.image.key, record)


def _triage(images: Sequence[Image], out_dir: Path, segmenter: Segmenter
            ) -> tuple[list[Record], list[Image]]:
    """Records of the images already done with these settings (or whose output names are
    another source's), and the images to segment."""
    settled, todo = [], []
    for image in images:
        doc = derivatives.done_sidecar(image, out_dir, segmenter.settings)
        other = derivatives.made_from_another(image, out_dir) if doc is None else None
        if doc is not None:
            try:
                settled.append(derivatives.record_from_sidecar(image, doc, reused=True))
                continue
            except (KeyError, TypeError, ValueError):
                pass  # a damaged sidecar: do it again
        if other is not None:
            settled.append(Record(image, "failed", model=segmenter.settings.model_label,
                                  error=f"{derivatives.outputs(image, out_dir).sidecar}: "
                                  f"these outputs belong to {other}; write this image's to "
                                  "another output folder"))
            continue
        todo.append(image)
    return settled, todo


def _segment(todo: Sequence[Image], segmenter: Segmenter, out_dir: Path, counter: _Counter,
             stop: StopFlag) -> Generator[Any, None, list[Record]]:
    """The pipeline: read ahead, network here, write behind. Yields the network's progress
    and an :class:`ImageDone` per image; returns the records."""
    records: list[Record] = []
    if not todo:
        return records
    settings = segmenter.settings
    reader = ThreadPoolExecutor(1, thread_name_prefix="meshchop-read")
    writer = ThreadPoolExecutor(1, thread_name_prefix="meshchop-write")
    reading: Future | None = reader.submit(load, todo[0], segmenter)
    writing: Future | None = None

    def finished(future: Future) -> ImageDone:
        record = future.result()
        records.append(record)
        return counter.event(record)

    current = ""

    def named(event):  # the network's steps, and the last image's end as soon as it is
        nonlocal writing
        out = [Progress(event.stage, event.done, event.total, current)
               if type(event) is Progress else event]
        if writing is not None and writing.done():
            out.append(finished(writing))
            writing = None
        return out

    try:
        for i, image in enumerate(todo):
            try:
                loaded = reading.result()
            except Exception as exc:  # noqa: BLE001 - an unusable image: recorded, skipped
                loaded = fail(image, out_dir, settings, exc)
            reading = reader.submit(load, todo[i + 1], segmenter) if i + 1 < len(todo) else None
            if isinstance(loaded, Record):
                records.append(loaded)
                yield counter.event(loaded)
                continue
            check_stop(stop)
            current, started = image.key, time.perf_counter()
            output = yield from relay(segmenter.predict(loaded.prepared.volume, stop), named)
            loaded.seconds += time.perf_counter() - started
            loaded.prepared.volume = None  # the network's copy is no longer needed
            if writing is not None:
                yield finished(writing)
            writing = writer.submit(_safely_written, loaded, output, out_dir, settings,
                                    segmenter.device.type)
        if writing is not None:
            yield finished(writing)
            writing = None
    except Cancelled:
        if writing is not None:  # a whole image: keep it and say so
            yield finished(writing)
            writing = None
        raise
    finally:
        reader.shutdown(wait=True, cancel_futures=True)
        writer.shutdown(wait=True)  # a write in progress completes: its files are whole
    return records


def participant(cohort: Cohort, out_dir: str | os.PathLike, options: Options = Options(),
                storage: str | os.PathLike | None = None, study: str | None = None,
                heartbeat: int = engine.HEARTBEAT, grace: int | None = None,
                stop: StopFlag = None) -> Generator[Any, None, CohortResult]:
    """Segment every image of ``cohort`` into ``out_dir``; see the module's docstring.

    Raises :class:`Cancelled` when stopped (finished images are kept; a rerun resumes).
    """
    out = Path(out_dir).expanduser().resolve()
    yield Progress("models", 0, 1, "reading the models")
    segmenter = Segmenter(options)
    out.mkdir(parents=True, exist_ok=True)
    files.sweep_partials(out, older_than=STALE_PART_SECONDS)
    derivatives.write_description(out, cohort, segmenter.settings)
    result = CohortResult(out)
    if storage:
        result.records = yield from _shared(cohort, out, segmenter, storage, study, heartbeat,
                                            grace, stop)
        return result
    settled, todo = _triage(cohort.images, out, segmenter)
    counter = _Counter(len(cohort.images))
    for record in settled:
        result.records.append(record)
        yield counter.event(record)
    result.records += yield from _segment(todo, segmenter, out, counter, stop)
    return result


def study_name(cohort: Cohort, settings: Settings) -> str:
    """The default name of a shared run's study: the same images and settings on every
    worker make the same name, anything else another."""
    digest = hashlib.sha256(json.dumps(study_meta(cohort, settings), sort_keys=True).encode())
    return f"meshchop-cohort-{digest.hexdigest()[:12]}"


def study_meta(cohort: Cohort, settings: Settings) -> dict:
    keys = "\n".join(image.key for image in cohort.images)
    return {"kind": STUDY_KIND, "settings": settings.identity(),
            "images": hashlib.sha256(keys.encode()).hexdigest()}


def _shared(cohort: Cohort, out: Path, segmenter: Segmenter, storage, study: str | None,
            heartbeat: int, grace: int | None, stop: StopFlag
            ) -> Generator[Any, None, list[Record]]:
    """Each image a unit of a shared study: claimed by one worker, retried by another after
    its worker's heartbeat stopped. A worker reads, segments and writes one image at a time,
    and stays until no image is left anywhere."""
    name = study or study_name(cohort, segmenter.settings)
    opened = engine.open_storage(storage, heartbeat, grace)
    shared, _ = engine.open_study(opened, name,
                                  [{"image": image.key} for image in cohort.images],
                                  study_meta(cohort, segmenter.settings))
    by_key = {image.key: image for image in cohort.images}
    counter = _Counter(len(cohort.images))
    records: list[Record] = []

    def run_unit(trial, halt):
        image = by_key[engine.unit_of(trial)["image"]]
        counter.done = engine.counts(shared).finished
        settled, todo = _triage([image], out, segmenter)
        for record in settled:
            records.append(record)
            yield counter.event(record)
        records.extend((yield from _segment(todo, segmenter, out, counter, halt)))
        return 1.0 if records[-1].ok else 0.0

    running = None

    def told(event):  # the engine's events as lines for the user
        nonlocal running
        if isinstance(event, Claimed):
            again = f" (again: trial {event.origin}'s worker stopped)" if event.resumed else ""
            return Notice(f"{event.unit['image']}: claimed as trial {event.number}{again}")
        if isinstance(event, Finished):
            return None if event.state in ("COMPLETE", "REQUEUED") else Notice(
                f"{event.unit['image']}: {event.state.lower()} (trial {event.number})")
        if isinstance(event, Waiting):
            seen, running = running, event.running
            return None if seen == event.running else Notice(
                f"waiting for {event.running} image(s) on other workers")
        return event

    outcome = yield from relay(engine.work(opened, shared, run_unit, stop), told)
    if outcome.stopped:
        raise Cancelled("stopped; an interrupted image goes back to the study for any worker")
    return records


def group(cohort: Cohort, out_dir: str | os.PathLike, stop: StopFlag = None
          ) -> Generator[Progress, None, GroupResult]:
    """lesions.tsv and lesions.json, the volume plot and report.html, from what ``out_dir``
    holds for each image of ``cohort`` (done, failed, or missing)."""
    out = Path(out_dir).expanduser().resolve()
    if not (out / derivatives.DESCRIPTION).is_file():
        raise InputError(out, f"no segmentations here (no {derivatives.DESCRIPTION}); run "
                         "the participant level first")
    records = []
    for i, image in enumerate(cohort.images):
        records.append(derivatives.existing_record(image, out))
        if i % 50 == 0:
            yield Progress("group", i, len(cohort.images), "reading sidecars")
            check_stop(stop)
    table, _ = derivatives.write_table(out, records)
    yield Progress("group", len(records), len(records), "plotting")
    qc.write_volume_plot(out, records)
    title = f"{cohort.name or cohort.root.name}: stroke lesions"
    report = qc.write_report(out, records, title)
    return GroupResult(out, records, table, report)


def both_levels(cohort: Cohort, out_dir: str | os.PathLike, options: Options = Options(),
                stop: StopFlag = None) -> Generator[Any, None, GroupResult]:
    """Every image, then the table, the plot and the report (``meshchop segment`` of files
    and folders, the napari cohort panel)."""
    yield from participant(cohort, out_dir, options, stop=stop)
    return (yield from group(cohort, out_dir, stop))


def find_and_segment(source: str | os.PathLike, out_dir: str | os.PathLike,
                     options: Options = Options(), suffix: str = "T2w",
                     stop: StopFlag = None) -> Generator[Any, None, GroupResult]:
    """A BIDS dataset's ``suffix`` images, or every NIfTI file under a folder, through
    :func:`both_levels`; yields the :class:`Cohort` once found (the panel sizes its table)."""
    yield Progress("find", 0, 1, f"looking for images in {source}")
    if find.is_bids(source):
        cohort = find.bids_images(source, suffix=suffix)
    else:
        cohort = find.file_images([source], exclude=out_dir)
    yield cohort
    return (yield from both_levels(cohort, out_dir, options, stop))


def default_output(source: str | os.PathLike) -> Path:
    """Where a cohort's outputs go unless told: ``derivatives/meshchop`` inside a BIDS
    dataset (the convention), else a folder beside the input folder."""
    source = Path(source).expanduser()
    if find.is_bids(source):
        return source / "derivatives" / "meshchop"
    return source.with_name(f"{source.name}-meshchop")
