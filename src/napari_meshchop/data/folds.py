"""Nested cross-validation folds as in the paper: 3 outer folds, 3 inner folds in each.

Samples are stratified by lesion-size bin and T2w acquisition. The bins are the paper's,
in voxels: (203, 33619], (33619, 67891], (67891, 128314], (128314, 363885]; sizes outside
go to the end bins. Splitting is by subject, so a subject's sessions never straddle a
split, with scikit-learn's ``StratifiedKFold`` (shuffled, seed 42 by default). A stratum
with fewer subjects than folds cannot be spread over the folds; it is merged into its
nearest neighbour (the next size bin of the same acquisition, else the same bin of the
other acquisition) and the merge is reported.

The folds are saved as ``folds.json`` next to the manifest.
"""

from __future__ import annotations

import hashlib
import os
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from napari_meshchop import files
from napari_meshchop.data import manifest as _manifest
from napari_meshchop.data.manifest import Manifest
from napari_meshchop.errors import InputError, MeshchopError

BIN_EDGES = (203, 33619, 67891, 128314, 363885)
OUTER_FOLDS = 3
INNER_FOLDS = 3
SEED = 42
FORMAT = "napari-meshchop/arc-folds"
VERSION = 1
NAME = "folds.json"


PARTS = {False: ("test", "train"), True: ("val", "train")}  # outer fold, inner fold


def size_bin(voxels: int) -> int:
    """0..3: the paper's lesion-size bin; sizes outside the edges go to the end bins."""
    return int(np.digitize(voxels, BIN_EDGES[1:-1], right=True))


def bin_label(index: int) -> str:
    return f"({BIN_EDGES[index]}, {BIN_EDGES[index + 1]}]"


@dataclass(frozen=True)
class Sample:
    id: str  # the pair's id, subject_session
    subject: str
    acquisition: str
    lesion_voxels: int

    @property
    def stratum(self) -> tuple[str, int]:
        return self.acquisition, size_bin(self.lesion_voxels)


@dataclass(frozen=True)
class Merge:
    """A stratum too small for the folds, and the one it was merged into."""

    level: str  # "outer", or "outer fold k, inner"
    stratum: str
    into: str
    subjects: int

    def describe(self) -> str:
        plural = "s" if self.subjects != 1 else ""
        return (f"{self.level}: stratum {self.stratum} ({self.subjects} subject{plural}) "
                f"merged into {self.into}")


@dataclass
class InnerFold:
    train: list[str]
    val: list[str]


@dataclass
class OuterFold:
    train: list[str]
    test: list[str]
    inner: list[InnerFold]


@dataclass
class Folds:
    seed: int
    outer: list[OuterFold]
    merges: list[Merge] = field(default_factory=list)
    cohort_sha256: str = ""  # of the samples the folds were made from
    strata: dict[str, int] = field(default_factory=dict)  # subjects per stratum

    @property
    def outer_folds(self) -> int:
        return len(self.outer)

    @property
    def inner_folds(self) -> int:
        return len(self.outer[0].inner) if self.outer else 0

    def to_dict(self) -> dict:
        return {"format": FORMAT, "version": VERSION, "seed": self.seed,
                "outer_folds": self.outer_folds, "inner_folds": self.inner_folds,
                "stratified_by": ["acquisition", "lesion-size bin (voxels)"],
                "bin_edges": list(BIN_EDGES), "split_by": "subject",
                "cohort_sha256": self.cohort_sha256, "strata": self.strata,
                "merges": [asdict(m) for m in self.merges],
                "outer": [asdict(f) for f in self.outer]}

    @classmethod
    def from_dict(cls, d: dict) -> Folds:
        outer = [OuterFold(f["train"], f["test"], [InnerFold(**i) for i in f["inner"]])
                 for f in d["outer"]]
        return cls(seed=d["seed"], outer=outer, merges=[Merge(**m) for m in d["merges"]],
                   cohort_sha256=d.get("cohort_sha256", ""), strata=d.get("strata", {}))

    def outer_fold(self, k: int) -> OuterFold:
        if not 0 <= k < self.outer_folds:
            raise MeshchopError(f"outer fold {k} does not exist (0..{self.outer_folds - 1})")
        return self.outer[k]

    def ids(self, outer: int, part: str = "test", inner: int | None = None) -> list[str]:
        """The ids of one part: an outer fold's ``test`` or ``train``, or an inner fold's
        ``train`` or ``val``."""
        fold = self.outer_fold(outer)
        if inner is not None:
            if not 0 <= inner < self.inner_folds:
                raise MeshchopError(f"inner fold {inner} does not exist "
                                    f"(0..{self.inner_folds - 1})")
            fold = fold.inner[inner]
        if part not in PARTS[inner is not None]:
            raise MeshchopError(f"no part {part!r} in that fold (an outer fold has train and "
                                "test, an inner fold train and val)")
        return list(getattr(fold, part))

    def save(self, folder: str | os.PathLike) -> Path:
        return files.write_json(Path(folder) / NAME, self.to_dict())

    def summary(self) -> list[str]:
        lines = [f"{self.outer_folds} outer x {self.inner_folds} inner folds, seed {self.seed}, "
                 f"stratified by acquisition and lesion size over {sum(self.strata.values())} "
                 "subjects"]
        for k, fold in enumerate(self.outer):
            lines.append(f"  outer fold {k}: {len(fold.test)} test, {len(fold.train)} train "
                         f"(inner: {', '.join(f'{len(i.train)}/{len(i.val)}' for i in fold.inner)}"
                         " train/val)")
        lines += [f"  {m.describe()}" for m in self.merges]
        return lines


def samples_of(manifest: Manifest) -> list[Sample]:
    return [Sample(p.id, p.subject, p.acquisition, p.lesion_voxels) for p in manifest.pairs]


def cohort_sha256(samples: list[Sample]) -> str:
    text = "\n".join(f"{s.id} {s.subject} {s.acquisition} {s.lesion_voxels}"
                     for s in sorted(samples, key=lambda s: s.id))
    return hashlib.sha256(text.encode()).hexdigest()


def _label(group: frozenset) -> str:
    keys = sorted(group, key=lambda k: (k[1], k[0]))
    return " + ".join(f"{acq} {bin_label(b)}" for acq, b in keys)


def merge_small(strata: list[tuple[str, int]], n_splits: int,
                level: str) -> tuple[list[str], list[Merge]]:
    """One label per sample, with every stratum of fewer than ``n_splits`` merged away."""
    groups = {frozenset([s]): n for s, n in Counter(strata).items()}
    merges: list[Merge] = []
    if sum(groups.values()) < n_splits:
        raise MeshchopError(f"{sum(groups.values())} subjects cannot be split into "
                            f"{n_splits} folds")

    def distance(a: frozenset, b: frozenset) -> int:
        return min(abs(x[1] - y[1]) + (0 if x[0] == y[0] else 10) for x in a for y in b)

    while len(groups) > 1:
        small = sorted((g for g, n in groups.items() if n < n_splits),
                       key=lambda g: (groups[g], _label(g)))
        if not small:
            break
        g = small[0]
        others = [h for h in groups if h != g]
        h = min(others, key=lambda h: (distance(g, h), groups[h], _label(h)))
        merges.append(Merge(level, _label(g), _label(h), groups[g]))
        groups[g | h] = groups.pop(g) + groups.pop(h)
    owner = {s: _label(g) for g in groups for s in g}
    return [owner[s] for s in strata], merges


def _split(subjects: list[str], strata: list[tuple[str, int]], n_splits: int, seed: int,
           level: str) -> tuple[list[tuple[np.ndarray, np.ndarray]], list[Merge]]:
    from sklearn.model_selection import StratifiedKFold

    labels, merges = merge_small(strata, n_splits, level)
    kfold = StratifiedKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    return list(kfold.split(np.zeros(len(subjects)), labels)), merges


def nested_folds(samples: list[Sample], outer: int = OUTER_FOLDS, inner: int = INNER_FOLDS,
                 seed: int = SEED) -> Folds:
    """The paper's nested cross-validation over ``samples``, deterministic for ``seed``."""
    if not samples:
        raise MeshchopError("no samples to split into folds")
    if min(outer, inner) < 2:
        raise MeshchopError(f"need at least 2 outer and 2 inner folds, not {outer} and {inner}")
    by_subject: dict[str, list[Sample]] = {}
    for s in sorted(samples, key=lambda s: s.id):
        by_subject.setdefault(s.subject, []).append(s)
    subjects = sorted(by_subject)
    # A subject with several sessions is placed by its first one; all go together.
    strata = [by_subject[s][0].stratum for s in subjects]

    def ids(subject_index) -> list[str]:
        return sorted(s.id for i in subject_index for s in by_subject[subjects[i]])

    splits, merges = _split(subjects, strata, outer, seed, "outer")
    folds = []
    for k, (train, test) in enumerate(splits):
        inner_splits, inner_merges = _split([subjects[i] for i in train],
                                            [strata[i] for i in train], inner, seed,
                                            f"outer fold {k}, inner")
        merges += inner_merges
        folds.append(OuterFold(
            train=ids(train), test=ids(test),
            inner=[InnerFold(train=ids(train[tr]), val=ids(train[va])) for tr, va in inner_splits]))
    counts = Counter(f"{acq} {bin_label(b)}" for acq, b in strata)
    return Folds(seed=seed, outer=folds, merges=merges, cohort_sha256=cohort_sha256(samples),
                 strata=dict(sorted(counts.items())))


def load(folder: str | os.PathLike) -> Folds:
    _, raw = files.read_json(folder, NAME, FORMAT, "folds file",
                             "no folds here; run `meshchop folds` first")
    return Folds.from_dict(raw)


def fold_ids(folder: str | os.PathLike, outer: int, part: str = "test",
             inner: int | None = None) -> list[str]:
    """The ids of one part of the folds saved in ``folder`` (see :meth:`Folds.ids`)."""
    return load(folder).ids(outer, part, inner)


def make(folder: str | os.PathLike, outer: int = OUTER_FOLDS, inner: int = INNER_FOLDS,
         seed: int = SEED) -> Folds:
    """Compute the folds of a data folder's (complete) cohort and save them beside it."""
    folds = nested_folds(samples_of(_manifest.load_complete(folder)), outer, inner, seed)
    folds.save(folder)
    return folds


def ensure(folder: str | os.PathLike, manifest: Manifest) -> Path:
    """Write the default folds unless folds of this very cohort are already there."""
    where = Path(folder) / NAME
    if where.is_file():
        try:
            if load(folder).cohort_sha256 == cohort_sha256(samples_of(manifest)):
                return where
        except InputError:
            pass
    nested_folds(samples_of(manifest)).save(folder)
    return where


def sizes_for(subjects: int) -> tuple[int, int] | None:
    """The most folds, up to the paper's 3 outer x 3 inner, that ``subjects`` subjects
    allow (a small local cohort), or None when there are too few (under 3) to split."""
    outer = min(OUTER_FOLDS, subjects)
    if outer < 2:
        return None
    inner = min(INNER_FOLDS, subjects - -(-subjects // outer))  # the smallest training part
    return (outer, inner) if inner >= 2 else None
