"""Shared fixtures: the real data beside the project, small synthetic volumes, tiny models."""

from __future__ import annotations

import importlib
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
SAMPLE_SCAN = SHARED_DATA / "sub-M2265_T2w.nii.gz"
ARC_CHECKPOINT = SHARED_DATA / "arc-meshchop_meshnet26_fold0_restart0.pt"

# No test may touch the network: registry files come from the local copy, and the
# Hugging Face libraries stay offline (the ARC tests use a local replica).
os.environ.setdefault("MESHCHOP_MIRROR", str(SHARED_DATA))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


# CI must run every test: what a local run may skip for want of it, CI fails on.
CI = os.environ.get("CI", "").lower() in {"true", "1"}


def require(available: bool, what: str) -> None:
    """Skip the test when ``what`` is missing here; under CI=true, fail it instead."""
    if available:
        return
    if CI:
        pytest.fail(f"{what} is missing, and CI=true runs every test", pytrace=False)
    pytest.skip(f"{what} is missing")


def require_module(name: str, what: str):
    """The module ``name``, imported; when it is not installed, :func:`require` decides."""
    try:
        return importlib.import_module(name)
    except ImportError:
        require(False, f"{what} ({name}, in the test extra)")


def missing_tool(message: str) -> None:
    """A test's outside tool (a runtime, a server) is absent: skip here, fail under CI,
    whose set-up (the README's test command) installs it."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI must run this test: {message}")
    pytest.skip(message)


@pytest.fixture
def isolated_settings(tmp_path):
    """Widgets' QSettings (last model, device, folders) in tmp_path, not the user's."""
    from qtpy.QtCore import QSettings

    QSettings.setPath(QSettings.Format.NativeFormat, QSettings.Scope.UserScope, str(tmp_path))


@pytest.fixture(autouse=True)
def _napari_settings(tmp_path, monkeypatch):
    """napari's settings (the plugin adds reader preferences) in tmp_path, not the user's."""
    try:
        from napari import settings
    except ImportError:
        return
    monkeypatch.setattr(settings, "_SETTINGS",
                        settings.NapariSettings(config_path=tmp_path / "napari.yaml"))


@pytest.fixture(scope="session")
def real_data() -> Path:
    """The real scan and checkpoint in ../shared/data (see its README)."""
    require(SAMPLE_SCAN.is_file() and ARC_CHECKPOINT.is_file(),
            f"the real data ({SAMPLE_SCAN.name}, {ARC_CHECKPOINT.name}) in {SHARED_DATA}")
    return SHARED_DATA


@dataclass(frozen=True)
class RealSegmentation:
    mask: Path  # the mask file, on the scan's grid
    lesion_ml: float
    voxels: int
    memo: Path  # its recorded network pass (tests/network_memo.py)


@pytest.fixture(scope="session")
def segmentation_memo(tmp_path_factory) -> Path:
    """Where :func:`real_segmentation` records its network pass, known (and marked as to
    come) before it runs, so that a subprocess started first can wait for it."""
    import network_memo

    return network_memo.announce(tmp_path_factory.mktemp("real_segmentation") / "memo")


@pytest.fixture(scope="session")
def real_segmentation(real_data, segmentation_memo) -> RealSegmentation:
    """The sample scan segmented once, by the pretrained MeshNet-26 on the CPU, through the
    core that `meshchop segment SCAN -o MASK --model meshnet26-arc-fold0 --device cpu`
    runs. Its network pass is recorded: the other tests that need a real segmentation run
    their own whole path and replay only that pass (see network_memo)."""
    import network_memo

    from napari_meshchop import events
    from napari_meshchop.network import inference

    folder = segmentation_memo.parent
    with network_memo.recording(segmentation_memo) as memo:
        result = events.run(inference.segment_file(
            SAMPLE_SCAN, folder / "lesion.nii.gz", "meshnet26-arc-fold0", "cpu"))
    assert len(list(memo.glob("*.npy"))) == 1
    return RealSegmentation(folder / "lesion.nii.gz", result.lesion_ml, result.lesion_voxels,
                            memo)


def phantom(shape=(40, 36, 30), seed=0) -> np.ndarray:
    """A head-like phantom: a bright ellipsoid with a dark 'lesion' blob and noise."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij"))
    head = ((grid**2).sum(0) < 0.8).astype(np.float32)
    lesion = (((grid - np.array([0.3, 0.1, 0.0])[:, None, None, None]) ** 2).sum(0) < 0.05)
    img = 100 * head - 60 * lesion * head + rng.normal(0, 3, shape)
    return np.clip(img, 0, None).astype(np.float32)


def oblique_affine(zooms=(1.2, 0.9, 2.5), degrees=15.0, origin=(-20.0, 10.0, 5.0)) -> np.ndarray:
    t = np.deg2rad(degrees)
    rot = np.array([[np.cos(t), -np.sin(t), 0], [np.sin(t), np.cos(t), 0], [0, 0, 1]])
    aff = np.eye(4)
    aff[:3, :3] = rot @ np.diag(zooms)
    aff[:3, 3] = origin
    return aff


def oriented_affine(codes: str, zooms=(1.0, 1.0, 1.0), degrees: float = 0.0,
                    origin=(0.0, 0.0, 0.0), about: str = "z") -> np.ndarray:
    """A voxel -> RAS affine whose axes point along ``codes``, rotated about x or z."""
    from nibabel.orientations import axcodes2ornt, inv_ornt_aff, ornt_transform

    c, s = np.cos(np.deg2rad(degrees)), np.sin(np.deg2rad(degrees))
    rot = (np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]]) if about == "z"
           else np.array([[1, 0, 0], [0, c, -s], [0, s, c]]))
    perm = inv_ornt_aff(ornt_transform(axcodes2ornt(codes), axcodes2ornt("RAS")), (1, 1, 1))
    out = np.eye(4)
    out[:3, :3] = rot @ perm[:3, :3] @ np.diag(zooms)
    out[:3, 3] = origin
    return out


@pytest.fixture
def phantom_img() -> nib.Nifti1Image:
    return nib.Nifti1Image(phantom(), oblique_affine())


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A small untrained MeshNet on a 32^3 grid: fast, deterministic, real code paths."""
    import torch

    from napari_meshchop.imaging.preprocess import PreprocessSpec
    from napari_meshchop.network import checkpoint
    from napari_meshchop.network.model import Architecture, MeshNet

    torch.manual_seed(0)
    model = MeshNet(Architecture(channels=4, dilations=(1, 2, 4, 2, 1)))
    with torch.no_grad():  # make BatchNorm non-trivial so that folding it is tested
        for block in model.blocks:
            block.bn.running_mean.uniform_(-0.2, 0.2)
            block.bn.running_var.uniform_(0.5, 2.0)
            block.bn.weight.uniform_(0.5, 1.5)
            block.bn.bias.uniform_(-0.2, 0.2)
        model.head.bias.copy_(torch.tensor([0.0, 0.05]))
    ckpt = checkpoint.from_model(model.eval(), PreprocessSpec("ras-minmax", shape=(32, 32, 32)),
                                 note="test fixture")
    return ckpt.save(tmp_path_factory.mktemp("models") / "tiny.pt")


@pytest.fixture(scope="session")
def _replica_cohort(tmp_path_factory):
    import arc_replica

    from napari_meshchop import events
    from napari_meshchop.data import arc, folds

    replica = arc_replica.build(tmp_path_factory.mktemp("replica"))
    folder = tmp_path_factory.mktemp("cohort") / "arc"
    events.run(arc.download(folder, source=replica, folds=False))
    folds.make(folder, outer=2, inner=2)  # 4 subjects: 2 x 2 folds
    return folder


@pytest.fixture(scope="module")
def data(_replica_cohort, tmp_path_factory):
    """A downloaded replica of the ARC cohort (4 pairs, 2 x 2 folds), built once per
    session and copied for each test module, which may damage its copy."""
    copy = tmp_path_factory.mktemp("arc") / "arc"
    shutil.copytree(_replica_cohort, copy)
    return copy
