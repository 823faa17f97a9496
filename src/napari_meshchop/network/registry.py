"""Pretrained models and sample data by name: downloaded once, verified by sha256.

Files come from their public addresses into a user cache (``MESHCHOP_CACHE``, or the
platform's cache folder). Set ``MESHCHOP_MIRROR`` to a local folder holding the same
files (tests and CI use ``../shared/data``) and nothing is downloaded: the folder's
copies are verified and used in place.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pooch

from napari_meshchop.errors import InputError, MeshchopError

MIRROR_ENV = "MESHCHOP_MIRROR"
CACHE_ENV = "MESHCHOP_CACHE"


@dataclass(frozen=True)
class Entry:
    name: str
    kind: str  # "model" or "sample"
    filename: str
    url: str
    sha256: str
    size: int
    description: str
    license: str


ENTRIES = (
    Entry(
        name="meshnet26-arc-fold0",
        kind="model",
        filename="arc-meshchop_meshnet26_fold0_restart0.pt",
        url="https://github.com/The-Obstacle-Is-The-Way/arc-meshchop/raw/main/"
        "experiments/fold_0_restart_0/final.pt",
        sha256="f66bcc77f3e91424fa43e70f11dd2d543cf000edd616233c5d71cc314e7d89b2",
        size=1_819_495,
        description="MeshNet-26 trained on ARC by arc-meshchop (outer fold 0, restart 0, "
        "50 epochs); lesion Dice 0.667 on its 75 test subjects",
        license="Apache-2.0",
    ),
    Entry(
        name="sub-M2265_T2w",
        kind="sample",
        filename="sub-M2265_T2w.nii.gz",
        url="https://github.com/spikedoanz/niivue-tinygrad/raw/main/public/M2265_T2w.nii.gz",
        sha256="049ae488305a4403d488c34e8f0e9a0333daa28ef0d3733161be28d0bd611b4f",
        size=2_352_852,
        description="ARC stroke T2w (sub-M2265): chronic stroke, conformed 256^3 1 mm LIA",
        license="CC0 (OpenNeuro ds004884)",
    ),
)
REGISTRY = {e.name: e for e in ENTRIES}
DEFAULT_MODEL = "meshnet26-arc-fold0"
SAMPLE_SCAN = "sub-M2265_T2w"


def names(kind: str | None = None) -> list[str]:
    return [e.name for e in ENTRIES if kind is None or e.kind == kind]


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or pooch.os_cache("napari-meshchop"))


def fetch(name: str, mirror: str | os.PathLike | None = None, progress: bool = False) -> Path:
    """Local path of a registry file, verified; downloads only when no mirror is set."""
    if name not in REGISTRY:
        raise MeshchopError(f"unknown model or sample {name!r}; known: {', '.join(REGISTRY)}")
    entry = REGISTRY[name]
    mirror = mirror or os.environ.get(MIRROR_ENV)
    if mirror:
        path = Path(mirror) / entry.filename
        if not path.is_file():
            raise InputError(path, f"{name} is not in the mirror folder set by {MIRROR_ENV}")
        digest = pooch.file_hash(str(path), alg="sha256")
        if digest != entry.sha256:
            raise InputError(path, f"sha256 {digest} does not match the registry's {entry.sha256}")
        return path
    try:
        return Path(pooch.retrieve(entry.url, known_hash=f"sha256:{entry.sha256}",
                                   fname=entry.filename, path=cache_dir(),
                                   progressbar=progress))
    except ValueError as exc:  # pooch's hash mismatch
        raise MeshchopError(f"download of {name} failed verification: {exc}") from None
    except Exception as exc:  # network errors come in many types
        raise MeshchopError(f"could not download {name} from {entry.url} ({exc}); "
                            f"set {MIRROR_ENV} to a folder that holds {entry.filename}") from None
