import threading

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import oblique_affine, phantom

from napari_meshchop.errors import Cancelled, MeshchopError
from napari_meshchop.events import Progress, run
from napari_meshchop.imaging.nifti import load_volume
from napari_meshchop.network import checkpoint
from napari_meshchop.network import fused as fused_pass
from napari_meshchop.network.fused import (
    FusedMeshNet,
    compute_dtype,
    conv_relu_in_slabs,
)
from napari_meshchop.network.inference import (
    available_devices,
    resolve_device,
    segment,
    segment_file,
)


def _probability(fused, volume):
    return run(fused.lesion_probability(volume))


def test_fused_pass_equals_the_plain_model(tiny_checkpoint):
    model = checkpoint.load(tiny_checkpoint).build()  # dilations 1, 2, 4, 2, 1
    volume = np.random.default_rng(1).random((21, 18, 25), dtype=np.float32)
    with torch.no_grad():
        logits = model(torch.from_numpy(volume)[None, None])
        expected = torch.softmax(logits, dim=1)[0, 1].numpy()
    # Slabs thinner than the dilation, uneven, and whole-volume; the volume thinner than
    # the slab and than twice the dilation; on the oneDNN path where it runs, and without.
    with torch.no_grad():
        thin = torch.softmax(model(torch.from_numpy(volume[:3])[None, None]), 1)[0, 1].numpy()
    paths = {torch.backends.mkldnn.is_available(): (1, 3, 7, 64), False: (3, 64)}
    for onednn, slabs in paths.items():
        torch.backends.mkldnn.enabled = onednn
        try:
            for slab in slabs:
                fused = FusedMeshNet(model, slab=slab)
                assert fused.onednn == onednn
                np.testing.assert_allclose(_probability(fused, volume), expected, atol=1e-5)
            np.testing.assert_allclose(_probability(FusedMeshNet(model, slab=16), volume[:3]),
                                       thin, atol=1e-5)
        finally:
            torch.backends.mkldnn.enabled = True


def test_scanned_box_is_the_voxels_above_zero_grown_by_the_margin():
    volume = np.zeros((30, 20, 10), np.float32)
    volume[10:12, 3, 4:6] = 0.5
    assert fused_pass.scanned_box(volume, 4) == (slice(6, 16), slice(0, 8), slice(0, 10))
    assert fused_pass.scanned_box(np.zeros((5, 5, 5), np.float32), 4) == ()
    volume[0, 0, 0] = volume[-1, -1, -1] = 1.0
    assert fused_pass.scanned_box(volume, 0) is None  # the whole grid: nothing to skip


def test_the_network_skips_the_air_around_the_scan(tiny_checkpoint, monkeypatch):
    """The pass runs on the scanned box plus the margin; P(lesion) is 0 outside, and equal
    to the whole grid's where the box's own padding is out of the receptive field's reach."""
    net = FusedMeshNet(checkpoint.load(tiny_checkpoint).build())
    radius = sum(d for *_, d in net.layers)  # 10 for dilations 1, 2, 4, 2, 1
    assert net.margin == radius // 2
    volume = np.zeros((70, 16, 18), np.float32)
    volume[20:50] = np.random.default_rng(0).uniform(0.1, 1.0, (30, 16, 18))
    whole = _probability(FusedMeshNet(checkpoint.load(tiny_checkpoint).build(),
                                      skip_air=False), volume)
    shapes = []
    inner = FusedMeshNet._probability

    def spy(self, part, stop):
        shapes.append(part.shape)
        return (yield from inner(self, part, stop))

    monkeypatch.setattr(FusedMeshNet, "_probability", spy)
    got = _probability(net, volume)
    lo, hi = 20 - net.margin, 50 + net.margin
    assert shapes == [(hi - lo, 16, 18)]
    assert not got[:lo].any() and not got[hi:].any() and whole[:lo].min() > 0
    reach = slice(lo + radius, hi - radius)
    np.testing.assert_allclose(got[reach], whole[reach], atol=1e-6)
    # A grid the scan fills runs whole, as before; an empty one runs nothing.
    full = np.random.default_rng(1).uniform(0.1, 1.0, (24, 16, 18)).astype(np.float32)
    np.testing.assert_array_equal(_probability(net, full), _probability(
        FusedMeshNet(checkpoint.load(tiny_checkpoint).build(), skip_air=False), full))
    shapes.clear()
    assert not _probability(net, np.zeros((24, 16, 18), np.float32)).any() and shapes == []


def test_precision_choice():
    assert compute_dtype(torch.device("cpu")) == torch.float32
    assert compute_dtype(torch.device("cuda")) == torch.float16  # no GPU needed to choose
    assert compute_dtype(torch.device("mps")) == torch.float32
    assert compute_dtype(torch.device("cpu"), "bfloat16") == torch.bfloat16
    with pytest.raises(MeshchopError, match="unknown precision 'half'"):
        compute_dtype(torch.device("cpu"), "half")


def test_reduced_precision_is_checked_against_float32(tiny_checkpoint):
    """float16 (CUDA's default) runs here on the CPU: its probe passes for a sane model
    and agrees with float32; a model whose activations overflow float16 falls back."""
    model = checkpoint.load(tiny_checkpoint).build()
    volume = np.random.default_rng(3).random((24, 20, 18), dtype=np.float32)
    exact = _probability(FusedMeshNet(model), volume)
    half = FusedMeshNet(model, precision="float16")
    assert half.dtype == torch.float16 and not half.onednn
    events = []
    got = run(half.lesion_probability(volume), events.append)
    assert half.checked and half.dtype == torch.float16
    assert 0 < np.abs(got - exact).max() < 1e-2  # really float16, and close
    assert not any("using float32" in e.message for e in events)
    with torch.no_grad():  # 1e6 x the first layer: activations beyond float16's 65504
        model.blocks[0].conv.weight.mul_(1e6)
        model.blocks[0].conv.bias.mul_(1e6)
    exact = _probability(FusedMeshNet(model), volume)
    half = FusedMeshNet(model, precision="float16")
    assert not half.probe_error(volume) <= fused_pass.PROBE_TOLERANCE  # or NaN
    events = []
    got = run(half.lesion_probability(volume), events.append)
    assert half.dtype == torch.float32
    assert any(e.message.startswith("float16 differs from float32") for e in events)
    np.testing.assert_allclose(got, exact, atol=1e-6)


def test_reduced_precision_that_overflows_outside_the_probe_is_redone(tiny_checkpoint):
    model = checkpoint.load(tiny_checkpoint).build()
    volume = np.random.default_rng(4).random((48, 40, 40), dtype=np.float32)
    volume[:4, :4, :4] = 1e6  # float16 ends at 65504; the central probe block is clean
    exact = _probability(FusedMeshNet(model), volume)
    half = FusedMeshNet(model, precision="float16")
    assert half.probe_error(volume) < fused_pass.PROBE_TOLERANCE
    events = []
    got = run(half.lesion_probability(volume), events.append)
    assert [e.message for e in events if "float32" in e.message] == [
        "float16 overflowed outside the probe block; using float32"]
    assert half.dtype == torch.float32
    np.testing.assert_allclose(got, exact, atol=1e-6)


def test_slabs_handle_every_face():
    torch.manual_seed(0)
    x = torch.rand(1, 3, 11, 9, 10).contiguous(memory_format=torch.channels_last_3d)
    w, b = torch.randn(5, 3, 3, 3, 3), torch.randn(5)
    for d in (1, 4, 16):
        expected = torch.nn.functional.conv3d(x, w, b, padding=d, dilation=d).relu()
        for slab in (1, 4, 11):
            torch.testing.assert_close(conv_relu_in_slabs(x, w, b, d, slab), expected,
                                       atol=1e-5, rtol=1e-5)


def test_segment_reports_progress_and_returns_a_mask_on_the_input_grid(tiny_checkpoint):
    img = nib.Nifti1Image(phantom(), oblique_affine())
    events = []
    result = run(segment(img, tiny_checkpoint, device="cpu"), events.append)
    assert all(isinstance(e, Progress) for e in events)
    done = [e.done for e in events]
    assert done == sorted(done) and events[-1].done == events[-1].total
    assert {"model", "preprocess", "network", "map back"} <= {e.stage for e in events}
    assert result.mask.shape == img.shape and result.mask.dtype == np.uint8
    np.testing.assert_array_equal(result.affine, img.affine)
    assert 0 < result.lesion_voxels < result.mask.size  # the tiny model marks some voxels
    assert result.lesion_ml == pytest.approx(result.lesion_voxels * 1.2 * 0.9 * 2.5 / 1000)


def test_stop_cancels_between_layers_and_writes_nothing(tiny_checkpoint, tmp_path):
    src = tmp_path / "in.nii.gz"
    nib.save(nib.Nifti1Image(phantom(), np.eye(4)), src)
    stop = threading.Event()
    out = tmp_path / "mask.nii.gz"
    job = segment_file(src, out, tiny_checkpoint, device="cpu", stop=stop)
    with pytest.raises(Cancelled):
        for event in job:
            if event.stage == "network":
                stop.set()
    assert not out.exists() and list(tmp_path.iterdir()) == [src]


def test_storage_type_does_not_change_the_prediction(tiny_checkpoint, tmp_path):
    values = np.round(np.clip(phantom() * 2, 0, 255)).astype(np.int16)  # integers 0..255
    assert values.max() <= 255
    masks = {}
    for name in ("uint8", "int16", "float64", "slope"):
        img = nib.Nifti1Image(values.astype(name if name != "slope" else np.int16), np.eye(4))
        if name == "slope":
            img.header.set_slope_inter(0.5, 0.0)  # the same image, stored scaled
        path = tmp_path / f"{name}.nii.gz"
        nib.save(img, path)
        assert nib.load(path).get_data_dtype() == np.dtype(name if name != "slope" else "int16")
        masks[name] = run(segment(load_volume(path), tiny_checkpoint, device="cpu")).mask
    for name, mask in masks.items():
        np.testing.assert_array_equal(mask, masks["uint8"], err_msg=name)


def test_devices():
    assert available_devices()[:2] == ["auto", "cpu"]
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type in {"cpu", "cuda", "mps"}
    with pytest.raises(MeshchopError, match="unknown device"):
        resolve_device("tpu")
    for missing in {"cuda", "mps"} - set(available_devices()):
        with pytest.raises(MeshchopError, match="not available"):
            resolve_device(missing)


# --------------------------------------------------------------- ensembles


def _tiny(tmp_path, seed, shape=(32, 32, 32), channels=3):
    torch.manual_seed(seed)
    from napari_meshchop.imaging.preprocess import PreprocessSpec
    from napari_meshchop.network.model import Architecture, MeshNet

    model = MeshNet(Architecture(channels=channels, dilations=(1, 2, 1)))
    ckpt = checkpoint.from_model(model.eval(), PreprocessSpec("ras-minmax", shape=shape))
    return ckpt.save(tmp_path / f"seed{seed}-{shape[0]}.pt")


def test_ensemble_probability_is_the_mean_of_its_members(tiny_checkpoint, tmp_path):
    from napari_meshchop.network.inference import Ensemble, load_predictor

    other = _tiny(tmp_path, 1)
    volume = np.random.default_rng(2).random((12, 10, 9), dtype=np.float32)
    expected = []
    for path in (tiny_checkpoint, other):
        with torch.no_grad():
            logits = checkpoint.load(path).build()(torch.from_numpy(volume)[None, None])
        expected.append(torch.softmax(logits, dim=1)[0, 1].numpy())
    predictor, first, label = load_predictor([tiny_checkpoint, other])
    assert isinstance(predictor, Ensemble) and len(predictor.members) == 2
    assert first.preprocess == checkpoint.load(tiny_checkpoint).preprocess
    assert label == "ensemble of 2 (tiny.pt, seed1-32.pt)"
    events = []
    got = run(predictor.lesion_probability(volume), events.append)
    np.testing.assert_allclose(got, (expected[0] + expected[1]) / 2, atol=1e-5)
    assert np.abs(expected[0] - expected[1]).max() > 1e-3  # the two models differ
    done = [e.done for e in events]
    assert done == list(range(1, predictor.n_steps + 1)) and events[-1].total == predictor.n_steps
    single, _, label = load_predictor([tiny_checkpoint])
    assert isinstance(single, FusedMeshNet) and label == "tiny.pt"


def test_ensemble_refuses_models_on_different_grids(tiny_checkpoint, tmp_path):
    from napari_meshchop.network.inference import load_predictor

    other = _tiny(tmp_path, 1, shape=(24, 24, 24))
    with pytest.raises(MeshchopError, match=r"seed1-24.pt: its preprocessing \(ras-minmax, "
                       r"\(24, 24, 24\)\) differs from tiny.pt's"):
        load_predictor([tiny_checkpoint, other])
    with pytest.raises(MeshchopError, match="no model given"):
        load_predictor([])


def test_segment_command_takes_several_models_as_an_ensemble(tiny_checkpoint, tmp_path,
                                                             capsys):
    from napari_meshchop import cli

    other = _tiny(tmp_path, 1)
    src = tmp_path / "in.nii.gz"
    img = nib.Nifti1Image(phantom(), oblique_affine())
    nib.save(img, src)
    out = tmp_path / "mask.nii.gz"
    assert cli.main(["segment", str(src), "-o", str(out), "--model", str(tiny_checkpoint),
                     "--model", str(other), "--device", "cpu", "-q"]) == 0
    assert "model ensemble of 2 (tiny.pt, seed1-32.pt)" in capsys.readouterr().out
    both = run(segment(load_volume(src), [tiny_checkpoint, other], device="cpu"))
    alone = run(segment(load_volume(src), tiny_checkpoint, device="cpu"))
    written = np.asarray(nib.load(out).dataobj)
    np.testing.assert_array_equal(written, both.mask)
    assert not np.array_equal(both.mask, alone.mask)  # the second model changed the answer


@pytest.mark.slow
def test_onednn_pass_equals_the_generic_pass_and_skips_the_air_on_the_real_scan(
        real_segmentation):
    """At 256^3 (the sample scan, the ARC model): the in-buffer oneDNN pass against the
    conv3d-a-layer path that runs on GPUs, P(lesion) within 1e-4 and the mask's Dice; and
    the air skipped (the default) against the whole grid, the mask's Dice >= 0.9999."""
    import network_memo
    from conftest import ARC_CHECKPOINT, SAMPLE_SCAN

    from napari_meshchop.imaging.preprocess import prepare

    ckpt = checkpoint.load(ARC_CHECKPOINT)
    volume = prepare(load_volume(SAMPLE_SCAN), ckpt.preprocess).volume  # as segment reads it
    assert volume.shape == (256, 256, 256)
    fast = FusedMeshNet(ckpt.build())
    if not fast.onednn:
        pytest.skip("this PyTorch has no oneDNN")
    # The session's real segmentation ran this very pass (the oneDNN one, the air skipped)
    # on this volume through `meshchop segment`'s core, and recorded it: no need to redo it.
    got = np.load(real_segmentation.memo / f"{network_memo.key(fast, volume)}.npy")
    generic = FusedMeshNet(ckpt.build())
    generic.onednn = False
    expected = _probability(generic, volume)
    assert np.abs(got - expected).max() < 1e-4
    a, b = got > 0.5, expected > 0.5
    assert b.sum() > 50_000  # the lesion is there (about 85 mL)
    assert 2 * (a & b).sum() / (a.sum() + b.sum()) >= 0.999
    # Skipping the air (both passes above did) against the whole grid: the same mask.
    box = fused_pass.scanned_box(volume, fast.margin)
    assert np.prod([s.stop - s.start for s in box]) < 0.8 * volume.size
    whole = _probability(FusedMeshNet(ckpt.build(), skip_air=False), volume) > 0.5
    assert 2 * (a & whole).sum() / (a.sum() + whole.sum()) >= 0.9999
