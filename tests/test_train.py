"""The training core: recipe, memory-lean steps, exact resume, Stop, damaged checkpoints."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from napari_meshchop import events
from napari_meshchop.errors import MeshchopError
from napari_meshchop.events import Notice
from napari_meshchop.network import checkpoint as ckpt_io
from napari_meshchop.network.model import Architecture, MeshNet
from napari_meshchop.training import lean
from napari_meshchop.training.config import TrainConfig
from napari_meshchop.training.loop import Step, fit
from napari_meshchop.training.memory import (
    activation_bytes,
    choose_mode,
    forward,
    trainable_device,
)
from napari_meshchop.training.sampling import epoch_order, random_crop
from napari_meshchop.training.state import find_resumable

TINY = {"channels": 4, "dilations": (1, 2, 1), "seed": 3, "device": "cpu",
        "preprocess": {"name": "ras-minmax", "shape": [16, 16, 16], "voxel_size": 1.0}}


class Phantoms(torch.utils.data.Dataset):
    """Noisy heads with one bright painted lesion each, different per index."""

    def __init__(self, n: int, shape=(16, 16, 16), seed: int = 0):
        self.items = []
        rng = np.random.default_rng(seed)
        grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij"))
        head = (grid**2).sum(0) < 0.8
        for _ in range(n):
            centre = rng.uniform(-0.35, 0.35, 3)[:, None, None, None]
            radius = rng.uniform(0.2, 0.35)
            lesion = (((grid - centre) ** 2).sum(0) < radius**2) & head
            image = 0.45 * head + 0.4 * lesion + rng.normal(0, 0.04, shape)
            self.items.append((torch.from_numpy(image.astype(np.float32)[None]),
                               torch.from_numpy(lesion.astype(np.uint8))))

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def weights(path) -> dict:
    return ckpt_io.load(path).state_dict


def assert_same_weights(a: dict, b: dict, atol=1e-6):
    assert a.keys() == b.keys()
    for k, value in a.items():
        torch.testing.assert_close(value.float(), b[k].float(), atol=atol, rtol=0, msg=k)


@pytest.mark.parametrize("mode,slab", [("lean", 32), ("lean", 5), ("checkpoint", None)])
def test_memory_lean_steps_match_plain_autograd(mode, slab, monkeypatch):
    """Same loss, gradients and BatchNorm running statistics as plain autograd, step after
    step (PyTorch issue 96136: recomputation must not update the running stats twice);
    with slabs thinner than the volume and than a dilated kernel's reach, too."""
    if slab:
        monkeypatch.setattr(lean, "SLAB", slab)
    torch.manual_seed(0)
    plain = MeshNet(Architecture(channels=4, dilations=(1, 2, 4, 1))).train()
    other = MeshNet(plain.arch).train()
    other.load_state_dict(plain.state_dict())
    # SGD, not Adam: Adam would blow the rounding noise on the gradient of a conv bias before
    # BatchNorm (truly 0) up to full-size steps, in both models differently.
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (plain, other)]
    loss_fn = torch.nn.CrossEntropyLoss(weight=torch.tensor([0.5, 1.0]), label_smoothing=0.01)
    for step in range(3):
        x = torch.rand(1, 1, 12, 10, 14)
        target = (x[:, 0] > 0.5).long()
        losses = []
        for model, opt, how in zip((plain, other), optimizers, ("plain", mode)):
            opt.zero_grad()
            loss = loss_fn(forward(model, x, how), target)
            loss.backward()
            losses.append(loss.item())
        assert losses[1] == pytest.approx(losses[0], rel=1e-6)
        # A conv bias before BatchNorm has a true gradient of 0 (rounding noise on both
        # sides): compare every gradient on the scale of the largest one.
        scale = max(float(p.grad.abs().max()) for p in plain.parameters())
        for (name, p), q in zip(plain.named_parameters(), other.parameters()):
            torch.testing.assert_close(q.grad, p.grad, atol=1e-5 * scale, rtol=1e-4, msg=name)
        for opt in optimizers:
            opt.step()
        assert_same_weights(plain.state_dict(), other.state_dict(), atol=1e-5)
    assert int(other.blocks[0].bn.num_batches_tracked) == 3


def test_memory_mode_is_chosen_when_the_volume_would_not_fit():
    cfg = TrainConfig(channels=26, memory_gb=16)
    cpu = torch.device("cpu")
    assert choose_mode(cfg, (256, 256, 256), cpu) == "lean"
    assert choose_mode(cfg, (32, 32, 32), cpu) == "plain"
    assert choose_mode(cfg, (256, 256, 256), cpu, dropout=0.1) == "checkpoint"
    cfg.activation_checkpointing = "on"
    assert choose_mode(cfg, (32, 32, 32), cpu) == "lean"
    cfg.activation_checkpointing = "off"
    assert choose_mode(cfg, (256, 256, 256), cpu) == "plain"
    # fp16 on a 16 GB GPU: a whole 256^3 volume fits only with recomputation.
    assert activation_bytes((256,) * 3, 26, 9, "lean", 2) < 16 * 2**30 \
        < activation_bytes((256,) * 3, 26, 9, "plain", 2)
    with pytest.raises(MeshchopError, match="unknown memory mode"):
        forward(MeshNet(Architecture(channels=2, dilations=(1,))), torch.zeros(1, 1, 4, 4, 4),
                      "thin")


def test_crops_are_deterministic_and_lesion_centred():
    image = torch.rand(1, 20, 20, 20)
    mask = torch.zeros(20, 20, 20, dtype=torch.uint8)
    mask[15:18, 2:4, 10:12] = 1
    a = random_crop(image, mask, 8, 1.0, np.random.default_rng([1, 2, 3]))
    b = random_crop(image, mask, 8, 1.0, np.random.default_rng([1, 2, 3]))
    assert a[0].shape == (1, 8, 8, 8) and a[1].shape == (8, 8, 8)
    assert torch.equal(a[0], b[0]) and a[1].sum() > 0
    assert epoch_order(10, 1, 0) == epoch_order(10, 1, 0)
    assert epoch_order(10, 1, 0) != epoch_order(10, 1, 1)


def test_it_learns_to_segment_held_out_phantoms(tmp_path):
    cfg = TrainConfig(channels=8, dilations=(1, 2, 4, 2, 1), epochs=6, lr=1e-2, seed=0,
                      device="cpu", crop=None,
                      preprocess=TINY["preprocess"] | {"shape": [24, 24, 24]})
    seen = []
    result = events.run(fit(Phantoms(10, (24,) * 3, seed=1), tmp_path, cfg,
                            Phantoms(4, (24,) * 3, seed=2)), seen.append)
    assert not result.stopped and result.epochs_done == 6
    assert result.best_dice >= 0.8, result.history
    assert {type(e).__name__ for e in seen} >= {"Step", "EpochEnd", "CheckpointWritten"}
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert sum(r["kind"] == "step" for r in records) == 60
    assert sum(r["kind"] == "epoch" for r in records) == 6
    assert json.loads((tmp_path / "config.json").read_text())["lr"] == 1e-2
    best = ckpt_io.load(tmp_path / "best.pt")
    assert best.preprocess.shape == (24, 24, 24) and best.arch.channels == 8


def _run(out, epochs=3, resume=False, stop=None, n=6, **over):
    cfg = TrainConfig(epochs=epochs, **(TINY | over))
    return events.run(fit(Phantoms(n), out, cfg, Phantoms(2, seed=9), resume, stop))


def test_stop_ends_within_a_step_and_resume_continues_exactly(tmp_path):
    full = _run(tmp_path / "full")
    steps = []

    def stop():
        return len(steps) >= 8  # mid epoch 2 (6 steps per epoch)

    job = fit(Phantoms(6), tmp_path / "cut", TrainConfig(epochs=3, **TINY),
                    Phantoms(2, seed=9), stop=stop)
    result = events.run(job, lambda e: steps.append(e) if isinstance(e, Step) else None)
    assert result.stopped and result.step == 8 and len(steps) == 8
    assert ckpt_io.load(tmp_path / "cut" / "last.pt").training["position"] == 2
    resumed = _run(tmp_path / "cut", resume=True)
    assert not resumed.stopped and resumed.step == full.step == 18
    assert_same_weights(weights(full.last), weights(resumed.last))
    logged = (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["kind"] for x in logged].count("step") == 18


def test_stop_during_validation_keeps_the_epoch_and_resume_validates_it(tmp_path):
    full = _run(tmp_path / "full", epochs=2)
    steps = []
    job = fit(Phantoms(6), tmp_path / "cut", TrainConfig(epochs=2, **TINY),
                    Phantoms(2, seed=9), stop=lambda: len(steps) >= 6)  # at epoch 1's end
    result = events.run(job, lambda e: steps.append(e) if isinstance(e, Step) else None)
    assert result.stopped and result.step == 6 and result.history == []
    resumed = _run(tmp_path / "cut", epochs=2, resume=True)
    assert resumed.step == 12
    assert [h["val_dice"] for h in resumed.history] == [h["val_dice"] for h in full.history]
    assert_same_weights(weights(full.last), weights(resumed.last))


def test_damaged_checkpoint_is_reported_and_never_resumed(tmp_path):
    _run(tmp_path, epochs=2)
    last = tmp_path / "last.pt"
    last.write_bytes(last.read_bytes()[:1000])  # truncated
    found, problems = find_resumable(tmp_path)
    assert found.training["epoch"] == 1  # previous.pt, the epoch before
    assert len(problems) == 1 and "last.pt" in problems[0]
    seen = []
    events.run(fit(Phantoms(6), tmp_path, TrainConfig(**TINY), resume=True),
               seen.append)
    assert any(isinstance(e, Notice) and "last.pt" in e.message for e in seen)
    (tmp_path / "last.pt").write_bytes(b"garbage")
    (tmp_path / "previous.pt").write_bytes(b"")
    with pytest.raises(MeshchopError, match="no valid checkpoint.*last.pt"):
        events.run(fit(Phantoms(6), tmp_path, TrainConfig(**TINY), resume=True))


def test_resume_after_sigkill_mid_epoch_equals_an_uninterrupted_run(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent)}
    cmd = [sys.executable, __file__, str(tmp_path / "killed")]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env={**env, "KILL_ME": "1"})
    for line in proc.stdout:  # wait until it is a step into epoch 2
        if line.startswith("step 8"):
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert ckpt_io.load(tmp_path / "killed" / "last.pt").training["epoch"] == 1
    subprocess.run([*cmd, "--resume"], check=True, env=env, timeout=120,
                   stdout=subprocess.DEVNULL)
    # The same run uninterrupted, in a process set up the same way (1 thread).
    subprocess.run([sys.executable, __file__, str(tmp_path / "full")], check=True, env=env,
                   timeout=120, stdout=subprocess.DEVNULL)
    assert_same_weights(weights(tmp_path / "full" / "last.pt"),
                        weights(tmp_path / "killed" / "last.pt"))


def _main(out: str, resume: bool) -> None:
    torch.set_num_threads(1)
    cfg = TrainConfig(epochs=4, **TINY)
    job = fit(Phantoms(6), out, cfg, Phantoms(2, seed=9), resume)

    def report(event):
        if isinstance(event, Step):
            print(f"step {event.done}", flush=True)
            if event.done >= 7 and os.environ.get("KILL_ME"):
                time.sleep(0.5)  # give the test time to kill it here, mid epoch 2

    events.run(job, report)


if __name__ == "__main__":
    _main(sys.argv[1], "--resume" in sys.argv)


def test_a_device_that_cannot_train_falls_back_to_the_cpu():
    """The MPS probe: where a tiny training step fails (here: no MPS at all), use the CPU."""
    arch = Architecture(channels=2, dilations=(1, 2))
    if torch.backends.mps.is_available():
        pytest.skip("this machine has a working MPS device")
    device, problem = trainable_device(torch.device("mps"), arch)
    assert device.type == "cpu" and problem.startswith("MPS cannot train MeshNet here")
    assert trainable_device(torch.device("cpu"), arch) == (torch.device("cpu"), None)
