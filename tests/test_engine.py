"""The work engine: units shared by worker processes through a journal file or PostgreSQL.

Workers are real processes (``python -c``) running a trivial unit; the PostgreSQL tests
use the server that the README's test command starts (MESHCHOP_TEST_POSTGRES).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest
from conftest import require

from napari_meshchop import events
from napari_meshchop.studies import engine

POSTGRES = "MESHCHOP_TEST_POSTGRES"

WORKER = textwrap.dedent("""
    import json, os, sys, time
    from pathlib import Path
    from napari_meshchop.studies import engine
    from napari_meshchop import events

    where, name, n, log, barrier, slow, die = sys.argv[1:8]
    log, pid = Path(log), os.getpid()
    storage = engine.open_storage(where, heartbeat=1, grace=3)
    if die == "on-claim":  # SIGKILL the moment a claim (WAITING -> RUNNING) is committed
        import signal
        from optuna.trial import TrialState

        commit = storage.set_trial_state_values

        def claim_then_die(trial_id, state, values=None):
            done = commit(trial_id, state, values)
            if done and state == TrialState.RUNNING:
                (log / f"claimed-{pid}").touch()
                os.kill(pid, signal.SIGKILL)
            return done

        storage.set_trial_state_values = claim_then_die
    study, created = engine.open_study(storage, name, [{"k": k} for k in range(int(n))],
                                       {"kind": "test"})
    (log / f"ready-{pid}").touch()
    deadline = time.monotonic() + 60
    while len(list(log.glob("ready-*"))) < int(barrier) and time.monotonic() < deadline:
        time.sleep(0.05)

    def run(trial, stop):
        k, first = engine.unit_of(trial)["k"], engine.origin(trial)
        saved = log / f"checkpoint-{first}"  # the unit's folder, shared by the workers
        resumed_from = saved.read_text() if saved.exists() else "nothing"
        (log / f"start-{k}-{pid}-{trial.number}").write_text(resumed_from)
        saved.write_text(f"half of unit {k}")
        if k == int(slow) and first == trial.number:
            time.sleep(120)  # killed meanwhile
        time.sleep(0.2)
        yield "working"
        (log / f"done-{k}-{pid}").touch()
        return float(k)

    result = events.run(engine.work(storage, study, run, poll=0.2))
    print(json.dumps({"created": created, "states": [f.state for f in result.finished]}))
""")


@pytest.fixture
def postgres_url() -> str:
    url = os.environ.get(POSTGRES)
    require(bool(url), f"a PostgreSQL server in {POSTGRES} (the README's test command "
            "starts one and sets it)")
    return url


@pytest.fixture(params=["journal", "postgres"])
def where(request, tmp_path) -> str:
    if request.param == "journal":
        return str(tmp_path / "study.journal")
    return request.getfixturevalue("postgres_url")


def worker(where, name, n, log, barrier=1, slow=-1, die="never"):
    return subprocess.Popen(
        [sys.executable, "-c", WORKER, where, name, str(n), str(log), str(barrier), str(slow),
         die],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc, timeout=60):
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
        pytest.fail(f"the worker was still working after {timeout} s: {err[-2000:]}")
    assert proc.returncode == 0, err
    return json.loads(out.strip().splitlines()[-1])


def wait_for(predicate, timeout=30.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def names(log: Path, prefix: str) -> list[list[str]]:
    return sorted(p.name.split("-")[1:] for p in log.glob(f"{prefix}-*"))


def load(where, name):
    import optuna

    return optuna.load_study(study_name=name, storage=engine.open_storage(where))


def test_two_workers_share_a_study_and_do_every_unit_exactly_once(where, tmp_path):
    log = tmp_path / "log"
    log.mkdir()
    name = f"share-{uuid.uuid4().hex[:8]}"
    a, b = worker(where, name, 8, log, barrier=2), worker(where, name, 8, log, barrier=2)
    ra, rb = finish(a), finish(b)
    assert sorted([ra["created"], rb["created"]]) == [False, True]  # one enqueued the units
    done = names(log, "done")
    assert sorted(int(k) for k, _ in done) == list(range(8))  # each unit once, none lost
    assert len({pid for _, pid in done}) == 2  # both workers took units
    assert len(list(log.glob("start-*"))) == 8  # and none was started twice
    study = load(where, name)
    units = sorted(engine.unit_of(t)["k"] for t in study.trials)
    assert units == list(range(8)) and all(t.state.name == "COMPLETE" for t in study.trials)
    assert sorted(t.value for t in study.trials) == list(range(8))


def test_a_killed_workers_unit_is_retried_by_the_other_from_its_checkpoint(where, tmp_path):
    log = tmp_path / "log"
    log.mkdir()
    name = f"kill-{uuid.uuid4().hex[:8]}"
    a = worker(where, name, 4, log, slow=0)
    wait_for(lambda: any(log.glob(f"start-0-{a.pid}-*")))  # A is inside unit 0
    b = worker(where, name, 4, log)
    wait_for(lambda: any(log.glob(f"done-*-{b.pid}")))  # B works beside it
    a.send_signal(signal.SIGKILL)
    a.wait()
    result = finish(b)
    assert "COMPLETE" in result["states"]
    done = names(log, "done")
    assert sorted(int(k) for k, _ in done) == [0, 1, 2, 3]  # every unit done once
    assert [pid for k, pid in done if k == "0"] == [str(b.pid)]  # unit 0 by B ...
    retry = next(log.glob(f"start-0-{b.pid}-*"))
    assert retry.read_text() == "half of unit 0"  # ... from what A had saved
    study = load(where, name)
    states = sorted((engine.unit_of(t)["k"], t.state.name) for t in study.trials)
    assert states == [(0, "COMPLETE"), (0, "FAIL"), (1, "COMPLETE"), (2, "COMPLETE"),
                      (3, "COMPLETE")]
    failed = next(t for t in study.trials if t.state.name == "FAIL")
    again = next(t for t in study.trials if engine.unit_of(t)["k"] == 0
                 and t.state.name == "COMPLETE")
    assert engine.origin(again) == failed.number == 0 and again.number == 4


def test_a_worker_killed_between_its_claim_and_its_first_heartbeat_loses_no_unit(where,
                                                                                  tmp_path):
    """The claim commits WAITING -> RUNNING and the worker dies at once (SIGKILL), before
    its heartbeat thread could start: the unit must still count as stale after ``grace``
    and be retried, not stay RUNNING for ever (RDBStorage ignores running trials that
    never beat)."""
    log = tmp_path / "log"
    log.mkdir()
    name = f"claim-{uuid.uuid4().hex[:8]}"
    a = worker(where, name, 2, log, die="on-claim")
    a.wait(timeout=60)
    assert a.returncode == -signal.SIGKILL and (log / f"claimed-{a.pid}").exists()
    assert not list(log.glob("start-*"))  # killed before it began the unit
    study = load(where, name)
    assert [t.state.name for t in study.trials] == ["RUNNING", "WAITING"]
    b = worker(where, name, 2, log)
    result = finish(b)  # waits for the lost unit, then does it
    assert sorted(result["states"]) == ["COMPLETE", "COMPLETE"]
    assert sorted(int(k) for k, _ in names(log, "done")) == [0, 1]
    study = load(where, name)
    states = sorted((engine.unit_of(t)["k"], t.state.name) for t in study.trials)
    assert states == [(0, "COMPLETE"), (0, "FAIL"), (1, "COMPLETE")]
    again = next(t for t in study.trials if t.number == 2)
    assert engine.unit_of(again) == {"k": 0} and engine.origin(again) == 0


def test_a_unit_that_raises_goes_back_in_the_queue_and_a_stop_leaves_it_resumable(tmp_path):
    storage = engine.open_storage(tmp_path / "s.journal", heartbeat=1)
    study, created = engine.open_study(storage, "s", [{"k": 0}, {"k": 1}], {"kind": "test"})
    assert created

    def broken(trial, stop):
        yield "start"
        raise RuntimeError("out of memory")

    with pytest.raises(RuntimeError, match="out of memory"):
        events.run(engine.work(storage, study, broken))
    waiting = [t for t in study.trials if t.state.name == "WAITING"]
    assert [engine.unit_of(t) for t in waiting] == [{"k": 1}, {"k": 0}]  # unit 0 put back
    assert engine.origin(waiting[-1]) == 0

    from napari_meshchop.errors import Cancelled

    def stopped(trial, stop):
        yield "start"
        raise Cancelled()

    result = events.run(engine.work(storage, study, stopped))
    assert result.stopped and [f.state for f in result.finished] == ["REQUEUED"]
    assert engine.counts(study).waiting == 2  # nothing lost

    def fine(trial, stop):
        yield "start"
        return 1.0

    result = events.run(engine.work(storage, study, fine))
    assert sorted(f.unit["k"] for f in result.finished) == [0, 1]
    c = engine.counts(study)
    assert (c.complete, c.waiting, c.running) == (2, 0, 0)


def test_a_unit_taken_over_by_another_worker_stops_and_its_result_is_dropped(tmp_path):
    storage = engine.open_storage(tmp_path / "s.journal", heartbeat=1)
    study, _ = engine.open_study(storage, "s", [{"k": 0}], {"kind": "test"})

    def slow(trial, stop):  # meanwhile another worker judged this one dead
        import optuna

        tid = engine.trial_id(storage, study, trial.number)
        storage.set_trial_state_values(tid, optuna.trial.TrialState.FAIL)
        engine.requeue(study, storage.get_trial(tid), retry=True)
        deadline = time.monotonic() + 10
        while not stop():  # the heartbeat notices within a beat
            assert time.monotonic() < deadline
            time.sleep(0.05)
            yield "working"
        from napari_meshchop.errors import Cancelled

        raise Cancelled()

    job = engine.work(storage, study, slow, wait=False)
    seen = []
    while True:
        event = next(job)
        seen.append(event)
        if isinstance(event, engine.Finished):
            break
    job.close()
    assert seen[-1].state == "LOST"
    assert [t.state.name for t in study.trials] == ["FAIL", "WAITING"]  # back in the queue


def test_joining_a_study_made_for_other_work_is_refused(tmp_path):
    storage = engine.open_storage(tmp_path / "s.journal")
    engine.open_study(storage, "s", [{"k": 0}], {"kind": "hpo", "outer_fold": 0})
    with pytest.raises(engine.MeshchopError, match="outer_fold differ"):
        engine.open_study(storage, "s", [{"k": 0}], {"kind": "hpo", "outer_fold": 1})


def test_storage_names_its_problems(tmp_path):
    with pytest.raises(engine.MeshchopError, match="is a folder"):
        engine.open_storage(tmp_path)
    with pytest.raises(engine.MeshchopError, match="localhost:1/db: cannot open the study"):
        engine.open_storage("postgresql://me:secret@localhost:1/db")  # nothing listens there
    assert engine.redact("postgresql://me:secret@db.lab/hpo") == "postgresql://me:***@db.lab/hpo"


def test_experiment_runs_shared_by_two_workers_are_each_done_once(postgres_url, tmp_path):
    import arc_replica

    from napari_meshchop.data import arc, folds

    replica = arc_replica.build(tmp_path / "replica")
    data = tmp_path / "arc"
    events.run(arc.download(data, source=replica, folds=False))
    folds.make(data, outer=2, inner=2)
    out, name = tmp_path / "experiment", f"exp-{uuid.uuid4().hex[:8]}"
    command = [sys.executable, "-m", "napari_meshchop.cli", "experiment", "--out", str(out),
               "--data-dir", str(data), "--folds", "0", "--restarts", "3", "--channels", "2",
               "--epochs", "1", "--preprocess", "ras-minmax", "--shape", "16", "--device",
               "cpu", "--storage", postgres_url, "--study", name, "--heartbeat", "2", "-q"]
    workers = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True) for _ in range(2)]
    outputs = [w.communicate(timeout=240) for w in workers]
    assert [w.returncode for w in workers] == [0, 0], outputs
    keys = ["fold0-restart0", "fold0-restart1", "fold0-restart2"]
    claimed = [line.split()[1].rstrip(":") for _, err in outputs for line in err.splitlines()
               if "claimed as trial" in line]
    assert sorted(claimed) == keys  # each run claimed once, by one of the two
    study = load(postgres_url, name)
    assert sorted(engine.unit_of(t)["run"] for t in study.trials) == keys
    assert all(t.state.name == "COMPLETE" for t in study.trials)
    for r in range(3):  # trained once: one epoch record, and its test results
        run = out / "fold0" / f"restart{r}"
        lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        assert [x["kind"] for x in lines].count("epoch") == 1
        assert (run / "results.json").is_file()
    assert "3 of 3 runs done" in (out / "report.md").read_text()
