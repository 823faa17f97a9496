import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import ARC_CHECKPOINT, SAMPLE_SCAN

from napari_meshchop.errors import InputError
from napari_meshchop.events import run
from napari_meshchop.imaging.preprocess import PreprocessSpec, prepare
from napari_meshchop.network import checkpoint
from napari_meshchop.network.inference import FusedMeshNet
from napari_meshchop.network.model import Architecture


def test_round_trip_loads_without_running_code(tiny_checkpoint, tmp_path):
    raw = torch.load(tiny_checkpoint, weights_only=True)  # refuses anything but data
    assert raw["format"] == checkpoint.FORMAT and raw["version"] == checkpoint.VERSION
    ckpt = checkpoint.load(tiny_checkpoint)
    assert ckpt.arch == Architecture(channels=4, dilations=(1, 2, 4, 2, 1))
    assert ckpt.preprocess == PreprocessSpec("ras-minmax", shape=(32, 32, 32))
    assert ckpt.provenance == {"note": "test fixture"}
    again = checkpoint.load(ckpt.save(tmp_path / "again.pt"))
    for key, value in ckpt.state_dict.items():
        assert torch.equal(value, again.state_dict[key])


def test_save_is_atomic(tiny_checkpoint, tmp_path, monkeypatch):
    target = tmp_path / "model.pt"
    ckpt = checkpoint.load(tiny_checkpoint)
    ckpt.save(target)
    before = target.read_bytes()

    def crash(obj, fh):
        fh.write(b"half a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save(target)
    assert target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]


@pytest.mark.parametrize("damage, message", [
    (lambda p: p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2]), "not a readable"),
    (lambda p: p.write_text("hello"), "not a readable"),
    (lambda p: torch.save({"weights": torch.zeros(3)}, p), "unknown format"),
    (lambda p: torch.save([1, 2], p), "not a MeshNet checkpoint"),
])
def test_bad_checkpoints_are_named_and_explained(tiny_checkpoint, tmp_path, damage, message):
    path = tmp_path / "bad.pt"
    path.write_bytes(tiny_checkpoint.read_bytes())
    damage(path)
    with pytest.raises(InputError, match=message) as err:
        checkpoint.load(path)
    assert str(path) in str(err.value)


def test_weights_of_another_architecture_are_refused(tiny_checkpoint, tmp_path):
    raw = torch.load(tiny_checkpoint, weights_only=True)
    raw["arch"]["channels"] = 26  # the header says 26 channels, the weights hold 4
    torch.save(raw, tmp_path / "liar.pt")
    with pytest.raises(InputError, match=r"do not fit MeshNet\(channels=26.*wrong shape"):
        checkpoint.load(tmp_path / "liar.pt")
    raw = torch.load(tiny_checkpoint, weights_only=True)
    raw["version"] = 99
    torch.save(raw, tmp_path / "future.pt")
    with pytest.raises(InputError, match="newer"):
        checkpoint.load(tmp_path / "future.pt")


def test_arc_meshchop_import_keeps_every_weight(real_data):
    raw = torch.load(ARC_CHECKPOINT, map_location="cpu", weights_only=True)
    ckpt = checkpoint.load(ARC_CHECKPOINT)
    assert ckpt.arch == Architecture(channels=26)
    assert ckpt.preprocess.name == "ras-minmax"
    assert ckpt.provenance["source"] == "arc-meshchop" and ckpt.provenance["epochs"] == 50
    ours = ckpt.state_dict
    assert len(ours) == len(raw["model_state_dict"])
    assert torch.equal(ours["blocks.4.0.weight"], raw["model_state_dict"]["network.4.conv.weight"])
    assert torch.equal(ours["blocks.8.1.running_var"],
                       raw["model_state_dict"]["network.8.bn.running_var"])
    assert torch.equal(ours["head.weight"], raw["model_state_dict"]["network.9.weight"])


def _arc_meshchop_network(state_dict) -> torch.nn.Module:
    """The network exactly as arc-meshchop names and runs it."""
    from torch import nn

    class Block(nn.Module):
        def __init__(self, c_in, d):
            super().__init__()
            self.conv = nn.Conv3d(c_in, 26, 3, padding=d, dilation=d)
            self.bn = nn.BatchNorm3d(26)

        def forward(self, x):
            return torch.relu(self.bn(self.conv(x)))

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            dilations = (1, 2, 4, 8, 16, 16, 8, 4, 2)
            self.network = nn.Sequential(*[Block(1 if i == 0 else 26, d)
                                           for i, d in enumerate(dilations)],
                                         nn.Conv3d(26, 2, 1))

        def forward(self, x):
            return self.network(x)

    net = Net()
    net.load_state_dict(state_dict)
    return net.eval()


def test_imported_model_predicts_as_in_training(real_data):
    """Our preprocessing + fused pass equals arc-meshchop's own path on a real scan."""
    raw = torch.load(ARC_CHECKPOINT, map_location="cpu", weights_only=True)
    img = nib.load(SAMPLE_SCAN)
    # A 64^3 block around the lesion keeps this fast; the network is fully convolutional.
    block = nib.Nifti1Image(np.asarray(img.dataobj)[150:214, 70:134, 100:164], img.affine)
    spec = PreprocessSpec("ras-minmax", shape=(64, 64, 64))
    ours = run(FusedMeshNet(checkpoint.load(ARC_CHECKPOINT).build()).lesion_probability(
        prepare(block, spec).volume))
    data = np.asarray(nib.as_closest_canonical(block).dataobj, dtype=np.float32)
    data = (data - data.min()) / (data.max() - data.min())
    with torch.no_grad():
        logits = _arc_meshchop_network(raw["model_state_dict"])(torch.from_numpy(data)[None, None])
        theirs = torch.softmax(logits, 1)[0, 1].numpy()
    np.testing.assert_allclose(ours, theirs, atol=1e-4)
    assert ((ours > 0.5) == (theirs > 0.5)).mean() > 0.9999
    assert (theirs > 0.5).sum() > 1000  # the block does hold lesion
