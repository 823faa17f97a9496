"""`meshchop experiment`: 3 folds x 2 restarts on a tiny replica cohort, interrupted in
every way and resumed to the same numbers; Holm, Wilcoxon and the parity report."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import arc_replica
import numpy as np
import pytest
from scipy import stats

from napari_meshchop import cli, events
from napari_meshchop.data import arc, folds
from napari_meshchop.errors import Cancelled, InputError
from napari_meshchop.evaluation import evaluate, report
from napari_meshchop.evaluation.evaluate import SubjectResult
from napari_meshchop.studies import experiment
from napari_meshchop.studies import plan as plan_mod
from napari_meshchop.training.config import TrainConfig
from napari_meshchop.training.loop import Step
from napari_meshchop.training.state import find_resumable

RECIPE = ["--restarts", "2", "--epochs", "2", "--channels", "2", "--preprocess", "ras-minmax",
          "--shape", "16", "--device", "cpu"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread here and in the subprocess: the same arithmetic in both (so that
    numbers match exactly), and no thread contention on a busy machine."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    replica = arc_replica.build(tmp_path_factory.mktemp("replica"))
    folder = tmp_path_factory.mktemp("arc")
    events.run(arc.download(folder, source=replica, folds=False))
    folds.make(folder, outer=3, inner=2)  # 4 subjects: test parts of 2, 1 and 1
    return folder


def command(data, out, *more):
    return ["experiment", "--data-dir", str(data), "--out", str(out), *RECIPE, "-q", *more]


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    """An uninterrupted experiment, with ensembles."""
    out = tmp_path_factory.mktemp("reference")
    assert cli.main(command(data, out, "--ensemble")) == 0
    return out


def numbers(doc: dict) -> dict:
    """What must not depend on how the experiment was interrupted."""
    return {k: doc[k] for k in ("across_runs", "across_subjects", "per_run", "subjects")}


def assert_same_numbers(a, b) -> None:
    """Every number of ``a`` and ``b`` equal (to float rounding), every other value equal."""
    flat_a, flat_b = [], []

    def walk(x, out):
        if isinstance(x, dict):
            for k in sorted(x):
                walk(x[k], out)
        elif isinstance(x, list):
            for v in x:
                walk(v, out)
        else:
            out.append(x)
    walk(a, flat_a)
    walk(b, flat_b)
    assert len(flat_a) == len(flat_b)
    for x, y in zip(flat_a, flat_b):
        if isinstance(x, float) and isinstance(y, float):
            assert x == pytest.approx(y, rel=1e-6, abs=1e-9)
        else:
            assert x == y


def test_plan_lists_independent_runs_with_stable_keys_and_seeds():
    config = TrainConfig(channels=16, epochs=3, data_dir="data/arc", seed=42)
    made = plan_mod.plan(config, folds=(0, 1, 2), restarts=3)
    assert [r.key for r in made.runs] == [f"fold{k}-restart{r}" for k in range(3)
                                          for r in range(3)]
    assert [r.seed for r in made.runs] == [42, 43, 44] * 3
    run = made.run("fold2-restart1")
    assert (run.fold, run.restart, run.seed) == (2, 1, 43)
    assert run.folder("OUT").as_posix() == "OUT/fold2/restart1"
    c = made.run_config(run)
    assert (c.outer_fold, c.full_outer, c.inner_fold, c.seed, c.channels, c.epochs) == (
        2, True, None, 43, 16, 3)
    assert os.path.isabs(made.config.data_dir)
    again = plan_mod.Plan.from_dict(json.loads(json.dumps(made.to_dict())))
    assert again.identity() == made.identity() and again.runs == made.runs
    with pytest.raises(Exception, match="restarts"):
        plan_mod.plan(config, restarts=0)
    with pytest.raises(Exception, match="distinct"):
        plan_mod.plan(config, folds=(0, 0))


def test_experiment_writes_runs_results_ensembles_and_report(data, reference):
    plan = plan_mod.load_plan(reference)
    assert len(plan.runs) == 6 and plan.config.full_outer and plan.config.channels == 2
    by_run = {}
    for run in plan.runs:
        folder = run.folder(reference)
        assert {"last.pt", "config.json", "metrics.jsonl", "results.json"} <= {
            p.name for p in folder.iterdir()}
        assert json.loads((folder / "config.json").read_text())["seed"] == run.seed
        records = json.loads((folder / "results.json").read_text())["records"]
        # Tested on the fold's test set, trained on its whole training set.
        assert [r["subject"] for r in records] == folds.fold_ids(data, run.fold, "test")
        steps = [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()]
        assert sum(s["kind"] == "step" for s in steps) == 2 * len(folds.load(data).outer[
            run.fold].train)
        by_run[run.key] = records
        assert experiment.load_run(reference, run).mean("mcc") == pytest.approx(
            np.mean([r["mcc"] for r in records]))
    doc = json.loads((reference / report.REPORT_JSON).read_text())
    assert doc["complete"] and doc["runs"]["complete"] == 6 and not doc["runs"]["missing"]
    # A subject's score: the mean over its fold's two restarts; then over subjects.
    for subject, s in doc["subjects"].items():
        rows = [r for key, rs in by_run.items() for r in rs if r["subject"] == subject]
        assert len(rows) == 2 == s["runs"]
        assert s["macro_dice"] == pytest.approx(np.mean([r["macro_dice"] for r in rows]))
    assert doc["across_subjects"]["mcc"]["n"] == 4
    assert doc["across_subjects"]["mcc"]["mean"] == pytest.approx(
        np.mean([s["mcc"] for s in doc["subjects"].values()]))
    # A run's score: the mean over its test subjects; then mean (SD) over the runs.
    run_means = [np.mean([r["mcc"] for r in rs]) for rs in by_run.values()]
    assert doc["across_runs"]["mcc"]["n"] == 6
    assert doc["across_runs"]["mcc"]["mean"] == pytest.approx(np.mean(run_means))
    assert doc["across_runs"]["mcc"]["sd"] == pytest.approx(np.std(run_means, ddof=1))
    # Each fold's restarts as one ensemble, through the same evaluation core.
    assert doc["ensemble"]["folds"] == [0, 1, 2]
    assert set(doc["ensemble"]["subjects"]) == set(doc["subjects"])
    fold0 = json.loads((reference / "fold0" / "ensemble" / "results.json").read_text())
    assert fold0["config"]["experiment"]["members"] == ["fold0-restart0", "fold0-restart1"]
    assert doc["paper"] is None and "no row for 2 channels" in (
        reference / report.REPORT_MD).read_text()


def test_stop_flag_mid_run_then_resume_gives_the_same_numbers(data, reference, tmp_path):
    out = tmp_path / "exp"
    plan = plan_mod.load_plan(reference)
    steps = []

    def session(stop_after: int | None):
        stop = threading.Event()

        def on_event(event):
            if isinstance(event, Step):
                steps.append(event)
                if stop_after is not None and len(steps) >= stop_after:
                    stop.set()
        return events.run(experiment.experiment(out, plan, ensemble=True, stop=stop), on_event)

    with pytest.raises(Cancelled):
        session(3)  # mid-epoch 2 of fold0-restart0 (2 training subjects)
    first = plan.runs[0]
    assert find_resumable(first.folder(out))[0].training["step"] == 3
    assert experiment.load_run(out, first) is None
    with pytest.raises(Cancelled):
        session(14)  # the last step of fold1-restart0: the stop lands in its evaluation
    assert experiment.load_run(out, first) is not None
    assert experiment.load_run(out, plan.run("fold1-restart1")) is None
    doc = session(None)
    # Nothing was trained twice: the steps of all sessions are those of one experiment.
    assert len(steps) == 2 * 2 * sum(len(folds.load(data).outer[k].train) for k in range(3))
    expected = json.loads((reference / report.REPORT_JSON).read_text())
    assert_same_numbers(numbers(doc), numbers(expected))
    assert_same_numbers(doc["ensemble"], expected["ensemble"])
    # Complete runs are skipped: a rerun trains nothing.
    again = []
    events.run(experiment.experiment(out, plan), again.append)
    assert not any(isinstance(e, Step) for e in again)


def test_ctrl_c_and_kill_then_the_same_command_finishes_with_the_same_numbers(
        data, reference, tmp_path, capsys):
    out = tmp_path / "exp"
    first_steps = out / "fold0" / "restart0" / "metrics.jsonl"

    def press_ctrl_c():  # as a user would, once the first run is training
        deadline = time.monotonic() + 120
        while not (first_steps.is_file() and first_steps.stat().st_size):
            if time.monotonic() > deadline:
                return
            time.sleep(0.01)
        os.kill(os.getpid(), signal.SIGINT)

    presser = threading.Thread(target=press_ctrl_c, daemon=True)
    presser.start()
    assert cli.main(command(data, out)) == 130
    presser.join()
    err = capsys.readouterr().err
    assert "stopped" in err and f"meshchop experiment --out {out}" in err
    assert find_resumable(out / "fold0" / "restart0")[0] is not None

    # The same command continues in another process, killed in the middle of a later run.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "napari_meshchop.cli", *command(data, out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    killed_in = out / "fold1" / "restart0" / "last.pt"
    deadline = time.monotonic() + 120
    while not killed_in.is_file():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.01)
    proc.kill()
    proc.communicate(timeout=60)
    plan = plan_mod.load_plan(out)
    assert sum(experiment.load_run(out, r) is not None for r in plan.runs) < 6

    assert cli.main(command(data, out)) == 0
    printed = capsys.readouterr()
    assert "6 of 6 runs done (complete)" in printed.out
    # From the killed run's checkpoint (after its first epoch), not from scratch.
    assert "fold1-restart0: resuming" in printed.err and "resuming at epoch 2" in printed.err
    assert_same_numbers(numbers(json.loads((out / report.REPORT_JSON).read_text())),
                        numbers(json.loads((reference / report.REPORT_JSON).read_text())))


def test_another_plan_in_the_same_folder_is_refused(data, reference, tmp_path, capsys):
    assert cli.main(command(data, reference, "--lr", "0.002")) == 2
    err = capsys.readouterr().err
    assert "another experiment" in err and "lr: 0.001 there, 0.002 now" in err
    assert str(reference / "plan.json") in err
    plan = plan_mod.load_plan(reference)
    with pytest.raises(InputError, match="restarts: 2 there, 3 now"):
        plan_mod.settle(reference, plan_mod.Plan(plan.config, plan.folds, 3))
    # The same settings on a data folder whose folds differ: another experiment too.
    moved = tmp_path / "arc"
    shutil.copytree(data, moved)
    made = json.loads((moved / "folds.json").read_text())
    made["outer"][0]["test"], made["outer"][1]["test"] = (made["outer"][1]["test"],
                                                          made["outer"][0]["test"])
    (moved / "folds.json").write_text(json.dumps(made))
    config = TrainConfig.from_dict({**plan.config.to_dict(), "data_dir": str(moved)})
    with pytest.raises(InputError, match="folds are not those it started with"):
        plan_mod.settle(reference, plan_mod.Plan(config, plan.folds, plan.restarts))
    # No recipe flags: continue the experiment there (all done: nothing is trained).
    before = (reference / "fold0" / "restart0" / "last.pt").stat().st_mtime_ns
    assert cli.main(["experiment", "--out", str(reference), "-q"]) == 0
    assert "6 of 6 runs done" in capsys.readouterr().out
    assert (reference / "fold0" / "restart0" / "last.pt").stat().st_mtime_ns == before


def test_report_only_compares_two_experiments_subject_by_subject(data, reference, tmp_path,
                                                                 capsys):
    other = tmp_path / "other"
    assert cli.main(["experiment", "--data-dir", str(data), "--out", str(other), *RECIPE,
                     "--restarts", "1", "--epochs", "1", "--seed", "7", "-q"]) == 0
    capsys.readouterr()
    assert cli.main(["experiment", "--out", str(reference), "--report-only",
                     "--compare", str(other)]) == 0
    printed = capsys.readouterr().out
    assert f"## Compared with `{other.resolve()}`" in printed and "p (Holm)" in printed
    doc = json.loads((reference / report.REPORT_JSON).read_text())
    theirs = json.loads((other / report.REPORT_JSON).read_text())
    c = doc["comparison"]
    assert c["paired_subjects"] == 4 and c["only_here"] == c["only_there"] == 0
    subjects = sorted(doc["subjects"])
    for test in c["tests"]:
        m = test["metric"]
        a = [doc["subjects"][s][m] for s in subjects]
        b = [theirs["subjects"][s][m] for s in subjects]
        expected = stats.wilcoxon(a, b)
        assert test["n"] == 4 and test["p"] == pytest.approx(expected.pvalue)
        assert test["statistic"] == pytest.approx(expected.statistic)
    assert [t["p_holm"] for t in c["tests"]] == pytest.approx(
        report.holm([t["p"] for t in c["tests"]]))
    assert (reference / report.REPORT_MD).read_text() == report.markdown(doc)


def test_holm_on_a_hand_example():
    # Sorted: 0.005 x 4 = 0.02; 0.01 x 3 = 0.03; 0.03 x 2 = 0.06; 0.04 x 1 = 0.04 -> 0.06.
    assert report.holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert report.holm([0.5, 0.2]) == pytest.approx([0.5, 0.4])
    assert report.holm([0.9, 0.8]) == pytest.approx([1.0, 1.0])  # capped at 1
    adjusted = report.holm([0.02, math.nan, 0.04])  # NaN is not a test: m = 2
    assert adjusted[0] == pytest.approx(0.04) and math.isnan(adjusted[1])
    assert adjusted[2] == pytest.approx(0.04)
    assert report.holm([]) == []


def test_wilcoxon_on_a_hand_example():
    # Differences 1, 2, 3, -4, 5: ranks 1..5, W- = 4. Exact null: 7 of the 32 sign patterns
    # have a rank sum <= 4 ({}, 1, 2, 3, 4, 1+2, 1+3), so p = 2 x 7 / 32.
    a = [1.0, 2.0, 3.0, 0.0, 5.0, 7.0]
    b = [0.0, 0.0, 0.0, 4.0, 0.0, math.nan]  # the NaN pair is dropped
    result = report.wilcoxon(a, b)
    assert result["n"] == 5 and result["statistic"] == 4.0
    assert result["p"] == pytest.approx(14 / 32)
    assert result["median_difference"] == 2.0
    assert report.wilcoxon([0.5, 0.7], [0.5, 0.7])["p"] == 1.0  # no difference at all
    assert math.isnan(report.wilcoxon([], [])["p"])


def _fake_experiment(out, channels, dice_by_run):
    """An experiment folder written by hand: one fold, one restart per entry of
    ``dice_by_run`` (lesion Dice of subjects A and B); other metrics follow from it."""
    config = TrainConfig(channels=channels, epochs=50, data_dir=str(out / "data"))
    plan = plan_mod.plan(config, folds=(0,), restarts=len(dice_by_run))
    out.mkdir()
    (out / plan_mod.PLAN).write_text(json.dumps(plan.to_dict()))
    for run, dices in zip(plan.runs, dice_by_run):
        results = [SubjectResult(s, "space_2x", i, 2,
                                 {"dice": d, "macro_dice": (d + 1) / 2, "avd": 1 - d,
                                  "mcc": 2 * d - 1, "precision": d, "recall": d,
                                  "true_ml": 10.0, "pred_ml": 10.0 * (2 - d)})
                   for i, (s, d) in enumerate(zip("AB", dices))]
        evaluate.write_results(run.folder(out), results, {"experiment": run.identity()})
    return plan


def test_parity_report_sets_the_paper_row_beside_both_dice_definitions(tmp_path):
    out = tmp_path / "exp"
    _fake_experiment(out, 26, [(0.8, 0.6), (0.9, 0.7)])
    doc = report.write(out, experiment.build_report(out))
    # Across runs: run means 0.7 and 0.8. Across subjects: A 0.85, B 0.65.
    lesion = next(r for r in doc["parity"] if r["metric"] == "dice")
    assert lesion["runs"]["mean"] == pytest.approx(0.75)
    assert lesion["runs"]["sd"] == pytest.approx(math.sqrt(0.005))
    assert lesion["subjects"]["mean"] == pytest.approx(0.75)
    assert lesion["subjects"]["sd"] == pytest.approx(math.sqrt(0.02))
    assert (lesion["paper_mean"], lesion["paper_sd"]) == (0.876, 0.016)
    assert lesion["difference"] == pytest.approx(0.75 - 0.876)
    assert doc["paper"] == {"model": "MeshNet-26", "table": "arXiv 2503.05531, Table 1",
                            "dice": [0.876, 0.016], "avd": [0.245, 0.036], "mcc": [0.76, 0.03]}
    assert [r["metric"] for r in doc["parity"]] == ["macro_dice", "dice", "avd", "mcc"]
    saved = json.loads((out / report.REPORT_JSON).read_text())
    assert saved == doc and saved["format"] == report.FORMAT
    text = (out / report.REPORT_MD).read_text()
    assert "## Parity with the paper (arXiv 2503.05531, Table 1, MeshNet-26)" in text
    assert ("| metric | paper: MeshNet-26 | this: across runs (n=2) | difference | "
            "across subjects (n=2) | median [IQR] over subjects |") in text
    assert "| Dice (macro) | 0.876 (0.016) | 0.875 (0.035) | -0.001 | 0.875 (0.071) |" in text
    assert "| Dice (lesion) | 0.876 (0.016) | 0.750 (0.071) | -0.126 | 0.750 (0.141) |" in text
    assert "| AVD | 0.245 (0.036) | 0.250 (0.071) | +0.005 |" in text
    assert "| MCC | 0.760 (0.030) | 0.500 (0.141) | -0.260 |" in text
    assert "2 of 2 runs done (complete)" in text

    # MeshNet-5's row for 5 channels; an incomplete experiment says which runs are missing.
    five = tmp_path / "five"
    plan = _fake_experiment(five, 5, [(0.8, 0.6)])
    doc = report.write(five, experiment.build_report(five))
    assert doc["paper"]["model"] == "MeshNet-5" and doc["paper"]["mcc"] == [0.708, 0.042]
    (plan.runs[0].folder(five) / "results.json").unlink()
    doc = report.write(five, experiment.build_report(five))
    assert not doc["complete"] and doc["runs"]["missing"] == ["fold0-restart0"]
    assert "Missing runs: fold0-restart0." in (five / report.REPORT_MD).read_text()
