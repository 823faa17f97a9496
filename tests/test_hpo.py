"""The hyperparameter search: interleaved inner folds, ASHA pruning, best parameters that
`meshchop train` reads, and a killed worker's trial resumed from its checkpoints."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import optuna
import pytest

from napari_meshchop import cli, events
from napari_meshchop.cli import train as train_cli
from napari_meshchop.events import Notice
from napari_meshchop.studies import engine, hpo
from napari_meshchop.training.config import TrainConfig, load_params
from napari_meshchop.training.loop import EpochEnd, TrainResult


def tiny(data, out, *more):
    return ["hpo", "--data-dir", str(data), "--outer-fold", "0", "--channels-range", "2", "3",
            "--preprocess", "ras-minmax", "--shape", "16", "--device", "cpu", "--out",
            str(out), *more]


def load_study(path, name=hpo.STUDY):
    # What optuna-dashboard opens: Optuna's own journal storage on the file.
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(path)))
    return optuna.load_study(study_name=name, storage=storage)


def epochs_of(run_dir) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == "epoch"]


def test_folds_advance_together_and_a_poor_trial_is_pruned_early(data, tmp_path, monkeypatch):
    pumped = []  # (trial folder, fold, epoch) in the order the folds trained

    def fake_train(config, out_dir, resume=False, stop=None):
        trial = int(out_dir.parent.name)
        for epoch in range(config.epochs):
            pumped.append((trial, config.inner_fold, epoch))
            score = 0.05 if trial == 3 else 0.4 + 0.1 * trial + 0.01 * epoch + 0.02 * config.inner_fold
            yield Notice("working")
            yield EpochEnd(epoch, config.epochs, 1.0, score, 0.0)
        return TrainResult(out_dir, out_dir / "last.pt", None, config.epochs,
                                 config.epochs, False, None)

    monkeypatch.setattr(hpo, "train", fake_train)
    base = TrainConfig(data_dir=str(data), outer_fold=0, device="cpu")
    space = hpo.Space(min_epochs=1, max_epochs=8)  # rungs after 1 and 3 epochs
    job = hpo.search(base, tmp_path, trials=4, space=space)
    seen = []
    result = events.run(job, seen.append)

    study = load_study(tmp_path / hpo.JOURNAL)
    states = [t.state.name for t in study.trials]
    assert states == ["COMPLETE", "COMPLETE", "COMPLETE", "PRUNED"]
    # The poor trial trained one epoch on each fold, then stopped.
    assert [p for p in pumped if p[0] == 3] == [(3, 0, 0), (3, 1, 0)]
    # A full trial: the two folds take turns, epoch by epoch.
    assert [p[1:] for p in pumped if p[0] == 0] == [(f, e) for e in range(8) for f in (0, 1)]
    # Reports are the mean over folds after each epoch, the value that of the last one.
    t2 = study.trials[2]
    assert t2.intermediate_values == pytest.approx(
        {e + 1: 0.6 + 0.01 * e + 0.01 for e in range(8)})
    assert t2.value == pytest.approx(0.6 + 0.07 + 0.01)
    assert result.best["trial"] == 2 and result.best["value"] == pytest.approx(t2.value)
    assert sum(isinstance(e, hpo.TrialReport) for e in seen) == 3 * 8 + 1
    assert [e.state for e in seen if isinstance(e, engine.Finished)] == states


def test_search_writes_best_params_that_train_reads(data, tmp_path, capsys):
    out = tmp_path / "hpo"
    assert cli.main(tiny(data, out, "--trials", "2", "--min-epochs", "1", "--max-epochs", "2",
                         "-q")) == 0
    printed = capsys.readouterr().out
    assert "of 2 trials" in printed and "best parameters:" in printed

    study = load_study(out / hpo.JOURNAL)
    assert len(study.trials) == 2
    for t in study.trials:  # each report is the mean of the folds' own validation Dice
        folder = out / hpo.TRIALS_DIR / f"{t.number:03d}"
        per_fold = [epochs_of(folder / f"inner{j}") for j in (0, 1)]
        reported = {e: (a["val_dice"] + b["val_dice"]) / 2
                    for e, (a, b) in enumerate(zip(*per_fold), start=1)}
        assert t.intermediate_values == pytest.approx(reported)

    best = json.loads((out / hpo.BEST).read_text())
    winner = max((t for t in study.trials if t.state.name == "COMPLETE"), key=lambda t: t.value)
    assert best["trial"] == winner.number and best["value"] == pytest.approx(winner.value)
    params = load_params(out / hpo.BEST)
    assert params["channels"] == winner.params["channels"]
    assert params["class_weights"] == [winner.params["background_weight"], 1.0]

    run = tmp_path / "run"
    assert cli.main(["train", "--params", str(out / hpo.BEST), "--data-dir", str(data),
                     "--outer-fold", "0", "--inner-fold", "0", "--device", "cpu",
                     "--epochs", "1", "--out", str(run), "-q"]) == 0
    config = json.loads((run / "config.json").read_text())
    for name in ("channels", "lr", "weight_decay", "class_weights", "pct_start", "preprocess"):
        assert config[name] == params[name], name
    assert config["epochs"] == 1  # a flag on the command line beats the file

    args = cli.build_parser().parse_args(["experiment", "--params", str(out / hpo.BEST),
                                          "--out", str(tmp_path / "experiment")])
    recipe = train_cli.train_config(args, data_dir=str(data))  # what the experiment trains with
    assert (recipe.channels, recipe.lr, recipe.epochs) == (
        params["channels"], params["lr"], params["epochs"])


def test_hpo_refuses_flags_that_it_searches(data, tmp_path, capsys):
    assert cli.main(tiny(data, tmp_path, "--lr", "0.01")) == 2
    assert "searches --lr" in capsys.readouterr().err


def test_a_killed_workers_trial_resumes_from_its_checkpoints(data, tmp_path, capsys):
    out = tmp_path / "hpo"
    args = tiny(data, out, "--trials", "1", "--min-epochs", "6", "--max-epochs", "6",
                "--heartbeat", "1", "--grace", "3")
    first = subprocess.Popen([sys.executable, "-m", "napari_meshchop.cli", *args, "-q"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    folder = out / hpo.TRIALS_DIR / "000"
    deadline = time.monotonic() + 90
    while not (folder / "inner1" / "last.pt").exists():  # both folds trained an epoch
        assert first.poll() is None, first.stderr.read()
        assert time.monotonic() < deadline
        time.sleep(0.05)
    first.send_signal(signal.SIGKILL)
    first.wait()
    done = len(epochs_of(folder / "inner0"))
    assert 1 <= done < 6

    assert cli.main(args) == 0  # another worker: waits out the grace, then takes it over
    err = capsys.readouterr().err
    assert "trial 1: resumed (trial 0 was interrupted)" in err
    assert "resuming at epoch" in err
    study = load_study(out / hpo.JOURNAL)
    assert [t.state.name for t in study.trials] == ["FAIL", "COMPLETE"]
    assert sorted(study.trials[1].intermediate_values) == [1, 2, 3, 4, 5, 6]
    for j in (0, 1):  # every epoch trained once
        assert [r["epoch"] for r in epochs_of(folder / f"inner{j}")] == list(range(6))
