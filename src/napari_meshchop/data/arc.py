"""The Aphasia Recovery Cohort from the Hugging Face hub: the paper's cohort, on disk.

The hub repository ``hugging-science/arc-aphasia-bids`` is a 273 GB mirror of OpenNeuro
ds004884 as parquet shards, one row per session (902 rows), every NIfTI embedded as
``{"bytes": <the .nii.gz file>, "path": <its BIDS file name>}``. The paper trains on the
sessions that have a lesion mask and a SPACE T2w, 2x accelerated or not (turbo spin echo
left out): 223 pairs in the public data (115 + 108), about 25 GB.

:func:`download` fetches only that, in two passes over the shards:

1. *scan*: read the columns ``subject_id``, ``session_id``, ``t2w_acquisition`` and
   ``lesion`` of every row (the masks are small) and choose the cohort;
2. *fetch*: read ``t2w`` only for the chosen sessions not already on disk. For a
   parquet-backed source (the hub, or a local folder laid out like it) the column list and
   a row filter go to the parquet reader, so other columns and other rows are not read
   (beyond shard footers and a 64 KiB read-ahead); NIfTI stays undecoded bytes until a
   row is kept.

Each mask is matched to the T2w run it was drawn on (its file name carries the run, as in
``sub-M2105_ses-964_acq-spc3_run-11_T2w_desc-lesion_mask.nii.gz``), checked to share that
run's shape and affine, and both files are written atomically, with their sha256 in
``manifest.json``. They are written as received, except that a file must be readable by its
own name: a row's bytes may be plain NIfTI under a ``.nii.gz`` name (what ``datasets``
stores when it encodes a nibabel image), so bytes are gzipped or unpacked to match the name
(their first bytes tell, never the name). Then both files are read back from disk the way
training, evaluation and segmentation read them (:func:`nifti.load_volume`,
:func:`nifti.load_mask`); a pair that fails is removed and left out as unreadable. A second
run verifies what is there (checksums, and names that match the bytes) and fetches the rest.
"""

from __future__ import annotations

import gzip
import io
import os
import re
import struct
import zlib
from collections.abc import Generator, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from napari_meshchop import files
from napari_meshchop.data import DEFAULT_DATA_DIR, REPO  # noqa: F401 - this module's API
from napari_meshchop.data import folds as _folds
from napari_meshchop.data import manifest as _manifest
from napari_meshchop.data.manifest import Excluded, Manifest, Pair
from napari_meshchop.errors import InputError, MeshchopError, reason
from napari_meshchop.events import DownloadProgress, Progress, StopFlag, check_stop
from napari_meshchop.imaging import nifti

SPACE = ("space_2x", "space_no_accel")
TSE = "turbo_spin_echo"
# BIDS acq- labels of ARC's T2w runs and the names the hub's t2w_acquisition column uses.
ACQ_LABELS = {"spc3p2": "space_2x", "spc3": "space_no_accel", "tse3": TSE}
PAPER_COUNTS = {"space_2x": 115, "space_no_accel": 109}  # the paper's 224 pairs

SCAN_COLUMNS = ["subject_id", "session_id", "t2w_acquisition", "lesion"]
FETCH_COLUMNS = ["subject_id", "session_id", "t2w_acquisition", "t2w", "lesion"]

AFFINE_TOLERANCE_MM = 1e-3
READ_AHEAD = 64 * 1024  # bytes fsspec reads past each range when streaming from the hub
_SAFE = re.compile(r"[^A-Za-z0-9._-]")


# ------------------------------------------------------------------------ cohort


@dataclass(frozen=True)
class Candidate:
    """A session chosen in the scan: it has a mask and a SPACE T2w."""

    subject: str
    session: str
    acquisition: str

    @property
    def key(self) -> tuple[str, str]:
        return self.subject, self.session

    @property
    def id(self) -> str:
        return f"{self.subject}_{self.session}"


@dataclass
class Cohort:
    selected: list[Candidate] = field(default_factory=list)
    excluded: list[Excluded] = field(default_factory=list)
    rows: int = 0


def classify(row: dict) -> tuple[str, str] | None:
    """Why a session (its cheap columns) is not in the paper's cohort, or None if it is."""
    acquisition = row.get("t2w_acquisition")
    if row.get("lesion") is None:
        return "no-lesion", ""
    if acquisition is None:
        return "no-t2w", ""
    if acquisition == TSE:
        return "tse", ""
    if acquisition not in SPACE:
        return "acquisition", str(acquisition)
    return None


def choose(rows: Iterable[dict], stop: StopFlag = None,
           total: int = 0) -> Generator[Progress, None, Cohort]:
    """Scan rows (their cheap columns) and choose the cohort, saying why others are out."""
    cohort = Cohort()
    for row in rows:
        check_stop(stop)
        subject, session = str(row["subject_id"]), str(row["session_id"])
        why = classify(row)
        if why is None:
            cohort.selected.append(Candidate(subject, session, row["t2w_acquisition"]))
        else:
            cohort.excluded.append(Excluded(subject, session, *why))
        cohort.rows += 1
        yield Progress("scan", cohort.rows, max(total, cohort.rows), f"{subject} {session}")
    return cohort


# ------------------------------------------------------------------ one session


class Skip(Exception):
    """A chosen session that turned out unusable; carries the reason for the manifest."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason, self.detail = reason, detail


@dataclass
class Blob:
    """One embedded NIfTI file: its bytes as stored on the hub and its BIDS name."""

    name: str
    data: bytes

    @classmethod
    def of(cls, value: dict | None, fallback: str) -> Blob | None:
        if value is None or value.get("bytes") is None:
            return None
        data = bytes(value["bytes"])
        name = os.path.basename(value.get("path") or "")
        if not name or _SAFE.search(name) or not name.endswith((".nii", ".nii.gz")):
            name = fallback + (".nii.gz" if data[:2] == nifti.GZIP_MAGIC else ".nii")
        return cls(name, data)


def bids_entity(name: str, key: str) -> str | None:
    match = re.search(rf"(?:^|_){key}-([A-Za-z0-9]+)(?=_|\.|$)", name)
    return match.group(1) if match else None


def _stem(name: str) -> str:
    for suffix in (".nii.gz", ".nii"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    return name.replace("_desc-lesion_mask", "")


def match_run(t2w_names: list[str], mask_name: str) -> tuple[int | None, str]:
    """Index of the T2w run a mask was drawn on, judged by file names, and how it was found.

    The mask's name is the run's name plus ``_desc-lesion_mask``; failing that the BIDS
    ``run-`` entities are compared; a lone run is taken as is. None when names cannot tell.
    """
    stems = [_stem(n) for n in t2w_names]
    if _stem(mask_name) in stems and stems.count(_stem(mask_name)) == 1:
        how = "file name"
        index = stems.index(_stem(mask_name))
    else:
        run = bids_entity(mask_name, "run")
        runs = [bids_entity(n, "run") for n in t2w_names]
        if run is not None and runs.count(run) == 1:
            index, how = runs.index(run), "run entity"
        elif len(t2w_names) == 1:
            index, how = 0, "the only T2w run"
        else:
            return None, ""
    if len(t2w_names) > 1:
        runs = ", ".join(bids_entity(n, "run") or "?" for n in t2w_names)
        how += f"; run {bids_entity(t2w_names[index], 'run') or index} of runs {runs}"
    return index, how


@dataclass
class Volume:
    """What is read off one NIfTI file without keeping its voxels."""

    shape: tuple[int, ...]
    affine: np.ndarray
    zooms: tuple[float, ...]
    image: nib.Nifti1Image | None = None  # kept only for masks, whose voxels are counted


def read_blob(blob: Blob, label: str, voxels: bool = False) -> Volume:
    """Parse a NIfTI file's header and check that the whole file is there.

    The gzip stream is read to its end (its CRC is checked there) and the payload must be
    as long as the header says. With ``voxels`` the image is kept to read its data.
    """
    raw = (gzip.GzipFile(fileobj=io.BytesIO(blob.data)) if blob.data[:2] == nifti.GZIP_MAGIC
           else io.BytesIO(blob.data))
    try:
        head = raw.read(540)
        sizes = {struct.unpack("<i", head[:4])[0], struct.unpack(">i", head[:4])[0]}
        klass = nib.Nifti2Header if 540 in sizes else nib.Nifti1Header
        header = klass.from_fileobj(io.BytesIO(head))
        chunks = [head] if voxels else []
        length = len(head)
        while chunk := raw.read(1 << 22):
            length += len(chunk)
            if voxels:
                chunks.append(chunk)
    except (OSError, EOFError, zlib.error, ValueError, nib.spatialimages.HeaderDataError,
            nib.filebasedimages.ImageFileError) as exc:
        raise Skip("unreadable", f"{label} {blob.name}: {reason(exc, 300)}") from None
    shape = tuple(int(s) for s in header.get_data_shape())
    needed = int(header.get_data_offset()) + int(np.prod(shape)) * header.get_data_dtype().itemsize
    if length < needed:
        raise Skip("unreadable", f"{label} {blob.name} is truncated ({length} of {needed} bytes)")
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    if len(shape) != 3:
        raise Skip("unreadable", f"{label} {blob.name} has shape {shape}, not one 3D volume")
    image = None
    if voxels:
        image_class = nib.Nifti2Image if klass is nib.Nifti2Header else nib.Nifti1Image
        image = image_class.from_bytes(b"".join(chunks))
    zooms = tuple(float(z) for z in header.get_zooms()[:3])
    return Volume(shape, header.get_best_affine(), zooms, image)


def geometry_problem(image: Volume, mask: Volume) -> str | None:
    """How a mask's grid differs from its image's, or None when they share it."""
    if mask.shape != image.shape:
        return f"mask shape {mask.shape} vs T2w shape {image.shape}"
    diff = float(np.abs(mask.affine - image.affine).max())
    if diff > AFFINE_TOLERANCE_MM:
        return f"mask and T2w affines differ by up to {diff:.3g} mm"
    return None


def lesion_voxels(mask: Volume) -> int:
    """Voxels > 0 after the header's scaling (some ARC masks carry an odd scl_slope)."""
    return int(np.count_nonzero(np.asarray(mask.image.dataobj) > 0))


def build_pair(row: dict, acquisition: str) -> tuple[Blob, Blob, Pair]:
    """The image and mask of one chosen session, checked; raise :class:`Skip` if unusable.

    The returned :class:`Pair` has the paths the files will have, relative to the data folder.
    """
    subject, session = _safe(row["subject_id"]), _safe(row["session_id"])
    prefix = f"{subject}_{session}"
    t2ws = [Blob.of(v, f"{prefix}_run-{i + 1}_T2w") for i, v in enumerate(row.get("t2w") or [])]
    t2ws = [b for b in t2ws if b is not None]
    mask = Blob.of(row.get("lesion"), f"{prefix}_T2w_desc-lesion_mask")
    if mask is None:
        raise Skip("no-lesion", "")
    if not t2ws:
        raise Skip("no-t2w", "")
    mask_vol = read_blob(mask, "lesion mask", voxels=True)
    index, how = match_run([b.name for b in t2ws], mask.name)
    if index is None:  # names cannot tell: the one run on the mask's grid, if just one
        fits = [i for i, b in enumerate(t2ws)
                if geometry_problem(read_blob(b, "T2w"), mask_vol) is None]
        if len(fits) != 1:
            raise Skip("no-run", f"{len(t2ws)} T2w runs ({', '.join(b.name for b in t2ws)}), "
                       f"{len(fits)} on the mask's grid")
        index, how = fits[0], "the only run on the mask's grid"
        image_vol = read_blob(t2ws[index], "T2w")
    else:
        image_vol = read_blob(t2ws[index], "T2w")
        problem = geometry_problem(image_vol, mask_vol)
        if problem is not None:
            raise Skip("geometry", f"{problem} ({t2ws[index].name})")
    image = t2ws[index]
    label = ACQ_LABELS.get((bids_entity(image.name, "acq") or "").lower())
    if label is not None and label != acquisition:
        if label not in SPACE:
            raise Skip("tse" if label == TSE else "acquisition",
                       f"{image.name} is {label} although the session says {acquisition}")
        acquisition = label
    voxels = lesion_voxels(mask_vol)
    if voxels == 0:
        raise Skip("empty-mask", mask.name)
    # Written as their names say: gzipped for .nii.gz, plain for .nii, whatever they came as.
    image, mask = (Blob(b.name, nifti.as_named(b.data, b.name)) for b in (image, mask))
    folder = Path(subject) / session
    pair = Pair(
        subject=subject, session=session, acquisition=acquisition,
        run=bids_entity(image.name, "run"),
        image=(folder / image.name).as_posix(), mask=(folder / mask.name).as_posix(),
        image_sha256=files.sha256_bytes(image.data), mask_sha256=files.sha256_bytes(mask.data),
        image_bytes=len(image.data), mask_bytes=len(mask.data),
        shape=image_vol.shape, voxel_mm=image_vol.zooms,
        orientation="".join(nib.aff2axcodes(image_vol.affine)),
        lesion_voxels=voxels,
        lesion_ml=round(voxels * abs(float(np.linalg.det(image_vol.affine[:3, :3]))) / 1000, 6),
        matched_by=how)
    return image, mask, pair


# ------------------------------------------------------------------ the source


@dataclass
class Rows:
    """An open stream of rows and how many there are (an estimate; 0 when unknown)."""

    rows: Iterator[dict]
    total: int = 0

    def __iter__(self) -> Iterator[dict]:
        return self.rows


def open_rows(columns: list[str], repo: str = REPO, revision: str | None = None,
              source: Any = None, keys: set[tuple[str, str]] | None = None) -> Rows:
    """Rows of the dataset with just ``columns``, NIfTI as undecoded ``{bytes, path}``.

    ``source`` is a ``datasets.Dataset`` or ``IterableDataset``, or a local folder (one
    written by ``save_to_disk``, or parquet shards laid out as on the hub); None streams
    ``repo`` at ``revision`` from the hub. ``keys`` keeps only those (subject, session)
    rows; for parquet it becomes the reader's row filter, so other rows are not read.
    """
    try:
        import datasets
    except ImportError:
        raise MeshchopError("downloading ARC needs the `datasets` package: "
                            "pip install datasets") from None
    target = repo if source is None else source
    if isinstance(target, (str, os.PathLike)):
        target = os.path.expanduser(os.fspath(target))
    label = target if isinstance(target, str) else "the given dataset"
    if _looks_local(target) and not Path(target).is_dir():
        raise InputError(target, "no such folder; give a hub dataset id such as "
                         f"{REPO}, or a local copy of it")
    try:
        if isinstance(target, (datasets.Dataset, datasets.IterableDataset)):
            ds = target
        elif _saved_to_disk(target):
            ds = datasets.load_from_disk(os.fspath(target))
        else:
            filters = None if keys is None else [
                [("subject_id", "==", s), ("session_id", "==", t)] for s, t in sorted(keys)]
            # fsspec reads ahead 5 MB past every range pyarrow asks for; on shards of
            # ~300 MB that would fetch much of the columns we skip. Read ahead little.
            remote = {} if _looks_local(target) else {
                "storage_options": {"hf": {"block_size": READ_AHEAD}}}
            ds = datasets.load_dataset(target, revision=revision, split="train",
                                       streaming=True, columns=columns, filters=filters,
                                       **remote)
        if isinstance(ds, datasets.DatasetDict):
            ds = ds["train"]
        missing = [c for c in columns if ds.column_names is not None and c not in ds.column_names]
        if missing:
            raise MeshchopError(f"{label} has no column {', '.join(missing)}: it is not the "
                                f"ARC dataset ({REPO}), or a revision of it older than "
                                "that column")
        ds = ds.select_columns(columns)
        if isinstance(ds, datasets.Dataset):
            total = len(ds)
            ds = ds.to_iterable_dataset()
        else:  # the hub's layout is one parquet file per session
            splits = ds.info.splits or {}
            total = splits["train"].num_examples if "train" in splits else ds.num_shards
        ds = ds.decode(False)
        rows = iter(ds)
    except MeshchopError:
        raise
    except Exception as exc:  # the hub and fsspec raise many types for one cause
        where = f"{label}" + (f" at revision {revision}" if revision else "")
        raise MeshchopError(f"could not open {where}: {reason(exc, 300)}. Check the repository "
                            "id, the revision and the network") from None
    return Rows(_guarded(rows, label, keys), total)


def _guarded(rows: Iterator[dict], label: str, keys) -> Iterator[dict]:
    while True:
        try:
            row = next(rows)
        except StopIteration:
            return
        except Exception as exc:
            raise MeshchopError(f"reading {label} failed ({reason(exc, 300)}); what is on disk "
                                "is complete, run again to resume") from None
        if keys is None or (str(row["subject_id"]), str(row["session_id"])) in keys:
            yield row


def _looks_local(target) -> bool:
    """A path rather than a hub id (``owner/name``)."""
    if not isinstance(target, (str, os.PathLike)):
        return False
    text = os.fspath(target)
    return (Path(text).exists() or text.startswith((".", "/", "~")) or "\\" in text
            or text.count("/") != 1)


def _saved_to_disk(target) -> bool:
    if not isinstance(target, (str, os.PathLike)):
        return False
    folder = Path(target)
    return (folder / "dataset_dict.json").is_file() or (folder / "state.json").is_file()


# ------------------------------------------------------------------- download


@dataclass
class DownloadResult:
    data_dir: Path
    manifest: Manifest
    rows: int = 0  # sessions scanned
    downloaded: int = 0  # pairs written in this run
    verified: int = 0  # pairs already on disk, checked against their sha256
    nbytes: int = 0  # bytes written in this run
    swept: int = 0  # half-written files of an interrupted run, removed
    folds: Path | None = None
    notes: list[str] = field(default_factory=list)

    def summary(self) -> list[str]:
        m = self.manifest
        acq = ", ".join(f"{k} {v}" for k, v in m.by_acquisition().items()) or "none"
        paper = " + ".join(str(PAPER_COUNTS[k]) for k in SPACE)
        lines = [f"Scanned {self.rows} sessions of {m.repo}"
                 + (f" (revision {m.revision})" if m.revision else "") + ".",
                 f"Cohort: {len(m.pairs)} image/mask pairs ({acq}); the paper used "
                 f"{sum(PAPER_COUNTS.values())} ({paper}).",
                 f"Excluded {len(m.excluded)} sessions: " + ", ".join(
                     f"{n} {_manifest.REASONS.get(r, r)}" for r, n in
                     m.excluded_by_reason().items()) + "."]
        lines += [f"  {e.describe()}" for e in sorted(m.excluded, key=lambda e: e.id)
                  if e.reason != "no-lesion"]
        lines.append(f"Downloaded {self.downloaded} pairs ({human_bytes(self.nbytes)}); "
                     f"{self.verified} already on disk and verified.")
        if self.swept:
            lines.append(f"Removed {self.swept} half-written files of an interrupted run.")
        if m.pending:
            lines.append(f"Still missing {len(m.pending)} pairs: {', '.join(m.pending[:5])}"
                         + (" ..." if len(m.pending) > 5 else ""))
        lines.append(f"Manifest: {_manifest.path(self.data_dir)}")
        if self.folds is not None:
            lines.append(f"Folds: {self.folds}")
        return lines + self.notes


def download(data_dir: str | os.PathLike = DEFAULT_DATA_DIR, repo: str = REPO,
             revision: str | None = None, source: Any = None, stop: StopFlag = None,
             folds: bool = True) -> Generator[Progress, None, DownloadResult]:
    """Fetch the paper's ARC cohort into ``data_dir``; resume what an earlier run began.

    Yields :class:`Progress` while scanning and verifying and :class:`DownloadProgress`
    (pairs and bytes) while fetching; checks ``stop`` between rows and files; returns a
    :class:`DownloadResult`. With ``folds`` the default nested folds are written next to
    the manifest when the cohort is complete and no folds for it exist yet.
    """
    data_dir = Path(data_dir)
    if source is None:
        label = repo
    elif isinstance(source, (str, os.PathLike)):
        label = os.fspath(source)
    else:
        label = f"{repo} (given as a {type(source).__name__})"
    with files.exclusive(data_dir, "download"):
        swept = files.sweep_partials(data_dir)
        # 1. scan the cheap columns and choose the cohort
        rows = open_rows(SCAN_COLUMNS, repo, revision, source)
        cohort = yield from choose(rows, stop, rows.total)
        # 2. what is already on disk and intact
        previous = _previous(data_dir, label, revision)
        keep: dict[str, Pair] = {}
        for i, cand in enumerate(cohort.selected):
            check_stop(stop)
            pair = previous.get(cand.id)
            if pair is not None and _manifest.verify(pair, data_dir) is None:
                keep[cand.id] = pair
            yield Progress("verify", i + 1, len(cohort.selected), cand.id)
        todo = {c.key: c for c in cohort.selected if c.id not in keep}
        state = Manifest(repo=label, revision=revision, pairs=list(keep.values()),
                         excluded=list(cohort.excluded),
                         pending=sorted(c.id for c in todo.values()))
        state.save(data_dir)
        result = DownloadResult(data_dir, state, rows=cohort.rows, verified=len(keep),
                                swept=len(swept))
        # 3. fetch the rest: only their rows, only the columns a pair needs
        total, done = len(cohort.selected), len(keep)
        if todo:
            yield DownloadProgress("download", done, total, "opening the dataset")
            for row in open_rows(FETCH_COLUMNS, repo, revision, source, set(todo)):
                check_stop(stop)
                cand = todo.pop((str(row["subject_id"]), str(row["session_id"])), None)
                if cand is None:  # a duplicate row
                    continue
                try:
                    image, mask, pair = build_pair(row, cand.acquisition)
                except Skip as skip:
                    state.excluded.append(Excluded(cand.subject, cand.session, skip.reason,
                                                   skip.detail))
                else:  # the two files of a pair are written together, image first
                    for blob, rel in ((image, pair.image), (mask, pair.mask)):
                        files.write_bytes(data_dir / rel, blob.data)
                        result.nbytes += len(blob.data)
                    problem = read_back(pair, data_dir)
                    if problem is None:
                        state.pairs.append(pair)
                        result.downloaded += 1
                    else:
                        for rel in (pair.image, pair.mask):
                            (data_dir / rel).unlink(missing_ok=True)
                        state.excluded.append(Excluded(cand.subject, cand.session,
                                                       "unreadable", problem))
                state.pending.remove(cand.id)
                state.save(data_dir)
                done += 1
                yield DownloadProgress("download", done, total,
                                       f"{human_bytes(result.nbytes)}, {cand.subject} "
                                       f"{cand.session}", result.nbytes)
        if state.complete and folds and state.pairs:
            try:
                result.folds = _folds.ensure(data_dir, state)
            except MeshchopError as exc:  # a cohort too small for the default folds
                result.notes.append(f"No folds written: {exc}.")
        return result


def read_back(pair: Pair, data_dir: str | os.PathLike) -> str | None:
    """None when a written pair reads from disk the way training, evaluation and
    segmentation read it (by its file names, every voxel), else what is wrong."""
    data_dir = Path(data_dir)
    try:
        nifti.load_volume(data_dir / pair.image)
        nifti.load_mask(data_dir / pair.mask)
    except InputError as exc:
        return str(exc)
    return None


def _previous(data_dir: Path, repo: str, revision: str | None) -> dict[str, Pair]:
    """Pairs an earlier run recorded for the same repository and revision."""
    if not _manifest.path(data_dir).is_file():
        return {}
    try:
        old = _manifest.load(data_dir)
    except MeshchopError:
        return {}  # unreadable: everything is fetched again and the manifest rewritten
    if old.repo != repo or (old.revision or "main") != (revision or "main"):
        return {}
    return {p.id: p for p in old.pairs}


def human_bytes(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


def _safe(text) -> str:
    return _SAFE.sub("_", str(text)) or "_"

