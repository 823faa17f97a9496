"""Exports of the real MeshNet-26 in their real runtimes, on a 64^3 block of the real scan.

onnxruntime, TensorFlow.js in Node (@tensorflow/tfjs on its CPU backend, the library
brainchop's web app runs) and brainchop's command line (its niimath conform, its
normalisation, its MeshNet on tinygrad) must give our fused pass's P(lesion) within 1e-4.
The block surrounds the lesion, so both classes are compared. The two outside runtimes
are started together and run while onnxruntime and our pass do.
"""

import importlib.util
import json
import os
import shutil
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import ARC_CHECKPOINT, ROOT, SAMPLE_SCAN, missing_tool

from napari_meshchop import events
from napari_meshchop.imaging.preprocess import PreprocessSpec, prepare
from napari_meshchop.network import checkpoint
from napari_meshchop.network.export.bundle import export
from napari_meshchop.network.inference import FusedMeshNet

pytestmark = pytest.mark.slow

SIZE = 64
CORNER = (126, 68, 89)  # on the conformed (LIA) grid; the lesion's centre is near (158, 100, 121)
BLOCK = tuple(slice(c, c + SIZE) for c in CORNER)
TFJS = ROOT / "tests" / "js"
TOLERANCE = 1e-4


def turn(volume: np.ndarray, src: str, dst: str) -> np.ndarray:
    o = nib.orientations
    return o.apply_orientation(
        volume, o.ornt_transform(o.axcodes2ornt(tuple(src)), o.axcodes2ornt(tuple(dst)))).copy()


def ours(ckpt: checkpoint.Checkpoint, block: np.ndarray) -> np.ndarray:
    return events.run(FusedMeshNet(ckpt.build()).lesion_probability(block))


def probability(logits: np.ndarray, axis: int) -> np.ndarray:
    background, lesion = np.moveaxis(logits, axis, 0)
    return 1.0 / (1.0 + np.exp(background - lesion))


def in_lia_order(ckpt: checkpoint.Checkpoint) -> checkpoint.Checkpoint:
    """The pretrained weights turned to the conformed grid's voxel order and labelled with
    the `brainchop` preprocessing: a stand-in for a model trained with it."""
    state = {k: torch.from_numpy(turn(np.moveaxis(v.numpy(), (2, 3, 4), (0, 1, 2)), "RAS", "LIA")
                                 ).movedim((0, 1, 2), (2, 3, 4)).contiguous()
             if v.dim() == 5 else v for k, v in ckpt.state_dict.items()}
    return checkpoint.Checkpoint(ckpt.arch, PreprocessSpec("brainchop"), state,
                                 {"source": "test: pretrained weights in LIA order"})


def report(runtime: str, theirs: np.ndarray, want: np.ndarray) -> None:
    diff = float(np.abs(theirs - want).max())
    lesion = int((want > 0.5).sum())
    print(f"{runtime}: max |P - ours| {diff:.2e} over {want.size} voxels, {lesion} lesion "
          f"voxels (ours), {int(((theirs > 0.5) != (want > 0.5)).sum())} masks differ")
    assert lesion > 10_000 and want.size - lesion > 10_000  # both classes are compared
    assert diff < TOLERANCE


def brainchop_ready() -> str | None:
    if importlib.util.find_spec("brainchop") is None:
        return "brainchop is not installed (the test extra installs it)"
    if shutil.which("clang") is None:
        return "clang not found: tinygrad's CPU backend compiles with it (apt-get install clang)"
    if shutil.which("niimath", path=_path()) is None:
        return "niimath not found (the test extra installs it)"
    return None


def tfjs_ready() -> str | None:
    if shutil.which("node") is None:
        return "node not found (apt-get install nodejs npm)"
    if not (TFJS / "node_modules" / "@tensorflow" / "tfjs").is_dir():
        return "TensorFlow.js is not installed: npm ci --prefix tests/js"
    return None


def _path() -> str:
    return os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])


@pytest.fixture(scope="module")
def runs(real_data, tmp_path_factory):
    """Exports, inputs, and the two outside runtimes started side by side."""
    tmp = tmp_path_factory.mktemp("runtimes")
    pretrained = checkpoint.load(ARC_CHECKPOINT)
    img = nib.load(SAMPLE_SCAN)
    found = {"tmp": tmp, "pretrained": pretrained, "img": img, "procs": {}}

    # The web app feeds the conformed uint8 volume min-max scaled: here that is /255.
    tfjs_block = prepare(img, PreprocessSpec("conform")).volume[BLOCK].copy()
    found["tfjs_block"] = tfjs_block
    if tfjs_ready() is None:
        export(ARC_CHECKPOINT, "tfjs", tmp / "tfjs")
        tfjs_block.astype("<f4").tofile(tmp / "block.f32")
        found["procs"]["tfjs"] = subprocess.Popen(
            ["node", str(TFJS / "run_layers_model.mjs"), str(tmp / "tfjs" / "model.json"),
             str(tmp / "block.f32"), *[str(SIZE)] * 3, str(tmp / "tfjs.f32")],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    found["lia"] = in_lia_order(pretrained)
    if brainchop_ready() is None:
        found["brainchop_export"] = export(found["lia"], "brainchop", tmp / "brainchop")
        home = tmp / "home"
        (home / ".cache" / "brainchop").mkdir(parents=True)
        (home / ".cache" / "brainchop" / "models.json").write_text("{}")  # no network
        env = {**os.environ, "HOME": str(home), "PATH": _path(), "DEV": "CPU"}
        found["procs"]["brainchop"] = subprocess.Popen(
            [sys.executable, str(ROOT / "tests" / "brainchop_block.py"), str(SAMPLE_SCAN),
             str(tmp / "brainchop"), str(tmp / "brainchop.npy"), *map(str, CORNER), str(SIZE)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    yield found
    for proc in found["procs"].values():
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def finished(runs, name: str) -> str:
    proc = runs["procs"][name]
    out, err = proc.communicate(timeout=900)
    assert proc.returncode == 0, out[-2000:] + err[-3000:]
    return out


def test_onnxruntime_gives_our_lesion_probability(runs):
    try:
        import onnxruntime
    except ImportError:
        missing_tool("onnxruntime is not installed (the test extra installs it)")
    export(ARC_CHECKPOINT, "onnx", runs["tmp"] / "onnx")
    # The pretrained model's own grid (ras-minmax, RAS order), around the lesion.
    grid = prepare(runs["img"], runs["pretrained"].preprocess).volume
    block = turn(turn(grid, "RAS", "LIA")[BLOCK], "LIA", "RAS")
    session = onnxruntime.InferenceSession(str(runs["tmp"] / "onnx" / "model.onnx"),
                                           providers=["CPUExecutionProvider"])
    (theirs,) = session.run(["lesion_probability"], {"volume": block[None, None]})
    want = ours(runs["pretrained"], block)
    report("onnxruntime", theirs[0, 0], want)


def test_tensorflow_js_gives_our_lesion_probability(runs):
    if "tfjs" not in runs["procs"]:
        missing_tool(tfjs_ready())
    node = json.loads(finished(runs, "tfjs").strip().splitlines()[-1])
    assert node["backend"] == "cpu" and node["inputShape"] == [None, 256, 256, 256, 1]
    assert node["outputShape"] == [1, SIZE, SIZE, SIZE, 2]
    logits = np.fromfile(runs["tmp"] / "tfjs.f32", "<f4").reshape(SIZE, SIZE, SIZE, 2)
    theirs = probability(logits, axis=-1)
    # Ours on the pretrained model's own voxel order (RAS), brought back to LIA.
    want = turn(ours(runs["pretrained"], turn(runs["tfjs_block"], "LIA", "RAS")), "RAS", "LIA")
    report("TensorFlow.js", theirs, want)


def test_brainchop_command_line_gives_our_lesion_probability(runs):
    if "brainchop" not in runs["procs"]:
        missing_tool(brainchop_ready())
    assert runs["brainchop_export"].warnings == []  # a `brainchop` model: its very input
    finished(runs, "brainchop")
    theirs = probability(np.load(runs["tmp"] / "brainchop.npy"), axis=0)
    # Ours: our own `brainchop` preprocessing of the scan, our fused pass.
    block = prepare(runs["img"], PreprocessSpec("brainchop")).volume[BLOCK].copy()
    want = ours(runs["lia"], block)
    report("brainchop", theirs, want)
