"""meshchop export: ONNX, brainchop's web app (TF.js) and command line, on a tiny model.

Each target's files are read back the way its runtime reads them (onnxruntime itself; the
Keras layers format and brainchop's MeshNet config re-read here with their documented
meaning) and must compute what the unfused checkpoint computes. The real runtimes (TF.js,
brainchop on tinygrad) on the real scan are in test_export_runtimes.py.
"""

import argparse
import json

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import ARC_CHECKPOINT, missing_tool, phantom

from napari_meshchop import __version__, events, files
from napari_meshchop.cli import export as export_cli
from napari_meshchop.errors import InputError, MeshchopError
from napari_meshchop.imaging.preprocess import PreprocessSpec
from napari_meshchop.network import checkpoint
from napari_meshchop.network.export.bundle import export
from napari_meshchop.network.inference import segment
from napari_meshchop.network.model import Architecture, MeshNet, count_parameters


def ort():
    try:
        import onnxruntime
    except ImportError:
        missing_tool("onnxruntime is not installed (the test extra installs it)")
    return onnxruntime


def plain(ckpt_path, volume: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The checkpoint's own unfused model: (logits (2, ...), P(lesion))."""
    model = checkpoint.load(ckpt_path).build()
    with torch.no_grad():
        logits = model(torch.from_numpy(np.ascontiguousarray(volume))[None, None])
    return logits[0].numpy(), torch.softmax(logits, 1)[0, 1].numpy()


def turn(volume: np.ndarray, src: str, dst: str) -> np.ndarray:
    o = nib.orientations
    return o.apply_orientation(
        volume, o.ornt_transform(o.axcodes2ornt(tuple(src)), o.axcodes2ornt(tuple(dst)))).copy()


def same_padded(x: torch.Tensor, weight: np.ndarray, bias: np.ndarray, dilation: int,
                padding: int) -> torch.Tensor:
    return F.conv3d(x, torch.from_numpy(weight), torch.from_numpy(bias),
                    padding=padding, dilation=dilation)


def volume(shape=(20, 18, 16)) -> np.ndarray:
    v = phantom(shape, seed=3)
    return (v / v.max()).astype(np.float32)


# ----------------------------------------------------------------------------- ONNX


def test_onnx_runs_in_onnxruntime_like_the_checkpoint(tiny_checkpoint, tmp_path):
    rt = ort()
    result = export(tiny_checkpoint, "onnx", tmp_path / "onnx")
    assert result.warnings == []
    session = rt.InferenceSession(str(tmp_path / "onnx" / "model.onnx"),
                                  providers=["CPUExecutionProvider"])
    import onnx

    graph = onnx.load(tmp_path / "onnx" / "model.onnx")
    ops = [n.op_type for n in graph.graph.node]
    assert "BatchNormalization" not in ops and ops.count("Conv") == 6  # 5 blocks + head
    assert graph.opset_import[0].version >= 18
    dims = [d.dim_param or d.dim_value for d in graph.graph.input[0].type.tensor_type.shape.dim]
    assert dims == [1, 1, "depth", "height", "width"]
    for shape in [(20, 18, 16), (9, 13, 11)]:  # one file, any depth, height and width
        v = volume(shape)
        logits, prob = session.run(["logits", "lesion_probability"], {"volume": v[None, None]})
        want_logits, want_prob = plain(tiny_checkpoint, v)
        np.testing.assert_allclose(logits[0], want_logits, atol=1e-5)
        np.testing.assert_allclose(prob[0, 0], want_prob, atol=1e-6)


def test_onnx_metadata_records_preprocessing_and_provenance(tiny_checkpoint, tmp_path):
    rt = ort()
    export(tiny_checkpoint, "onnx", tmp_path / "onnx")
    session = rt.InferenceSession(str(tmp_path / "onnx" / "model.onnx"),
                                  providers=["CPUExecutionProvider"])
    props = session.get_modelmeta().custom_metadata_map
    assert json.loads(props["preprocessing"]) == checkpoint.load(tiny_checkpoint).preprocess.to_dict()
    assert json.loads(props["class_names"]) == ["background", "lesion"]
    assert props["napari_meshchop_version"] == __version__
    assert props["source_checkpoint_sha256"] == files.sha256_file(tiny_checkpoint)
    assert "lesion_probability" in props["output"]
    assert "32x32x32" in props["network_grid"] and "RAS" in props["network_grid"]
    assert json.loads(props["architecture"])["channels"] == 4


def test_segment_runs_an_onnx_model_with_the_checkpoints_way_there_and_back(
        tiny_checkpoint, phantom_img, tmp_path):
    ort()
    export(tiny_checkpoint, "onnx", tmp_path / "onnx")
    onnx_model = tmp_path / "onnx" / "model.onnx"
    ours = events.run(segment(phantom_img, tiny_checkpoint, "cpu"))
    theirs = events.run(segment(phantom_img, onnx_model, "cpu"))
    assert theirs.model == "model.onnx"
    assert theirs.mask.shape == phantom_img.shape and ours.lesion_voxels > 0
    # P(lesion) agrees to 1e-6; a voxel may flip only where P sits at 0.5 within that.
    assert np.mean(theirs.mask != ours.mask) < 1e-4
    from napari_meshchop.cli import main

    scan = tmp_path / "scan.nii.gz"
    nib.save(phantom_img, scan)
    assert main(["segment", str(scan), "-o", str(tmp_path / "mask.nii.gz"),
                 "--model", str(onnx_model), "--device", "cpu", "-q"]) == 0
    written = np.asarray(nib.load(tmp_path / "mask.nii.gz").dataobj)
    np.testing.assert_array_equal(written, theirs.mask)
    with pytest.raises(MeshchopError, match="ONNX model runs alone"):
        events.run(segment(phantom_img, [onnx_model, tiny_checkpoint], "cpu"))


def test_onnx_file_that_is_not_ours_is_refused(tmp_path, phantom_img):
    ort()
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    onnx.save(helper.make_model(graph), tmp_path / "relu.onnx")
    with pytest.raises(InputError, match="relu.onnx: not an ONNX MeshNet exported"):
        events.run(segment(phantom_img, tmp_path / "relu.onnx", "cpu"))
    (tmp_path / "junk.onnx").write_bytes(b"not a model")
    with pytest.raises(InputError, match="junk.onnx: not a readable ONNX model"):
        events.run(segment(phantom_img, tmp_path / "junk.onnx", "cpu"))


# ----------------------------------------------------------------------------- TF.js


def keras_forward(folder, v: np.ndarray) -> np.ndarray:
    """model.json + its weight shard read with the Keras layers format's meaning: kernels
    (kd, kh, kw, in, out), 'same' padding, channels last. Returns logits (..., 2)."""
    model = json.loads((folder / "model.json").read_text())
    (group,) = model["weightsManifest"]
    shard = np.concatenate([np.fromfile(folder / p, "<f4") for p in group["paths"]])
    weights, at = {}, 0
    for spec in group["weights"]:
        assert spec["dtype"] == "float32"
        n = int(np.prod(spec["shape"]))
        weights[spec["name"]] = shard[at:at + n].reshape(spec["shape"])
        at += n
    assert at == shard.size  # nothing left over
    x = torch.from_numpy(v)[None, None]
    for layer in model["modelTopology"]["model_config"]["config"]["layers"][1:]:
        cfg = layer["config"]
        if layer["class_name"] == "Activation":
            assert cfg["activation"] == "relu"
            x = x.relu()
            continue
        assert layer["class_name"] == "Conv3D" and cfg["padding"] == "same"
        assert cfg["data_format"] == "channels_last" and cfg["activation"] == "linear"
        kernel = weights[f"{cfg['name']}/kernel"]
        d = cfg["dilation_rate"][0]
        x = same_padded(x, np.ascontiguousarray(kernel.transpose(4, 3, 0, 1, 2)),
                        weights[f"{cfg['name']}/bias"], d, d * (cfg["kernel_size"][0] - 1) // 2)
    return x[0].permute(1, 2, 3, 0).numpy()


def test_tfjs_layers_model_computes_the_checkpoint_in_lia_order(tiny_checkpoint, tmp_path):
    folder = tmp_path / "tiny-tfjs"
    result = export(tiny_checkpoint, "tfjs", folder)
    assert {p.name for p in result.files} == {"model.json", "model.bin", "colormap.json",
                                              "model-list-entry.json", "README.md",
                                              "metadata.json"}
    model = json.loads((folder / "model.json").read_text())
    assert model["format"] == "layers-model"
    layers = model["modelTopology"]["model_config"]["config"]["layers"]
    assert layers[0]["config"]["batch_input_shape"] == [None, 256, 256, 256, 1]
    convs = [la["config"] for la in layers if la["class_name"] == "Conv3D"]
    assert [c["dilation_rate"] for c in convs] == [[d] * 3 for d in (1, 2, 4, 2, 1, 1)]
    assert convs[-1]["filters"] == 2 and convs[-1]["kernel_size"] == [1, 1, 1]
    # One float32 shard; folded, each of the 5 BatchNorms' 4 scales and 4 shifts are gone.
    unfolded = count_parameters(MeshNet(Architecture(4, (1, 2, 4, 2, 1))))
    assert (folder / "model.bin").stat().st_size == 4 * (unfolded - 5 * 2 * 4)
    # The app feeds the voxels in LIA order; the tiny model was trained on RAS.
    v = volume()
    logits = keras_forward(folder, turn(v, "RAS", "LIA"))
    want, _ = plain(tiny_checkpoint, v)
    np.testing.assert_allclose(turn(logits, "LIA", "RAS"), np.moveaxis(want, 0, -1), atol=1e-5)
    assert json.loads((folder / "colormap.json").read_text()) == {
        "R": [0, 255], "G": [0, 0], "B": [0, 0], "labels": ["background", "lesion"]}
    entry = json.loads((folder / "model-list-entry.json").read_text())
    assert entry["path"] == "/models/tiny-tfjs/model.json"
    assert entry["enableTranspose"] is True and entry["enableQuantileNorm"] is False
    assert entry["cropPadding"] == 1 + 2 + 4 + 2 + 1  # the receptive radius: an exact crop


# ----------------------------------------------------------------------------- brainchop CLI


def brainchop_forward(folder, v: np.ndarray) -> np.ndarray:
    """model.json (brainchop's MeshNet config) + model.pth as brainchop builds them: a conv
    per layer with the given padding and dilation, ReLU after all but the last."""
    config = json.loads((folder / "model.json").read_text())
    assert config["bnorm"] is False and config["dropout_p"] == 0 and config["bias"] is True
    state = torch.load(folder / "model.pth", weights_only=True)
    layers = config["layers"]
    assert list(state) == [f"model.{2 * i}.{k}" for i in range(len(layers))
                           for k in ("weight", "bias")]
    x = torch.from_numpy(v)[None, None]
    for i, layer in enumerate(layers):
        # brainchop passes every key to its Conv2d: only these may be there
        assert set(layer) == {"in_channels", "out_channels", "kernel_size", "padding",
                              "stride", "dilation"}
        weight = state[f"model.{2 * i}.weight"]
        assert tuple(weight.shape) == (layer["out_channels"], layer["in_channels"],
                                       *[layer["kernel_size"]] * 3)
        x = same_padded(x, weight.numpy(), state[f"model.{2 * i}.bias"].numpy(),
                        layer["dilation"], layer["padding"])
        if i < len(layers) - 1:
            x = x.relu()
    return x[0].numpy()


def test_brainchop_folder_computes_the_checkpoint_in_lia_order(tiny_checkpoint, tmp_path):
    folder = tmp_path / "bc"
    result = export(tiny_checkpoint, "brainchop", folder)
    assert {p.name for p in result.files} == {"model.json", "model.pth", "README.md",
                                              "metadata.json"}
    v = volume()
    logits = brainchop_forward(folder, turn(v, "RAS", "LIA"))
    want, _ = plain(tiny_checkpoint, v)
    np.testing.assert_allclose(np.stack([turn(c, "LIA", "RAS") for c in logits]), want,
                               atol=1e-5)


# ----------------------------------------------------------------------------- contracts


def saved(tmp_path, name: str, spec: PreprocessSpec, provenance=None):
    torch.manual_seed(1)
    model = MeshNet(Architecture(channels=3, dilations=(1, 2, 1))).eval()
    return checkpoint.from_model(model, spec, **(provenance or {})).save(tmp_path / f"{name}.pt")


@pytest.mark.parametrize("spec_name, warned", [
    ("conform", {"brainchop"}), ("brainchop", {"tfjs"}), ("ras-minmax", {"tfjs", "brainchop"}),
])
def test_a_preprocessing_the_target_does_not_feed_is_exported_with_a_warning(
        tmp_path, spec_name, warned):
    spec = PreprocessSpec(spec_name) if spec_name != "ras-minmax" else PreprocessSpec(
        spec_name, shape=(64, 64, 64))
    ckpt = saved(tmp_path, spec_name, spec)
    for fmt in ("tfjs", "brainchop"):
        result = export(ckpt, fmt, tmp_path / f"{spec_name}-{fmt}")
        readme = (result.folder / "README.md").read_text()
        meta = json.loads((result.folder / "metadata.json").read_text())
        if fmt in warned:
            (warning,) = result.warnings
            assert f"'{spec_name}' preprocessing" in warning and "LIA order" in warning
            assert "Warning:" in readme and meta["warnings"] == [warning]
            assert meta["matches_input_contract"] is False
        else:
            assert result.warnings == [] and "Warning" not in readme
            assert meta["matches_input_contract"] is True
        assert meta["kernel_axis_codes"] == "LIA"
    assert ("turned from RAS" in " ".join(result.warnings)) == (spec_name == "ras-minmax")


def test_every_export_carries_its_provenance(tiny_checkpoint, tmp_path):
    result = export(tiny_checkpoint, "brainchop", tmp_path / "out")
    meta = json.loads((tmp_path / "out" / "metadata.json").read_text())
    readme = (tmp_path / "out" / "README.md").read_text()
    sha = files.sha256_file(tiny_checkpoint)
    assert meta["source_checkpoint"] == "tiny.pt" and meta["source_checkpoint_sha256"] == sha
    assert sha in readme and "research only" in readme and "not for clinical" in readme
    assert meta["preprocessing"]["name"] == "ras-minmax"
    assert meta["training_data"] == "not recorded in the checkpoint"
    assert meta["provenance"] == {"note": "test fixture"}
    assert "Apache-2.0" in meta["licence"] and meta["intended_use"].startswith("research only")
    assert all(oct(p.stat().st_mode)[-3:] == "644" for p in result.files)
    trained = saved(tmp_path, "ours", PreprocessSpec("brainchop"),
                    {"source": "napari-meshchop train", "epochs": 3})
    meta = export(trained, "brainchop", tmp_path / "ours-bc").metadata
    assert "ARC" in meta["training_data"] and "CC0" in meta["training_data"]


def test_the_pretrained_model_exports_by_name(real_data, tmp_path):
    result = export("meshnet26-arc-fold0", "brainchop", tmp_path / "pretrained")
    meta = result.metadata
    assert meta["source_checkpoint"] == "arc-meshchop_meshnet26_fold0_restart0.pt"
    assert meta["source_checkpoint_sha256"] == (
        "f66bcc77f3e91424fa43e70f11dd2d543cf000edd616233c5d71cc314e7d89b2")
    assert meta["architecture"]["parameters"] == 147_474
    assert "ARC" in meta["training_data"] and "CC0" in meta["training_data"]
    assert meta["licence"].startswith("Apache-2.0 (the licence of meshnet26-arc-fold0's")
    assert len(result.warnings) == 1  # ras-minmax, not what brainchop feeds
    # The same file by path: the same provenance.
    by_path = export(ARC_CHECKPOINT, "tfjs", tmp_path / "by-path").metadata
    assert by_path["licence"] == meta["licence"]


# ----------------------------------------------------------------------------- bad input


def test_bad_input_gets_a_clear_error(tiny_checkpoint, tmp_path):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(InputError, match="junk.pt: not a readable checkpoint"):
        export(junk, "onnx", tmp_path / "a")
    other = tmp_path / "other.pt"
    torch.save({"state_dict": {"w": torch.zeros(1)}}, other)
    with pytest.raises(InputError, match="other.pt: not a MeshNet checkpoint"):
        export(other, "tfjs", tmp_path / "b")
    three = checkpoint.from_model(MeshNet(Architecture(channels=3, dilations=(1,), n_classes=3)),
                                  PreprocessSpec()).save(tmp_path / "three.pt")
    with pytest.raises(InputError, match=r"three.pt: .*3 classes; export needs 1 input "):
        export(three, "brainchop", tmp_path / "c")
    with pytest.raises(InputError, match="its parent .*missing does not exist"):
        export(tiny_checkpoint, "onnx", tmp_path / "missing" / "out")
    (tmp_path / "file").write_text("x")
    with pytest.raises(InputError, match="file: exists and is not a folder"):
        export(tiny_checkpoint, "onnx", tmp_path / "file")
    with pytest.raises(MeshchopError, match="unknown export format 'keras'"):
        export(tiny_checkpoint, "keras", tmp_path / "d")
    assert not any((tmp_path / n).exists() for n in "abcd")


# ----------------------------------------------------------------------------- command line


def test_export_command(tiny_checkpoint, tmp_path, capsys):
    parser = argparse.ArgumentParser(prog="meshchop")
    export_cli.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["export", str(tiny_checkpoint), "--format", "brainchop",
                              "-o", str(tmp_path / "bc")])
    assert args.func(args) == 0
    out, err = capsys.readouterr()
    assert f"written to {tmp_path / 'bc'}" in out and "model.pth" in out
    assert err.startswith(f"meshchop: warning: {tiny_checkpoint} was trained on the 'ras-minmax'")
    with pytest.raises(SystemExit):
        parser.parse_args(["export", str(tiny_checkpoint), "--format", "keras", "-o", "x"])
