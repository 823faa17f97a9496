"""Corrected masks become training data: saved with their provenance, gathered in a local
data folder that ``meshchop train``, ``evaluate``, ``experiment`` and ``finetune`` read
like the ARC download.

* :func:`save_corrected` writes an edited mask on its scan's grid and a JSON sidecar beside
  it (``mask.nii.gz`` -> ``mask.json``): the source scan, the model and its sha256, the
  threshold, whether it was edited, and when.
* :func:`add` puts a scan and its corrected mask into a data folder: the same layout of
  files as a download (``sub-X/ses-Y/...``), the same ``manifest.json`` format, and the
  folds made again (as many as the folder's subjects allow, up to the paper's 3 x 3; none
  under 3 subjects). A scan is identified by its subject and session, or by its content
  (sha256): adding the same scan again replaces its pair.

Naming: ``sub-``/``ses-`` entities in the scan's file name are kept (BIDS); otherwise the
subject is ``sub-`` and the name's letters and digits, and the session ``ses-`` and the
first 8 hex digits of the scan's sha256.
"""

from __future__ import annotations

import gzip
import os
import re
import shutil
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import nibabel as nib
import numpy as np

from napari_meshchop import files
from napari_meshchop.data import cache as _cache
from napari_meshchop.data import folds as _folds
from napari_meshchop.data import manifest as _manifest
from napari_meshchop.data.manifest import Manifest, Pair
from napari_meshchop.errors import InputError, MeshchopError
from napari_meshchop.imaging.nifti import (
    check_volume,
    is_nifti_path,
    load_mask,
    load_volume,
    save_mask,
)
from napari_meshchop.network import registry

SIDECAR_FORMAT = "napari-meshchop/corrected-mask"
REPO = "local corrections"  # the manifest's source, for a folder made here
MATCHED_BY = "corrected mask drawn on this scan"
AFFINE_TOLERANCE_MM = 1e-3

Image = str | os.PathLike | nib.Nifti1Image


# ------------------------------------------------------------------ saving a correction


@dataclass(frozen=True)
class Provenance:
    """Where a corrected mask came from (its sidecar)."""

    source_scan: str  # the scan's file, or its layer's name when it has none
    model: str = ""  # registry name, checkpoint file, or "" when drawn by hand
    model_sha256: str | None = None
    threshold: float | None = None  # of P(lesion), when the mask came from a model
    edited: bool = True

    def to_dict(self) -> dict:
        return {"format": SIDECAR_FORMAT, "version": 1, "source_scan": self.source_scan,
                "model": self.model, "model_sha256": self.model_sha256,
                "threshold": self.threshold, "edited": self.edited,
                "time": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def model_sha256(model: str | os.PathLike | None) -> str | None:
    """The sha256 of a model: a registry name's recorded sum, or a checkpoint file's."""
    if not model:
        return None
    text = os.fspath(model)
    entry = registry.REGISTRY.get(text)
    if entry is not None:
        return entry.sha256
    return files.sha256_file(text) if Path(text).is_file() else None


def sidecar_path(mask_path: str | os.PathLike) -> Path:
    """``x.nii.gz`` or ``x.nii`` -> ``x.json``."""
    path = Path(mask_path)
    return path.with_name(re.sub(r"\.nii(\.gz)?$", "", path.name, flags=re.IGNORECASE) + ".json")


def save_corrected(mask: np.ndarray, affine: np.ndarray, path: str | os.PathLike,
                   provenance: Provenance) -> tuple[Path, Path]:
    """Write ``mask`` (voxels > 0 as 1, uint8) on ``affine`` and its sidecar; return both."""
    if not is_nifti_path(path):
        raise InputError(path, "a mask is saved as .nii.gz or .nii")
    lesion = (np.asarray(mask) > 0).astype(np.uint8)
    written = save_mask(lesion, affine, path)
    return written, files.write_json(sidecar_path(written),
                                     _sidecar(provenance, lesion, affine, written.name))


def _sidecar(provenance: Provenance, lesion: np.ndarray, affine: np.ndarray, name: str
             ) -> dict:
    voxels = int(lesion.sum())
    return {**provenance.to_dict(), "mask": name, "lesion_voxels": voxels,
            "lesion_ml": _ml(voxels, affine)}


def _ml(voxels: int, affine: np.ndarray) -> float:
    return round(voxels * abs(float(np.linalg.det(np.asarray(affine)[:3, :3]))) / 1000, 6)


def read_sidecar(mask_path: str | os.PathLike) -> dict | None:
    """The sidecar of a saved corrected mask, or None when there is none."""
    where = sidecar_path(mask_path)
    if not where.is_file():
        return None
    return files.read_json(where, where.name, SIDECAR_FORMAT, "corrected-mask sidecar", "")[1]


# ------------------------------------------------------------------ the training set


@dataclass
class Added:
    """What :func:`add` did."""

    data_dir: Path
    pair: Pair
    replaced: list[str] = field(default_factory=list)  # ids of the pairs it replaced
    pairs: int = 0  # in the folder now
    subjects: int = 0
    folds: tuple[int, int] | None = None  # outer x inner folds made, None: too few subjects

    def summary(self) -> list[str]:
        verb = "replaced" if self.replaced else "added"
        lines = [f"{verb} {self.pair.id}: {self.pair.lesion_ml:.2f} mL "
                 f"({self.pair.lesion_voxels} voxels) in {self.data_dir}",
                 f"{self.pairs} pair{'s' * (self.pairs != 1)} of {self.subjects} "
                 f"subject{'s' * (self.subjects != 1)}"]
        if self.folds:
            lines.append(f"folds made again: {self.folds[0]} outer x {self.folds[1]} inner")
        else:
            lines.append("no folds: cross-validation needs 3 subjects or more; "
                         "`meshchop finetune` trains on every pair")
        return lines


def add(data_dir: str | os.PathLike, scan: Image, mask: str | os.PathLike | np.ndarray,
        name: str | None = None, provenance: Provenance | None = None,
        affine: np.ndarray | None = None) -> Added:
    """Put ``scan`` and its corrected ``mask`` (a file, or voxels on the scan's grid: their
    ``affine``, when given, is checked against the scan's) into ``data_dir`` as one pair;
    replace the pair of the same scan; make the folds again.

    ``scan`` is a NIfTI file (copied as it is) or an image (written as .nii.gz); ``name``
    is what the pair is named from (default: the scan's file name). The mask's sidecar
    in the folder is ``provenance``, else the one saved beside a mask file.
    """
    data_dir = Path(data_dir)
    image, image_bytes, suffix = _scan_bytes(scan)
    label = name or (Path(scan).name if isinstance(scan, (str, os.PathLike)) else "scan")
    lesion, sidecar = _mask_on(image, mask, label, affine)
    digest = files.sha256_bytes(image_bytes)
    subject, session = pair_names(label, digest)
    folder = Path(subject) / session
    stem = f"{subject}_{session}"
    image_rel = (folder / f"{stem}_T2w{suffix}").as_posix()
    mask_rel = (folder / f"{stem}_desc-lesion_mask.nii.gz").as_posix()

    with files.exclusive(data_dir, "change of the training set"):
        manifest = _existing(data_dir)
        old = [p for p in manifest.pairs
               if p.id == f"{subject}_{session}" or p.image_sha256 == digest]
        files.write_bytes(data_dir / image_rel, image_bytes)
        save_mask(lesion, image.affine, data_dir / mask_rel)
        if provenance is not None:
            sidecar = _sidecar(provenance, lesion, image.affine, Path(mask_rel).name)
        if sidecar:
            files.write_json(sidecar_path(data_dir / mask_rel), sidecar)
        voxels = int(lesion.sum())
        pair = Pair(
            subject=subject, session=session, acquisition=_bids(label, "acq") or "unknown",
            run=_bids(label, "run"), image=image_rel, mask=mask_rel,
            image_sha256=digest, mask_sha256=files.sha256_file(data_dir / mask_rel),
            image_bytes=len(image_bytes), mask_bytes=(data_dir / mask_rel).stat().st_size,
            shape=tuple(int(s) for s in image.shape[:3]),
            voxel_mm=tuple(float(z) for z in image.header.get_zooms()[:3]),
            orientation="".join(nib.aff2axcodes(image.affine)), lesion_voxels=voxels,
            lesion_ml=_ml(voxels, image.affine), matched_by=MATCHED_BY)
        manifest.pairs = [p for p in manifest.pairs if p not in old] + [pair]
        manifest.save(data_dir)
        for p in old:
            _remove_files(data_dir, p, keep={image_rel, mask_rel})
        made = remake_folds(data_dir, manifest)
    subjects = len({p.subject for p in manifest.pairs})
    return Added(data_dir, pair, [p.id for p in old], len(manifest.pairs), subjects, made)


def remake_folds(data_dir: str | os.PathLike, manifest: Manifest) -> tuple[int, int] | None:
    """The nested folds of the folder's pairs, as many as its subjects allow; None (and
    no folds.json) when there are too few subjects."""
    samples = _folds.samples_of(manifest)
    sizes = _folds.sizes_for(len({s.subject for s in samples}))
    while sizes is not None:
        try:
            _folds.nested_folds(samples, *sizes).save(data_dir)
            return sizes
        except MeshchopError:  # an uneven stratified split left a training part too small
            outer, inner = sizes
            sizes = (outer, inner - 1) if inner > 2 else None
    (Path(data_dir) / _folds.NAME).unlink(missing_ok=True)
    return None


def pair_names(name: str, sha256: str) -> tuple[str, str]:
    """Subject and session of a scan named ``name`` with content ``sha256``."""
    stem = re.sub(r"\.nii(\.gz)?$", "", Path(name).name, flags=re.IGNORECASE)
    subject = _bids(stem, "sub")
    subject = f"sub-{subject}" if subject else "sub-" + (re.sub(r"[^A-Za-z0-9]", "", stem)
                                                         or "scan")
    session = _bids(stem, "ses")
    return subject, f"ses-{session}" if session else f"ses-{sha256[:8]}"


def _bids(name: str, key: str) -> str | None:
    found = re.search(rf"(?:^|_){key}-([A-Za-z0-9]+)", name)
    return found.group(1) if found else None


def _scan_bytes(scan: Image) -> tuple[nib.Nifti1Image, bytes, str]:
    """The checked scan, the bytes to store and their suffix (.nii.gz or .nii)."""
    if isinstance(scan, nib.Nifti1Image):
        check_volume(np.asarray(scan.dataobj), path="the scan")
        # mtime 0: the same image gives the same bytes, hence the same sha256.
        return scan, gzip.compress(scan.to_bytes(), compresslevel=6, mtime=0), ".nii.gz"
    path = Path(scan)
    image = load_volume(path)  # checked: readable, 3D, not blank
    suffix = ".nii.gz" if path.name.lower().endswith(".gz") else ".nii"
    return image, path.read_bytes(), suffix


def _mask_on(image: nib.Nifti1Image, mask, label: str, affine: np.ndarray | None
             ) -> tuple[np.ndarray, dict | None]:
    """The mask as uint8 {0, 1} on the scan's grid, and the sidecar saved beside it."""
    sidecar = None
    if isinstance(mask, (str, os.PathLike)):
        loaded = load_mask(mask)
        data, affine = np.asanyarray(loaded.dataobj), loaded.affine
        sidecar = read_sidecar(mask)
    else:
        data = np.asarray(mask)
    off = data.shape != image.shape[:3] or (
        affine is not None
        and float(np.abs(np.asarray(affine) - image.affine).max()) > AFFINE_TOLERANCE_MM)
    if off:
        problem = (f"not on the grid of {label} (shape {data.shape} vs {image.shape[:3]}, "
                   "or another affine)")
        if isinstance(mask, (str, os.PathLike)):
            raise InputError(mask, problem)
        raise MeshchopError(f"the mask is {problem}")
    return (data > 0).astype(np.uint8), sidecar


def _existing(data_dir: Path) -> Manifest:
    if not _manifest.path(data_dir).is_file():
        return Manifest(repo=REPO)
    manifest = _manifest.load(data_dir)
    if not manifest.complete:
        raise MeshchopError(f"{_manifest.path(data_dir)}: a download into this folder "
                            "stopped part-way; finish it (`meshchop download`) first")
    return manifest


def _remove_files(data_dir: Path, pair: Pair, keep: set[str]) -> None:
    """The replaced pair's files and cached volumes (its folder, when left empty)."""
    for rel in (pair.image, pair.mask):
        if rel not in keep:
            (data_dir / rel).unlink(missing_ok=True)
            if rel == pair.mask:
                sidecar_path(data_dir / rel).unlink(missing_ok=True)
    for cached in (data_dir / _cache.FOLDER).glob(f"{pair.id}.*.npz"):
        cached.unlink(missing_ok=True)
    folder = (data_dir / pair.image).parent
    if folder.is_dir() and not any(folder.iterdir()):
        shutil.rmtree(folder)
        if not any(folder.parent.iterdir()):
            folder.parent.rmdir()
