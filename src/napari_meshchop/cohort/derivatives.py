"""What a cohort's output folder holds, named as BIDS derivatives.

Per image (``<entities>`` are the source's, e.g. ``sub-01_ses-2_run-1``)::

    sub-01/ses-2/anat/<entities>_space-orig_desc-lesion_mask.nii.gz     the mask, source grid
    sub-01/ses-2/anat/<entities>_space-orig_desc-lesion_mask.json       its sidecar, written
                                                                        last: the image is
                                                                        done iff it is valid
    sub-01/ses-2/anat/<entities>_space-orig_label-lesion_probseg.nii.gz P(lesion) (asked for)
    sub-01/ses-2/anat/<entities>_space-orig_label-lesion_desc-disagreement_probseg.nii.gz
                                                                        an ensemble's SD
    sub-01/figures/<entities>_desc-lesion_T2w.png                       the QC mosaic
    logs/sub-01/ses-2/anat/<entities>_desc-lesion_error.json            why it failed

and for the dataset ``dataset_description.json``; the group level adds ``lesions.tsv``
with its data dictionary ``lesions.json``, ``figures/lesion_volumes.png`` and
``report.html``.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from napari_meshchop import __version__, files
from napari_meshchop.cohort.find import COLUMNS, Cohort, Image

PIPELINE = "napari-meshchop"
CODE_URL = "https://github.com/napari-meshchop/napari-meshchop"
BIDS_VERSION = "1.10.0"
DESCRIPTION = "dataset_description.json"
TABLE = "lesions.tsv"
DICTIONARY = "lesions.json"
VOLUME_PLOT = "figures/lesion_volumes.png"
REPORT = "report.html"
CONNECTIVITY = 26  # voxels touching by a face, an edge or a corner are one component
STATUSES = ("done", "failed", "missing")


@dataclass(frozen=True)
class ModelRef:
    name: str  # a registry name or a checkpoint file's name
    sha256: str  # of the checkpoint file

    def to_dict(self) -> dict:
        return {"Name": self.name, "Sha256": self.sha256}


@dataclass(frozen=True)
class Settings:
    """What makes two segmentations of an image the same: a rerun with equal settings
    reuses the outputs, any change redoes them."""

    models: tuple[ModelRef, ...]
    preprocessing: dict
    threshold: float = 0.5
    probability: bool = False  # probseg images asked for

    @property
    def model_label(self) -> str:
        return " + ".join(m.name for m in self.models)

    def identity(self) -> dict:
        return {"models": [m.sha256 for m in self.models],
                "preprocessing": json.loads(json.dumps(self.preprocessing)),
                "threshold": float(self.threshold)}

    def matches(self, sidecar: dict) -> bool:
        """Made by these settings (the sidecar's models, preprocessing, threshold)?"""
        try:
            theirs = {"models": [m["Sha256"] for m in sidecar["Model"]],
                      "preprocessing": sidecar["Preprocessing"],
                      "threshold": float(sidecar["Threshold"])}
        except (KeyError, TypeError, ValueError):
            return False
        return theirs == self.identity()


@dataclass(frozen=True)
class Outputs:
    """The files of one image under the output folder."""

    mask: Path
    sidecar: Path
    probseg: Path
    disagreement: Path
    mosaic: Path
    error: Path

    def images(self) -> list[Path]:
        return [self.mask, self.probseg, self.disagreement]

    def every(self) -> list[Path]:
        return [self.mask, self.sidecar, self.probseg, sidecar_of(self.probseg),
                self.disagreement, sidecar_of(self.disagreement), self.mosaic, self.error]


def outputs(image: Image, out_dir: str | os.PathLike) -> Outputs:
    out = Path(out_dir)
    data = out / image.folder
    stem = f"{image.stem}_space-orig"
    mask = data / f"{stem}_desc-lesion_mask.nii.gz"
    return Outputs(
        mask=mask, sidecar=sidecar_of(mask),
        probseg=data / f"{stem}_label-lesion_probseg.nii.gz",
        disagreement=data / f"{stem}_label-lesion_desc-disagreement_probseg.nii.gz",
        mosaic=out / image.figures / f"{image.stem}_desc-lesion_{image.suffix or 'mosaic'}.png",
        error=out / "logs" / image.folder / f"{image.stem}_desc-lesion_error.json")


def sidecar_of(nifti: Path) -> Path:
    return nifti.with_name(nifti.name.removesuffix(".nii.gz") + ".json")


# ---- the dataset ------------------------------------------------------------------------------

def dataset_description(cohort: Cohort, settings: Settings) -> dict:
    models = ", ".join(f"{m.name} (sha256 {m.sha256})" for m in settings.models)
    generated = {"Name": PIPELINE, "Version": __version__, "CodeURL": CODE_URL,
                 "Description": f"MeshNet stroke-lesion segmentation with {models}; "
                 f"P(lesion) > {settings.threshold:g}",
                 "Models": [m.to_dict() for m in settings.models]}
    name = f"{cohort.name}: stroke lesions" if cohort.name else "Stroke lesions"
    doc = {"Name": name, "BIDSVersion": BIDS_VERSION, "DatasetType": "derivative",
           "GeneratedBy": [generated]}
    if cohort.kind == "bids":
        source = {"URL": cohort.root.as_uri()}
        if cohort.doi:
            source["DOI"] = cohort.doi
        doc["SourceDatasets"] = [source]
        doc["DatasetLinks"] = {"raw": cohort.root.as_uri()}
    return doc


def write_description(out_dir: str | os.PathLike, cohort: Cohort, settings: Settings) -> Path:
    """Write ``dataset_description.json`` unless it already says the same (several workers
    share one output folder)."""
    path = Path(out_dir) / DESCRIPTION
    doc = dataset_description(cohort, settings)
    if read_json(path) != doc:
        files.write_json(path, doc)
    return path


def read_json(path: str | os.PathLike) -> dict | None:
    """A JSON object from a file, or None when it is absent or not a readable object."""
    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


# ---- an image's sidecars ------------------------------------------------------------------------

@dataclass(frozen=True)
class Measures:
    """What the mask says, on the source grid."""

    lesion_ml: float
    voxels: int
    components: int
    disagreement_ml: float | None = None  # an ensemble's: where its members' masks differ


def mask_sidecar(image: Image, settings: Settings, measures: Measures, device: str,
                 seconds: float) -> dict:
    doc = {
        "Description": f"Stroke lesion: MeshNet's P(lesion) > {settings.threshold:g}, on the "
                       "source image's grid and affine",
        "Type": "Lesion",
        "Sources": [image.source],
        "SpatialReference": image.source,
        "Model": [m.to_dict() for m in settings.models],
        "Preprocessing": settings.preprocessing,
        "Threshold": float(settings.threshold),
        "LesionVolumeML": round(measures.lesion_ml, 4),
        "LesionVoxels": int(measures.voxels),
        "ConnectedComponents": int(measures.components),
        "Connectivity": CONNECTIVITY,
        "Device": device,
        "Seconds": round(seconds, 2),
        "Software": {"Name": PIPELINE, "Version": __version__},
    }
    if measures.disagreement_ml is not None:
        doc["DisagreementVolumeML"] = round(measures.disagreement_ml, 4)
    return doc


def probseg_sidecar(image: Image, settings: Settings, what: str) -> dict:
    return {"Description": what, "Sources": [image.source], "SpatialReference": image.source,
            "Model": [m.to_dict() for m in settings.models],
            "Preprocessing": settings.preprocessing}


def done_sidecar(image: Image, out_dir: str | os.PathLike, settings: Settings) -> dict | None:
    """The sidecar of this image's finished outputs with these settings, or None (absent,
    unreadable, other settings, or a file it needs is missing)."""
    where = outputs(image, out_dir)
    doc = read_json(where.sidecar)
    if doc is None or not settings.matches(doc) or not where.mask.is_file():
        return None
    if settings.probability and not where.probseg.is_file():
        return None
    if settings.probability and len(settings.models) > 1 and not where.disagreement.is_file():
        return None
    return doc


def made_from_another(image: Image, out_dir: str | os.PathLike) -> str | None:
    """The source that this image's output names already belong to, when it is another file
    (T2w and FLAIR of one session share the entities; so do x.nii and x.nii.gz)."""
    doc = read_json(outputs(image, out_dir).sidecar)
    sources = (doc or {}).get("Sources") or []
    theirs = str(sources[0]) if sources else ""
    if theirs and Path(theirs.split(":")[-1]).name != image.name:
        return theirs
    return None


# ---- the table ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Record:
    """One image's row of lesions.tsv."""

    image: Image
    status: str  # done, failed, missing (never segmented with these outputs)
    measures: Measures | None = None
    model: str = ""
    error: str = ""
    seconds: float | None = None
    device: str = ""
    reused: bool = False  # done by an earlier run with the same settings

    @property
    def ok(self) -> bool:
        return self.status == "done"

    def row(self, out_dir: str | os.PathLike) -> dict:
        m = self.measures
        mask = outputs(self.image, out_dir).mask
        return {
            **self.image.columns(),
            "source": self.image.key,
            "lesion_volume_ml": None if m is None else round(m.lesion_ml, 4),
            "lesion_voxels": None if m is None else m.voxels,
            "components": None if m is None else m.components,
            "disagreement_volume_ml": None if m is None or m.disagreement_ml is None
            else round(m.disagreement_ml, 4),
            "model": self.model,
            "status": self.status,
            "error": self.error,
            "mask": mask.relative_to(out_dir).as_posix() if self.ok else "",
        }


def record_from_sidecar(image: Image, doc: dict, reused: bool = False) -> Record:
    disagreement = doc.get("DisagreementVolumeML")
    measures = Measures(float(doc["LesionVolumeML"]), int(doc["LesionVoxels"]),
                        int(doc["ConnectedComponents"]),
                        None if disagreement is None else float(disagreement))
    model = " + ".join(str(m.get("Name", "")) for m in doc.get("Model", []))
    return Record(image, "done", measures, model, seconds=doc.get("Seconds"),
                  device=str(doc.get("Device", "")), reused=reused)


def existing_record(image: Image, out_dir: str | os.PathLike) -> Record:
    """What the output folder says of an image, whatever settings made it: done (its
    sidecar), failed (its error record), or missing."""
    where = outputs(image, out_dir)
    doc = read_json(where.sidecar)
    if doc is not None and where.mask.is_file():
        try:
            return record_from_sidecar(image, doc, reused=True)
        except (KeyError, TypeError, ValueError):
            pass
    error = read_json(where.error)
    if error is not None:
        return Record(image, "failed", model=str(error.get("Model", "")),
                      error=str(error.get("Error", "")))
    return Record(image, "missing")


COLUMN_DICTIONARY = {
    COLUMNS["sub"]: {"Description": "The participant (sub-<label>), as in the source dataset"},
    COLUMNS["ses"]: {"Description": "The session (ses-<label>); n/a when the dataset has none"},
    COLUMNS["acq"]: {"Description": "The acq-<label> entity of the source image, if any"},
    COLUMNS["rec"]: {"Description": "The rec-<label> entity of the source image, if any"},
    COLUMNS["run"]: {"Description": "The run-<index> entity of the source image, if any"},
    "source": {"Description": "The source image: its path relative to the dataset (or to the "
               "folder given), without the .nii or .nii.gz extension"},
    "lesion_volume_ml": {"Description": "Volume of the lesion mask: voxels x voxel volume of "
                         "the source grid", "Units": "mL"},
    "lesion_voxels": {"Description": "Voxels in the lesion mask, on the source grid"},
    "components": {"Description": f"Connected components of the lesion mask ({CONNECTIVITY}-"
                   "connectivity: face, edge or corner neighbours)"},
    "disagreement_volume_ml": {"Description": "Ensembles only: volume where the models' "
                               "thresholded masks differ (some say lesion, some do not)",
                               "Units": "mL"},
    "model": {"Description": "The model, or the models of an ensemble joined by ' + ' (names; "
              "their sha256 is in each mask's sidecar and in dataset_description.json)"},
    "status": {"Description": "How the image ended", "Levels": {
        "done": "segmented; the mask and its sidecar are in the derivatives",
        "failed": "not segmented: the image could not be used (see error)",
        "missing": "not segmented yet: run the participant level for it"}},
    "error": {"Description": "Why the image failed: the file and the problem"},
    "mask": {"Description": "The mask's path relative to this folder"},
}


def write_table(out_dir: str | os.PathLike, records: Sequence[Record]) -> tuple[Path, Path]:
    """``lesions.tsv`` (BIDS TSV: tab-separated, ``n/a`` for no value) and its data
    dictionary ``lesions.json``."""
    out = Path(out_dir)
    header = list(COLUMN_DICTIONARY)
    lines = ["\t".join(header)]
    for record in records:
        row = record.row(out)
        lines.append("\t".join(_cell(row[c]) for c in header))
    tsv = files.write_bytes(out / TABLE, ("\n".join(lines) + "\n").encode())
    return tsv, files.write_json(out / DICTIONARY, COLUMN_DICTIONARY)


def _cell(value) -> str:
    if value is None or value == "" or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return " ".join(str(value).split())  # no tab or newline inside a cell


def read_table(path: str | os.PathLike) -> list[dict]:
    """lesions.tsv as dicts of strings, ``n/a`` as None."""
    lines = Path(path).read_text().splitlines()
    header = lines[0].split("\t")
    return [{k: (None if v == "n/a" else v) for k, v in zip(header, line.split("\t"))}
            for line in lines[1:] if line]


def stale_files(where: Outputs, keep: Iterable[Path]) -> list[Path]:
    keep = set(keep)
    return [p for p in where.every() if p not in keep and p.exists()]
