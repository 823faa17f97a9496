"""Synthetic scans with two kinds of blob, for the fine-tuning tests: bright blobs (kind A)
that a first model learns as lesion, and dimmer ones (kind B) that "corrections" add."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import torch


def scan(shape=(20, 20, 20), seed=0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A noisy head with one bright blob (kind A) and two dimmer ones (kind B); returns the
    image and the masks of A and of B."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij"))
    head = (grid**2).sum(0) < 0.85
    blobs = []
    while len(blobs) < 3:  # inside the head, apart
        centre = rng.uniform(-0.45, 0.45, 3)
        if all(np.linalg.norm(centre - c) > 0.65 for c, _ in blobs):
            blobs.append((centre, rng.uniform(0.28, 0.36)))
    a, *bs = (((((grid - c[:, None, None, None]) ** 2).sum(0) < r**2) & head) for c, r in blobs)
    b = np.logical_or.reduce(bs)
    image = 0.5 * head + 0.4 * a + 0.2 * b + rng.normal(0, 0.03, shape)
    return np.clip(image, 0, None).astype(np.float32), a, b


class Scans(torch.utils.data.Dataset):
    """In-memory scans whose lesion is kind A only (what the first model learns)."""

    def __init__(self, n: int, seed: int = 0, shape=(20, 20, 20)):
        self.items = []
        for i in range(n):
            image, a, _ = scan(shape, seed * 1000 + i)
            self.items.append((torch.from_numpy(image[None]), torch.from_numpy(a.astype(np.uint8))))

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def scan_file(folder, name: str, seed: int, shape=(20, 20, 20)):
    """A scan on a 1 mm RAS grid and its corrected mask (A and B), as NIfTI files."""
    image, a, b = scan(shape, seed)
    affine = np.diag([1.0, 1.0, 1.0, 1.0])
    affine[:3, 3] = -np.array(shape) / 2
    scan_path, mask_path = folder / f"{name}.nii.gz", folder / f"{name}_mask.nii.gz"
    nib.save(nib.Nifti1Image(image, affine), scan_path)
    nib.save(nib.Nifti1Image((a | b).astype(np.uint8), affine), mask_path)
    return scan_path, mask_path
