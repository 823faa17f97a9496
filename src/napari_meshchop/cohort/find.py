"""The images of a cohort: a BIDS dataset (found with pybids), or NIfTI files and folders.

Each :class:`Image` knows where its outputs go. For BIDS, the outputs carry the source's
entities (``sub-01_ses-2_acq-spc_run-1``) in the source's own folder
(``sub-01/ses-2/anat``), as the BIDS derivatives convention asks; for plain files, the file's
stem in its folder relative to the folder given.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from napari_meshchop.errors import InputError, MeshchopError
from napari_meshchop.imaging.nifti import NIFTI_SUFFIXES, is_nifti_path

DESCRIPTION = "dataset_description.json"
# Entities that become columns of lesions.tsv (BIDS key -> column); every entity of the
# source's name is carried into the output names, these also into the table.
COLUMNS = {"sub": "participant_id", "ses": "session_id", "acq": "acquisition",
           "rec": "reconstruction", "run": "run"}


@dataclass(frozen=True)
class Image:
    path: Path  # the source file
    key: str  # unique in the cohort: its path relative to the cohort's root, no extension
    folder: str  # where its outputs go, relative to the output folder ("" for the top)
    stem: str  # its outputs' names start with this: the source's entities, or the file stem
    suffix: str = ""  # the BIDS suffix ("T2w"); "" for plain files
    entities: dict[str, str] = field(default_factory=dict)  # as written: {"sub": "01", ...}
    source: str = ""  # how sidecars name it: a BIDS URI (bids:raw:sub-01/...) or the path

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def figures(self) -> str:
        """Where its QC picture goes: ``sub-01/figures`` (fMRIPrep's place) or ``figures/...``."""
        if "sub" in self.entities:
            return f"sub-{self.entities['sub']}/figures"
        return str(Path("figures", self.folder)) if self.folder else "figures"

    def columns(self) -> dict[str, str]:
        """Its entities as lesions.tsv columns (``participant_id`` holds ``sub-01``)."""
        out = {}
        for key, column in COLUMNS.items():
            value = self.entities.get(key)
            out[column] = "" if value is None else (
                f"{key}-{value}" if key in ("sub", "ses") else value)
        return out


@dataclass(frozen=True)
class Cohort:
    root: Path  # the BIDS dataset, or the folder the relative paths start from
    kind: str  # "bids" or "files"
    images: tuple[Image, ...]
    name: str = ""  # the dataset's Name (BIDS)
    doi: str = ""  # the dataset's DatasetDOI (BIDS)

    def __len__(self) -> int:
        return len(self.images)


def strip_nifti(name: str) -> str:
    lower = name.lower()
    for suffix in sorted(NIFTI_SUFFIXES, key=len, reverse=True):
        if lower.endswith(suffix):
            return name[: -len(suffix)]
    return name


def parse_entities(filename: str) -> tuple[dict[str, str], str]:
    """A BIDS file name's entities in order, and its suffix:
    ``sub-01_ses-2_run-1_T2w.nii.gz`` -> ({"sub": "01", "ses": "2", "run": "1"}, "T2w")."""
    parts = strip_nifti(filename).split("_")
    entities = {}
    for part in parts[:-1]:
        key, sep, value = part.partition("-")
        if sep and key and value:
            entities[key] = value
    return entities, parts[-1]


def is_bids(folder: str | os.PathLike) -> bool:
    return (Path(folder) / DESCRIPTION).is_file()


def _labels(values: Iterable[str] | None, prefix: str) -> list[str] | None:
    """BIDS-Apps labels without their prefix: ``sub-01`` and ``01`` both mean ``01``."""
    if not values:
        return None
    return [str(v).removeprefix(f"{prefix}-") for v in values]


def bids_images(bids_dir: str | os.PathLike, participants: Sequence[str] | None = None,
                sessions: Sequence[str] | None = None, suffix: str = "T2w") -> Cohort:
    """The ``suffix`` images (.nii, .nii.gz) of a BIDS dataset, for some participants and
    sessions (all by default). Raises when the folder is no BIDS dataset or a label is not
    in it."""
    import json

    from bids import BIDSLayout
    from bids.layout import BIDSLayoutIndexer

    root = Path(bids_dir).expanduser().resolve()
    if not root.is_dir():
        raise InputError(root, "BIDS dataset folder not found")
    if not is_bids(root):
        raise InputError(root, f"not a BIDS dataset (no {DESCRIPTION}); for a folder of "
                         "NIfTI files use `meshchop segment FOLDER -o OUTDIR`")
    try:
        description = json.loads((root / DESCRIPTION).read_text())
    except (OSError, ValueError) as exc:
        raise InputError(root / DESCRIPTION, f"not readable JSON ({exc})") from None
    # No metadata: a damaged sidecar elsewhere must not stop the cohort (pybids fails on it).
    layout = BIDSLayout(root, validate=False, indexer=BIDSLayoutIndexer(index_metadata=False))
    wanted, sessions_wanted = _labels(participants, "sub"), _labels(sessions, "ses")
    _check_labels(root, "participant", wanted, layout.get_subjects())
    _check_labels(root, "session", sessions_wanted, layout.get_sessions())
    query = {"suffix": suffix, "extension": [".nii", ".nii.gz"], "return_type": "filename"}
    if wanted:
        query["subject"] = wanted
    if sessions_wanted:
        query["session"] = sessions_wanted
    images = []
    for path in sorted(layout.get(**query)):
        path = Path(path)
        relative = path.relative_to(root)
        entities, found_suffix = parse_entities(path.name)
        if "sub" not in entities:
            continue
        stem = "_".join(f"{k}-{v}" for k, v in entities.items())
        images.append(Image(path, strip_nifti(str(relative.as_posix())),
                            relative.parent.as_posix(), stem, found_suffix, entities,
                            f"bids:raw:{relative.as_posix()}"))
    if not images:
        which = _selection(wanted, sessions_wanted)
        raise MeshchopError(f"{root}: no {suffix} images (.nii, .nii.gz){which}")
    return Cohort(root, "bids", tuple(images), str(description.get("Name", "")),
                  str(description.get("DatasetDOI", "")))


def _check_labels(root: Path, what: str, asked: list[str] | None, present: list) -> None:
    present = sorted(str(p) for p in present)
    missing = [label for label in asked or [] if label not in present]
    if missing:
        raise MeshchopError(f"{root}: no {what} {', '.join(missing)} (the dataset has "
                            f"{', '.join(present) if present else 'none'})")


def _selection(participants, sessions) -> str:
    parts = []
    if participants:
        parts.append("participant " + ", ".join(participants))
    if sessions:
        parts.append("session " + ", ".join(sessions))
    return f" for {' and '.join(parts)}" if parts else ""


def file_images(inputs: Sequence[str | os.PathLike],
                exclude: str | os.PathLike | None = None) -> Cohort:
    """NIfTI files, and every NIfTI file under each folder given (``exclude``, the output
    folder, left out): outputs keep a folder's layout; keys must be unique."""
    if not inputs:
        raise MeshchopError("no input files given")
    skip = Path(exclude).expanduser().resolve() if exclude else None
    found: list[tuple[Path, Path]] = []  # (file, the folder its relative path starts at)
    for given in inputs:
        path = Path(given).expanduser().resolve()
        if path.is_dir():
            inside = sorted(p for p in path.rglob("*") if p.is_file() and is_nifti_path(p)
                            and not _hidden(p.relative_to(path))
                            and not (skip and p.is_relative_to(skip)))
            if not inside:
                raise InputError(path, "holds no NIfTI files (.nii, .nii.gz)")
            found += [(p, path) for p in inside]
        elif path.is_file():
            if not is_nifti_path(path):
                raise InputError(path, "not a NIfTI file name (.nii or .nii.gz)")
            found.append((path, path.parent))
        else:
            raise InputError(path, "file not found")
    images, seen = [], {}
    for path, base in found:
        relative = path.relative_to(base)
        key = strip_nifti(relative.as_posix())
        if key in seen and seen[key] != path:
            raise InputError(path, f"has the same name as {seen[key]}; their outputs would "
                             "collide: segment them into separate output folders")
        if key in seen:
            continue
        seen[key] = path
        parent = relative.parent.as_posix()
        images.append(Image(path, key, "" if parent == "." else parent,
                            strip_nifti(path.name), source=str(path)))
    root = Path(os.path.commonpath([str(base) for _, base in found]))
    return Cohort(root, "files", tuple(images))


def _hidden(relative: Path) -> bool:
    return any(part.startswith(".") for part in relative.parts)
