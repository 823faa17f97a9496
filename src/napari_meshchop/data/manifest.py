"""The cohort on disk: one record per image/mask pair, with checksums, as ``manifest.json``.

The manifest lives at the top of the data folder; paths in it are relative to that folder,
so the folder can be moved. It also keeps every session that was left out, and why, and
the sessions still to download (``pending``) when a run was stopped.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path

from napari_meshchop import files
from napari_meshchop.errors import InputError, MeshchopError
from napari_meshchop.imaging import nifti

FORMAT = "napari-meshchop/arc-manifest"
VERSION = 1
NAME = "manifest.json"

# Why a session is not in the cohort: code -> what the summary says.
REASONS = {
    "no-lesion": "no lesion mask",
    "no-t2w": "lesion mask but no T2w image",
    "tse": "turbo spin echo T2w (the paper uses SPACE only)",
    "acquisition": "T2w acquisition not SPACE",
    "no-run": "lesion mask matches none of the session's T2w runs",
    "geometry": "lesion mask and T2w differ in shape or affine",
    "empty-mask": "lesion mask has no voxel above 0",
    "unreadable": "image or mask is not a readable NIfTI",
}


@dataclass(frozen=True)
class Pair:
    """A T2w image and the lesion mask drawn on it, as written to the data folder."""

    subject: str
    session: str
    acquisition: str  # space_2x or space_no_accel
    run: str | None  # the BIDS run of the T2w the mask was drawn on
    image: str  # relative to the data folder
    mask: str
    image_sha256: str
    mask_sha256: str
    image_bytes: int
    mask_bytes: int
    shape: tuple[int, int, int]
    voxel_mm: tuple[float, float, float]
    orientation: str  # axis codes of the voxel axes, e.g. "RAS" or "PSR"
    lesion_voxels: int  # mask voxels > 0, in the native grid
    lesion_ml: float
    matched_by: str = ""  # how the mask was matched to its T2w run

    @property
    def id(self) -> str:
        return f"{self.subject}_{self.session}"

    def to_dict(self) -> dict:
        d = asdict(self)
        d["shape"], d["voxel_mm"] = list(self.shape), list(self.voxel_mm)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> Pair:
        known = {f.name for f in fields(cls)}
        d = {k: v for k, v in d.items() if k in known}
        d["shape"] = tuple(int(s) for s in d["shape"])
        d["voxel_mm"] = tuple(float(v) for v in d["voxel_mm"])
        return cls(**d)


@dataclass(frozen=True)
class Excluded:
    subject: str
    session: str
    reason: str  # a key of REASONS
    detail: str = ""

    @property
    def id(self) -> str:
        return f"{self.subject}_{self.session}"

    def describe(self) -> str:
        text = f"{self.subject} {self.session}: {REASONS.get(self.reason, self.reason)}"
        return f"{text} ({self.detail})" if self.detail else text


@dataclass
class Manifest:
    repo: str
    revision: str | None = None
    pairs: list[Pair] = field(default_factory=list)
    excluded: list[Excluded] = field(default_factory=list)
    pending: list[str] = field(default_factory=list)  # ids selected but not on disk yet
    updated: str = ""

    @property
    def complete(self) -> bool:
        return not self.pending

    def pair(self, pair_id: str) -> Pair:
        for p in self.pairs:
            if p.id == pair_id:
                return p
        raise KeyError(pair_id)

    def by_acquisition(self) -> dict[str, int]:
        return dict(sorted(Counter(p.acquisition for p in self.pairs).items()))

    def excluded_by_reason(self) -> dict[str, int]:
        return dict(Counter(e.reason for e in self.excluded).most_common())

    def to_dict(self) -> dict:
        return {"format": FORMAT, "version": VERSION, "repo": self.repo,
                "revision": self.revision, "updated": self.updated,
                "counts": {"pairs": len(self.pairs), "by_acquisition": self.by_acquisition(),
                           "pending": len(self.pending),
                           "excluded": self.excluded_by_reason()},
                "pairs": [p.to_dict() for p in sorted(self.pairs, key=lambda p: p.id)],
                "pending": sorted(self.pending),
                "excluded": [asdict(e) for e in sorted(self.excluded, key=lambda e: e.id)]}

    @classmethod
    def from_dict(cls, d: dict) -> Manifest:
        return cls(repo=d["repo"], revision=d.get("revision"), updated=d.get("updated", ""),
                   pairs=[Pair.from_dict(p) for p in d["pairs"]],
                   excluded=[Excluded(**e) for e in d.get("excluded", [])],
                   pending=list(d.get("pending", [])))

    def save(self, folder: str | os.PathLike) -> Path:
        self.updated = datetime.now(timezone.utc).isoformat(timespec="seconds")
        return files.write_json(Path(folder) / NAME, self.to_dict())


def path(folder: str | os.PathLike) -> Path:
    return Path(folder) / NAME


def load(folder: str | os.PathLike) -> Manifest:
    """The manifest of a data folder (or the manifest file itself)."""
    where, raw = files.read_json(folder, NAME, FORMAT, "ARC manifest",
                                 "no manifest here; run `meshchop download` first")
    if raw.get("version", 0) > VERSION:
        raise InputError(where, f"manifest version {raw['version']} is newer than this "
                         f"napari-meshchop understands ({VERSION}); upgrade it")
    return Manifest.from_dict(raw)


def load_complete(folder: str | os.PathLike) -> Manifest:
    """Like :func:`load`, but refuse a manifest whose download was stopped part-way."""
    m = load(folder)
    if not m.complete:
        raise MeshchopError(f"{path(folder)}: the download stopped with {len(m.pending)} of "
                            f"{len(m.pending) + len(m.pairs)} pairs missing; run "
                            "`meshchop download` again to finish it")
    return m


def verify(pair: Pair, folder: str | os.PathLike) -> str | None:
    """None when both files are there with the manifest's checksums and names that say
    what their bytes are (gzipped or not; an older download kept them as received), else
    what is wrong."""
    folder = Path(folder)
    for rel, size, digest in ((pair.image, pair.image_bytes, pair.image_sha256),
                              (pair.mask, pair.mask_bytes, pair.mask_sha256)):
        target = folder / rel
        if not target.is_file():
            return f"{rel} is missing"
        if target.stat().st_size != size:
            return f"{rel} has {target.stat().st_size} bytes, expected {size}"
        problem = nifti.naming_problem(target)
        if problem is not None:
            return f"{rel} {problem}"
        if files.sha256_file(target) != digest:
            return f"{rel} does not match its sha256"
    return None
