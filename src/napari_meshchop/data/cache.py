"""Each image/mask pair preprocessed once, stored compactly, served to PyTorch.

A cached pair is one ``.npz`` file: the network-grid image, the mask as packed bits and
the grid's affine. The image is stored so that training and evaluation feed the network
exactly the numbers that segmentation (:func:`preprocess.prepare`) feeds it: for
``conform`` as uint8 (``round(255 v)``, which is FreeSurfer's 0..255 volume itself, and
``v / 255`` again bit for bit), about 19 MB for a 256^3 pair instead of 134 MB as float32 +
int64; for ``ras-minmax`` and ``brainchop``, whose values are any floats in [0, 1], as the float32
volume itself (67 MB at 256^3). Its name carries a key made of the source files' sha256 and the
:class:`PreprocessSpec`, so a changed file or recipe never serves a stale volume. Files are
written atomically, so DataLoader workers may fill the cache side by side.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import zipfile
from collections.abc import Generator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from napari_meshchop import files
from napari_meshchop.data import manifest as _manifest
from napari_meshchop.data.folds import fold_ids
from napari_meshchop.data.manifest import Pair
from napari_meshchop.errors import MeshchopError
from napari_meshchop.events import Progress, StopFlag, check_stop
from napari_meshchop.imaging.nifti import load_mask, load_volume
from napari_meshchop.imaging.preprocess import PreprocessSpec, prepare, prepare_mask

log = logging.getLogger(__name__)
CACHE_VERSION = 2  # 2: ras-minmax stored as float32 (it was quantised to uint8)
FOLDER = "cache"


def cache_key(pair: Pair, spec: PreprocessSpec) -> str:
    """Changes whenever the image, the mask or the preprocessing changes."""
    recipe = {"version": CACHE_VERSION, "image": pair.image_sha256, "mask": pair.mask_sha256,
              "spec": spec.to_dict()}
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:20]


def image_dtype(spec: PreprocessSpec) -> type[np.generic]:
    """How a spec's network-grid image is stored: uint8 for ``conform`` (0..255 by
    definition), float32 (what :func:`preprocess.prepare` returns) otherwise."""
    return np.uint8 if spec.name == "conform" else np.float32


@dataclass
class PreparedPair:
    """A pair on the network grid, compact: the image (uint8 0..255 for ``conform``,
    float32 in [0, 1] otherwise, see :func:`image_dtype`) and a uint8 mask {0, 1}."""

    image: np.ndarray
    mask: np.ndarray
    affine: np.ndarray

    def image_float(self) -> np.ndarray:
        """The network input in [0, 1], exactly as :func:`preprocess.prepare` makes it."""
        if self.image.dtype == np.uint8:
            return np.divide(self.image, np.float32(255), dtype=np.float32)
        return self.image


def prepare_pair(pair: Pair, data_dir: str | os.PathLike, spec: PreprocessSpec) -> PreparedPair:
    """Preprocess a pair from its NIfTI files (the slow path the cache saves)."""
    data_dir = Path(data_dir)
    img = load_volume(data_dir / pair.image)
    prepared = prepare(img, spec)
    if image_dtype(spec) == np.uint8:
        image = np.rint(prepared.volume * np.float32(255)).astype(np.uint8)
    else:
        image = prepared.volume
    mask = prepare_mask(load_mask(data_dir / pair.mask), img, spec)
    return PreparedPair(image, mask.astype(np.uint8, copy=False), prepared.affine)


class PairCache:
    def __init__(self, data_dir: str | os.PathLike, spec: PreprocessSpec | None = None,
                 folder: str | os.PathLike | None = None):
        self.data_dir = Path(data_dir)
        self.spec = spec or PreprocessSpec()
        self.folder = Path(folder) if folder is not None else self.data_dir / FOLDER

    def path(self, pair: Pair) -> Path:
        return self.folder / f"{pair.id}.{cache_key(pair, self.spec)}.npz"

    def load(self, pair: Pair) -> PreparedPair | None:
        """The cached pair, or None when it is not cached (or its file is damaged)."""
        where = self.path(pair)
        try:
            with np.load(where) as z:
                shape = tuple(int(s) for s in z["shape"])
                image = z["image"]
                mask = np.unpackbits(z["mask_bits"], count=int(np.prod(shape)))
                affine = z["affine"]
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, zipfile.BadZipFile) as exc:
            log.warning("cached pair %s is damaged (%s); preprocessing it again", where, exc)
            return None
        if (shape != self.spec.shape or image.shape != shape
                or image.dtype != image_dtype(self.spec)):
            return None
        return PreparedPair(image, mask.reshape(shape), affine)

    def store(self, pair: Pair, conformed: PreparedPair) -> Path:
        where = self.path(pair)
        with files.atomic_file(where) as fh:
            np.savez(fh, image=np.ascontiguousarray(conformed.image,
                                                    dtype=image_dtype(self.spec)),
                     mask_bits=np.packbits(conformed.mask.astype(bool, copy=False).ravel()),
                     shape=np.array(conformed.image.shape), affine=conformed.affine)
        return where

    def get(self, pair: Pair) -> PreparedPair:
        """Load the pair from the cache, preprocessing and storing it first if needed."""
        cached = self.load(pair)
        if cached is None:
            cached = prepare_pair(pair, self.data_dir, self.spec)
            self.store(pair, cached)
        return cached

    def fill(self, pairs: Sequence[Pair], stop: StopFlag = None
             ) -> Generator[Progress, None, int]:
        """Preprocess every pair not cached yet; return how many were preprocessed."""
        built = 0
        for i, pair in enumerate(pairs):
            check_stop(stop)
            if not self.path(pair).is_file():
                self.store(pair, prepare_pair(pair, self.data_dir, self.spec))
                built += 1
            yield Progress("preprocess", i + 1, len(pairs), pair.id)
        return built


class ArcDataset(torch.utils.data.Dataset):
    """Pairs of a data folder as ``(image, mask)`` tensors on the network grid.

    ``image`` is float32 of shape ``(1, *spec.shape)`` in [0, 1]; ``mask`` has shape
    ``spec.shape``, values {0, 1} and ``target_dtype``: uint8 by default, 8 times less to
    hold in workers and copy to the device than int64 (call ``.long()`` there for
    ``CrossEntropyLoss``, or pass ``target_dtype=torch.long``). The first access to a pair
    preprocesses it into the cache; later ones load it.
    """

    def __init__(self, data_dir: str | os.PathLike, ids: Sequence[str] | None = None,
                 spec: PreprocessSpec | None = None, cache_dir: str | os.PathLike | None = None,
                 target_dtype: torch.dtype = torch.uint8):
        manifest = _manifest.load(data_dir)
        known = {p.id: p for p in manifest.pairs}
        if ids is None:
            ids = sorted(known)
        unknown = [i for i in ids if i not in known]
        if unknown:
            raise MeshchopError(f"{len(unknown)} ids are not in {_manifest.path(data_dir)}: "
                                f"{', '.join(unknown[:3])}" + (" ..." if len(unknown) > 3 else ""))
        self.pairs = [known[i] for i in ids]
        self.cache = PairCache(data_dir, spec, cache_dir)
        self.target_dtype = target_dtype

    @classmethod
    def fold(cls, data_dir: str | os.PathLike, outer: int, part: str, inner: int | None = None,
             **kwargs) -> ArcDataset:
        """One part of the saved folds: ``part`` is ``train`` or ``test`` of outer fold
        ``outer``, or ``train`` or ``val`` of its inner fold ``inner``."""
        return cls(data_dir, fold_ids(data_dir, outer, part, inner), **kwargs)

    @property
    def ids(self) -> list[str]:
        return [p.id for p in self.pairs]

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        pair = self.cache.get(self.pairs[index])
        image = torch.from_numpy(pair.image_float()[None])
        mask = torch.from_numpy(pair.mask)
        return image, mask if mask.dtype == self.target_dtype else mask.to(self.target_dtype)
