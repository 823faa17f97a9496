"""`meshchop train` on a tiny replica cohort; its checkpoint segments with `meshchop segment`."""

from __future__ import annotations

import json

import nibabel as nib

from napari_meshchop import cli
from napari_meshchop.data import folds, manifest
from napari_meshchop.network import checkpoint as ckpt_io


def args(data, out, *more):
    return ["train", "--data-dir", str(data), "--outer-fold", "0", "--inner-fold", "0",
            "--channels", "4", "--epochs", "2", "--device", "cpu", "--preprocess",
            "ras-minmax", "--shape", "24", "--out", str(out), "-q", *more]


def test_train_writes_checkpoints_config_and_metrics_that_segment_uses(data, tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(args(data, out, "--lr", "0.005")) == 0
    printed = capsys.readouterr().out
    assert "trained 2 epochs" in printed and "best validation Dice" in printed
    assert {"last.pt", "best.pt", "previous.pt", "config.json", "metrics.jsonl"} <= {
        p.name for p in out.iterdir()}
    config = json.loads((out / "config.json").read_text())
    assert config["lr"] == 0.005 and config["outer_fold"] == 0 and config["inner_fold"] == 0
    assert config["preprocess"] == {"name": "ras-minmax", "shape": [24, 24, 24],
                                    "voxel_size": 1.0}
    best = ckpt_io.load(out / "best.pt")
    assert best.preprocess.shape == (24, 24, 24) and best.arch.channels == 4
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    train_ids = folds.load(data).outer[0].inner[0].train
    assert [r["kind"] for r in lines].count("step") == 2 * len(train_ids)
    assert all(r["val_dice"] is not None for r in lines if r["kind"] == "epoch")

    pair = manifest.load(data).pairs[0]
    mask = tmp_path / "mask.nii.gz"
    assert cli.main(["segment", str(data / pair.image), "-o", str(mask), "--model",
                     str(out / "best.pt"), "--device", "cpu", "-q"]) == 0
    assert nib.load(mask).shape == nib.load(data / pair.image).shape

    # Resuming a finished run does nothing more and says so.
    assert cli.main(args(data, out, "--resume")) == 0
    assert "trained 2 epochs" in capsys.readouterr().out


def test_train_resume_refuses_damaged_checkpoints_clearly(data, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "last.pt").write_bytes(b"not a checkpoint")
    assert cli.main(args(data, out, "--resume")) == 2
    err = capsys.readouterr().err
    assert "no valid checkpoint to resume from" in err and "last.pt" in err


def test_train_rejects_a_missing_fold(data, tmp_path, capsys):
    assert cli.main(args(data, tmp_path, "--outer-fold", "5")) == 2
    assert "outer fold 5 does not exist" in capsys.readouterr().err


def test_ctrl_c_stops_cleanly_and_resume_finishes(data, tmp_path):
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "napari_meshchop.cli", *args(data, out)]
    cmd[cmd.index("--epochs") + 1] = "12"
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not (out / "metrics.jsonl").is_file() or not (out / "metrics.jsonl").read_text():
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr
    assert stdout.startswith("stopped") and "--resume" in stderr
    stopped_at = ckpt_io.load(out / "last.pt").training["step"]
    assert 1 <= stopped_at < 12 * len(folds.load(data).outer[0].inner[0].train)
    # The run folder knows its data, fold and recipe: --out and --resume are enough.
    assert cli.main(["train", "--out", str(out), "--resume", "--device", "cpu", "-q"]) == 0
    last = ckpt_io.load(out / "last.pt").training
    assert last["epoch"] == 12 and last["position"] == 0


def test_train_needs_an_outer_fold_unless_resuming(tmp_path, capsys):
    assert cli.main(["train", "--out", str(tmp_path / "run"), "-q"]) == 2
    assert "--outer-fold" in capsys.readouterr().err
    assert cli.main(["train", "--out", str(tmp_path / "run"), "--resume", "-q"]) == 2
    assert "no valid checkpoint to resume from" in capsys.readouterr().err
