"""Fine-tuning through the one training loop: frozen BatchNorm, learning from corrections
(with a before/after on held-out corrected pairs), Stop and resume, and the command line."""

from __future__ import annotations

import argparse
import json

import pytest
import synthetic_corrections as synthetic
import torch

from napari_meshchop import events
from napari_meshchop.cli import finetune as finetune_cli
from napari_meshchop.data import corrections
from napari_meshchop.errors import MeshchopError
from napari_meshchop.events import Notice
from napari_meshchop.network import checkpoint as ckpt_io
from napari_meshchop.network.model import Architecture, MeshNet
from napari_meshchop.training.config import TrainConfig
from napari_meshchop.training.finetune import finetune, finetune_config
from napari_meshchop.training.loop import Step, fit
from napari_meshchop.training.memory import forward

SPEC = {"name": "ras-minmax", "shape": [20, 20, 20], "voxel_size": 1.0}
# Plain autograd: the lean step is tested above, and at 20^3 it is only slower.
TUNE = {"lr": 3e-3, "crop": None, "device": "cpu", "seed": 1, "activation_checkpointing": "off"}


@pytest.fixture(scope="module")
def first_model(tmp_path_factory):
    """A small MeshNet trained where only the bright blobs (kind A) are lesion."""
    out = tmp_path_factory.mktemp("first")
    config = TrainConfig(channels=8, dilations=(1, 2, 4, 2, 1), epochs=8, lr=1e-2, seed=0,
                         device="cpu", preprocess=SPEC)
    return events.run(fit(synthetic.Scans(8, seed=1), out, config)).last


@pytest.fixture(scope="module")
def corrected(tmp_path_factory):
    """Nine scans whose corrected masks hold both kinds of blob, added one by one."""
    files = tmp_path_factory.mktemp("scans")
    data = tmp_path_factory.mktemp("corrected") / "mine"
    for i in range(9):
        corrections.add(data, *synthetic.scan_file(files, f"sub-{i:02d}_T2w", 100 + i))
    return data


@pytest.mark.parametrize("mode", ["lean", "checkpoint"])
def test_frozen_batchnorm_steps_match_plain_autograd(mode):
    """BatchNorm in eval mode inside a training step: running statistics normalise and stay
    as they were; the memory-lean steps' loss and gradients equal plain autograd's."""
    torch.manual_seed(0)
    plain = MeshNet(Architecture(channels=4, dilations=(1, 2, 4, 1)))
    with torch.no_grad():
        for block in plain.blocks:
            block.bn.running_mean.uniform_(-0.3, 0.3)
            block.bn.running_var.uniform_(0.5, 2.0)
    other = MeshNet(plain.arch)
    other.load_state_dict(plain.state_dict())
    before = {k: v.clone() for k, v in plain.state_dict().items() if "running" in k}
    x = torch.rand(1, 1, 12, 10, 14)
    target = (x[:, 0] > 0.5).long()
    losses = []
    for model, how in ((plain, "plain"), (other, mode)):
        model.train()
        for block in model.blocks:
            block.bn.eval()
        loss = torch.nn.functional.cross_entropy(forward(model, x, how), target)
        loss.backward()
        losses.append(loss.item())
    assert losses[1] == pytest.approx(losses[0], rel=1e-6)
    scale = max(float(p.grad.abs().max()) for p in plain.parameters())
    for (name, p), q in zip(plain.named_parameters(), other.parameters()):
        torch.testing.assert_close(q.grad, p.grad, atol=1e-5 * scale, rtol=1e-4, msg=name)
    for model in (plain, other):
        for k, v in before.items():
            assert torch.equal(model.state_dict()[k], v), k
    # ... and batch statistics give another loss: the test tells the two apart.
    batch = torch.nn.functional.cross_entropy(forward(other.train(), x, mode), target)
    assert batch.item() != pytest.approx(losses[0], rel=1e-3)


def test_fine_tuning_moves_the_model_toward_the_corrections(first_model, corrected, tmp_path):
    config = finetune_config(first_model, corrected, 0, epochs=6, **TUNE)
    first = ckpt_io.load(first_model)
    assert (config.channels, config.spec) == (first.arch.channels, first.preprocess)
    assert config.batch_norm == "frozen" and config.init == str(first_model.resolve())
    seen = []
    result = events.run(finetune(config, tmp_path / "run"), seen.append)
    assert any(isinstance(e, Notice) and "starting from the weights of" in e.message
               for e in seen)
    # Held out: outer fold 0's test part, scored with both models by the evaluation core.
    comparison = result.comparison
    assert [c.subject for c in comparison.changes] == result.held_out and result.held_out
    assert comparison.mean("after") - comparison.mean("before") > 0.2, comparison.lines()
    saved = json.loads((tmp_path / "run" / "before_after.json").read_text())
    assert saved["mean_dice_change"] == pytest.approx(comparison.mean_change)
    # The new checkpoint: same network and grid, its origin recorded, BN statistics kept.
    new = ckpt_io.load(result.checkpoint)
    assert new.arch == first.arch and new.preprocess == first.preprocess
    assert new.provenance["fine_tuned_from"] == str(first_model.resolve())
    for key, value in first.state_dict.items():
        if "running" in key:
            assert torch.equal(new.state_dict[key], value), key
    assert not torch.equal(new.state_dict["head.weight"], first.state_dict["head.weight"])


def test_stop_and_resume_continue_the_same_fine_tuning(first_model, corrected, tmp_path):
    config = finetune_config(first_model, corrected, None, epochs=1, **TUNE)
    full = events.run(finetune(config, tmp_path / "full"))
    assert full.comparison is None and full.held_out == []  # every pair trained on
    steps = []
    cut = events.run(finetune(config, tmp_path / "cut", stop=lambda: len(steps) >= 4),
                     lambda e: steps.append(e) if isinstance(e, Step) else None)
    assert cut.training.stopped and cut.training.step == 4
    # Resuming needs only the folder: the run's checkpoint, pairs and recipe are its own.
    machine = TrainConfig(device="cpu", activation_checkpointing="off")
    resumed = events.run(finetune(machine, tmp_path / "cut", resume=True))
    assert resumed.training.step == full.training.step == 9
    a, b = ckpt_io.load(full.checkpoint), ckpt_io.load(resumed.checkpoint)
    for key, value in a.state_dict.items():
        torch.testing.assert_close(b.state_dict[key], value, atol=1e-6, rtol=0, msg=key)


def test_fine_tuning_refuses_a_mismatch(first_model, corrected, tmp_path):
    with pytest.raises(MeshchopError, match="frozen BatchNorm keeps a trained checkpoint"):
        events.run(fit(synthetic.Scans(1), tmp_path / "a",
                       TrainConfig(channels=2, epochs=1, device="cpu", batch_norm="frozen",
                                   preprocess=SPEC)))
    other = TrainConfig(channels=4, dilations=(1, 2, 4, 2, 1), epochs=1, device="cpu",
                        preprocess=SPEC, init=str(first_model))
    with pytest.raises(MeshchopError, match="is not the run's"):
        events.run(fit(synthetic.Scans(1), tmp_path / "b", other))
    with pytest.raises(MeshchopError, match="not a fine-tuning run"):
        events.run(finetune(TrainConfig(device="cpu", data_dir=str(corrected)), tmp_path / "c"))


def _command(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    finetune_cli.register(parser.add_subparsers())
    args = parser.parse_args(argv)
    return args.func(args)


def test_add_correction_and_finetune_commands(first_model, tmp_path, capsys):
    scan, mask = synthetic.scan_file(tmp_path, "sub-07_ses-2_T2w", 7)
    data = tmp_path / "mine"
    assert _command(["add-correction", str(scan), str(mask), "--data-dir", str(data)]) == 0
    out = capsys.readouterr().out
    assert "added sub-07_ses-2" in out and "no folds" in out
    assert _command(["add-correction", str(scan), str(mask), "--data-dir", str(data)]) == 0
    assert "replaced sub-07_ses-2" in capsys.readouterr().out
    run = tmp_path / "run"
    argv = ["finetune", str(first_model), "--data-dir", str(data), "--out", str(run),
            "--epochs", "2", "--crop", "16", "--device", "cpu", "-q"]
    assert _command(argv) == 0
    out = capsys.readouterr()
    assert "no folds" in out.err and "fine-tuned 2 epochs (2 steps)" in out.out
    config = json.loads((run / "config.json").read_text())
    assert config["lr"] == 1e-4 and config["crop"] == 16 and config["batch_norm"] == "frozen"
    assert config["outer_fold"] is None and config["channels"] == 8
    assert _command(["finetune", "--out", str(run), "--resume", "--device", "cpu", "-q"]) == 0
    assert "fine-tuned 2 epochs (2 steps)" in capsys.readouterr().out
