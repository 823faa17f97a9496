"""Work shared by processes and machines: an Optuna study used as a queue of units.

A *unit* is one piece of long work: a trial of the hyperparameter search, or one run of
the experiment protocol. The study's creator enqueues every unit once, as a WAITING
trial, and marks the plan complete; workers claim units by the storage's atomic
WAITING -> RUNNING transition (the one ``Study.ask`` uses), so no unit runs twice. A
worker stays until the queue is empty and no unit is running anywhere, because a
running unit may still come back: each worker beats a heartbeat while it works, and a
unit whose worker stopped beating for ``grace`` seconds (killed, machine lost) is marked
failed and enqueued again with the same unit (Optuna's heartbeat-stale retry), for any
worker to resume from the unit's checkpoints. A worker beats for a unit *before* it
claims it: ``RDBStorage`` never counts a running trial without any heartbeat as stale, so
a worker killed between its claim and a first beat would otherwise leave its unit
RUNNING for ever.

Optuna's GridSampler is not used for the grid of runs: its documentation says that
concurrent workers may evaluate the same grid point more than once.

Storage: a journal file (Optuna's ``JournalFileBackend``; safe for processes sharing one
machine, no server) or any SQLAlchemy URL (PostgreSQL for several machines). Optuna's
heartbeat is built into its RDB storage only; :class:`optuna_adapter.HeartbeatJournal`
gives the journal file the same heartbeat interface (through Optuna's private API, kept
in that one module), so that both go through ``optuna.storages.fail_stale_trials`` and
the same retry callback. The engine works on the storage object that
:func:`open_storage` returns (the study does not expose its own).
"""

from __future__ import annotations

import os
import threading
import time
import warnings
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from napari_meshchop.errors import Cancelled, MeshchopError
from napari_meshchop.events import Claimed, Finished, StopFlag, Waiting, stop_requested

HEARTBEAT = 60  # seconds between a worker's signs of life
GRACE_BEATS = 3  # beats missed after which a worker counts as dead (default grace)
MAX_RETRY = 3  # times a unit is put back after its worker died or it raised
PLAN_WAIT = 120  # seconds a joining worker waits for the study's creator to enqueue units
UNIT = "unit"  # the trial user attribute that says which unit a trial is
PLANNED = "meshchop:units"  # study user attribute, set once every unit is enqueued


def _optuna():
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed")
    return optuna


def is_url(where: str | os.PathLike) -> bool:
    return "://" in str(where)


def redact(where: str | os.PathLike) -> str:
    """A storage for messages and files: a URL without its password."""
    if not is_url(where):
        return str(where)
    from sqlalchemy.engine import make_url

    try:
        return make_url(str(where)).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - a malformed URL is reported when opened
        return str(where).split("@")[-1]


def _driver_url(url: str) -> str:
    """``postgresql://`` means psycopg2 to SQLAlchemy; use psycopg 3 when that is what is
    installed (the project's test extra installs psycopg 3)."""
    if url.startswith("postgresql://") or url.startswith("postgres://"):
        try:
            import psycopg2  # noqa: F401
        except ImportError:
            return "postgresql+psycopg://" + url.split("://", 1)[1]
    return url


def open_storage(where: str | os.PathLike, heartbeat: int = HEARTBEAT, grace: int | None = None,
                 max_retry: int | None = MAX_RETRY):
    """A storage with heartbeats: a SQLAlchemy URL (``postgresql://user:pw@host/db``) or
    the path of a journal file (made if missing)."""
    optuna = _optuna()
    from optuna.storages import RetryHeartbeatStaleTrialCallback

    grace = grace or GRACE_BEATS * heartbeat
    retry = RetryHeartbeatStaleTrialCallback(max_retry, inherit_intermediate_values=True)
    if is_url(where):
        from sqlalchemy import exc as sql

        url = _driver_url(str(where))
        for attempt in range(5):
            try:
                return optuna.storages.RDBStorage(
                    url, engine_kwargs={"pool_pre_ping": True}, heartbeat_interval=heartbeat,
                    grace_period=grace, heartbeat_stale_trial_callback=retry)
            except ImportError as exc:
                raise MeshchopError(f"{redact(where)}: the database driver is missing ({exc}); "
                                    "for PostgreSQL: pip install \"psycopg[binary]\"") from None
            except (sql.IntegrityError, sql.ProgrammingError, sql.InternalError):
                if attempt == 4:  # first workers racing to create the tables: try again
                    raise
                time.sleep(0.5 + attempt)
            except Exception as exc:  # noqa: BLE001 - cannot connect, bad URL: say so
                raise MeshchopError(f"{redact(where)}: cannot open the study database "
                                    f"({str(exc).splitlines()[0]})") from None
    path = Path(where)
    if path.is_dir():
        raise MeshchopError(f"{path}: is a folder; give the study's journal file "
                            "(for example runs/hpo/study.journal) or a database URL")
    path.parent.mkdir(parents=True, exist_ok=True)
    from optuna.storages.journal import JournalFileBackend

    # imported here with Optuna, which the engine defers until a study is opened
    from napari_meshchop.studies.optuna_adapter import HeartbeatJournal

    return HeartbeatJournal(JournalFileBackend(str(path)), heartbeat, grace, retry)


# ---- the queue -------------------------------------------------------------------------------

def open_study(storage, name: str, units: list[dict], meta: dict, sampler=None, pruner=None,
               direction: str = "maximize", wait: float = PLAN_WAIT):
    """Create the study and enqueue ``units``, or join it; return ``(study, created)``.

    Creating a study of a given name succeeds in one process only (the storage refuses
    a second), so only that process enqueues, once; then it sets :data:`PLANNED`.
    A joining worker waits up to ``wait`` seconds for that mark, and refuses a study
    made for other work (``meta`` differs).
    """
    import json

    optuna = _optuna()
    meta = json.loads(json.dumps(meta))  # as stored: tuples become lists
    try:
        study = optuna.create_study(storage=storage, study_name=name, sampler=sampler,
                                    pruner=pruner, direction=direction)
    except optuna.exceptions.DuplicatedStudyError:
        study = optuna.load_study(study_name=name, storage=storage, sampler=sampler,
                                  pruner=pruner)
        deadline = time.monotonic() + wait
        while PLANNED not in study.user_attrs:
            if time.monotonic() > deadline:
                raise MeshchopError(
                    f"study {name!r} exists but its units were never all enqueued (its "
                    "creator stopped while starting); delete it (optuna delete-study "
                    f"--study-name {name} --storage ...) and start again") from None
            time.sleep(0.2)
        theirs = study.user_attrs.get("meta", {})
        differ = sorted(k for k in set(meta) | set(theirs) if meta.get(k) != theirs.get(k))
        if differ:
            raise MeshchopError(
                f"study {name!r} was made for other work: {', '.join(differ)} differ "
                f"(the study has {', '.join(f'{k}={theirs.get(k)!r}' for k in differ)}); "
                "give the same options or another --study name")
        return study, False
    study.set_user_attr("meta", meta)
    for unit in units:
        study.enqueue_trial({}, user_attrs={UNIT: unit})
    study.set_user_attr(PLANNED, len(units))
    return study, True


def frozen(trial):
    """A trial's record as stored now (a ``FrozenTrial`` is returned as it is)."""
    if isinstance(trial, _optuna().trial.FrozenTrial):
        return trial
    (found,) = [t for t in trial.study.get_trials(deepcopy=False) if t.number == trial.number]
    return found


def trial_id(storage, study, number: int) -> int:
    """The storage's id of trial ``number`` of ``study`` (what the storage's methods take)."""
    return storage.get_trial_id_from_study_id_trial_number(
        storage.get_study_id_from_name(study.study_name), number)


def unit_of(trial) -> dict:
    """The unit a trial (or frozen trial) runs."""
    return dict(frozen(trial).user_attrs.get(UNIT, {}))


def origin(trial) -> int:
    """The number of the first trial of this unit (retries keep it): names its folders."""
    record = frozen(trial)
    return record.system_attrs.get("failed_trial", record.number)


@dataclass
class Counts:
    planned: int
    waiting: int
    running: int
    complete: int
    pruned: int
    failed: int  # trials that failed, including those put back as another trial

    @property
    def finished(self) -> int:
        return self.complete + self.pruned


def counts(study) -> Counts:
    from optuna.trial import TrialState as S

    trials = study.get_trials(deepcopy=False)
    n = {s: sum(t.state == s for t in trials) for s in S}
    return Counts(int(study.user_attrs.get(PLANNED, 0)), n[S.WAITING], n[S.RUNNING],
                  n[S.COMPLETE], n[S.PRUNED], n[S.FAIL])


# ---- events ----------------------------------------------------------------------------------

@dataclass
class WorkResult:
    finished: list[Finished] = field(default_factory=list)
    stopped: bool = False
    counts: Counts | None = None


# ---- heartbeat ---------------------------------------------------------------------------------

class Heartbeat:
    """Beat for a trial in a thread while it runs; notice when it was taken away (failed
    as stale by another worker, which then re-enqueued it): ``lost`` is set, and the unit
    should stop, its result being dropped."""

    def __init__(self, storage, trial_id: int):
        self.storage, self.trial_id = storage, trial_id
        self.interval = heartbeat_interval(storage)
        self.lost = threading.Event()
        self._done = threading.Event()
        self._thread = None

    def _run(self) -> None:
        from optuna.trial import TrialState

        while True:
            try:
                if self.storage.get_trial(self.trial_id).state != TrialState.RUNNING:
                    self.lost.set()
                    return
                self.storage.record_heartbeat(self.trial_id)
            except Exception:  # noqa: BLE001 - a database hiccup; the next beat retries
                pass
            if self._done.wait(self.interval):
                return

    def __enter__(self) -> Heartbeat:
        if self.interval:
            self.storage.record_heartbeat(self.trial_id)
            self._thread = threading.Thread(target=self._run, daemon=True,
                                            name=f"heartbeat-{self.trial_id}")
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._done.set()
        if self._thread is not None:
            self._thread.join()


def heartbeat_interval(storage) -> int | None:
    """Seconds between beats, or None for a storage without Optuna's heartbeat."""
    get = getattr(storage, "get_heartbeat_interval", None)
    return get() if get is not None else None


# ---- the worker loop -------------------------------------------------------------------------

def claim(storage, study):
    """The first WAITING trial that this process manages to switch to RUNNING, as
    ``(trial, its storage id)``, or None.

    The trial gets a heartbeat *before* the switch, so that there is no moment at which
    it is RUNNING without one: a worker killed right after its claim leaves a unit that
    turns stale after ``grace`` (RDBStorage skips running trials that never beat).
    """
    optuna = _optuna()
    from optuna.trial import TrialState

    beating = heartbeat_interval(storage) is not None
    for t in study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
        tid = trial_id(storage, study, t.number)
        try:
            if beating:
                storage.record_heartbeat(tid)
            if storage.set_trial_state_values(tid, state=TrialState.RUNNING):
                return optuna.Trial(study, tid), tid
        except optuna.exceptions.UpdateFinishedTrialError:
            continue
    return None


def requeue(study, record, retry: bool) -> bool:
    """Put a failed unit (its ``FrozenTrial``) back in the queue as a new WAITING trial
    (with its parameters, attributes and reports); ``retry`` counts it against
    :data:`MAX_RETRY`."""
    optuna = _optuna()
    attrs = {"failed_trial": record.number, "retry_history": [], **record.system_attrs}
    attrs.pop("heartbeat", None)  # the journal's beat (optuna_adapter.HEARTBEAT_ATTR)
    if retry:
        attrs["retry_history"] = [*attrs["retry_history"], record.number]
        if len(attrs["retry_history"]) > MAX_RETRY:
            return False
    study.add_trial(optuna.trial.create_trial(
        state=optuna.trial.TrialState.WAITING, params=record.params,
        distributions=record.distributions, user_attrs=record.user_attrs,
        system_attrs=attrs, intermediate_values=record.intermediate_values))
    return True


def _settle(storage, study, trial, tid: int, state: str, value) -> str:
    """Record how a unit ended; "LOST" when another worker failed it as stale meanwhile
    (it is then already back in the queue and this result is dropped)."""
    optuna = _optuna()
    from optuna.trial import TrialState

    try:
        if storage.get_trial(tid).state != TrialState.RUNNING:
            return "LOST"
        if state == "COMPLETE":
            study.tell(trial, float(value))
        elif state == "PRUNED":
            study.tell(trial, state=TrialState.PRUNED)
        else:
            study.tell(trial, state=TrialState.FAIL)
            requeue(study, storage.get_trial(tid), retry=state == "FAIL")
    except optuna.exceptions.UpdateFinishedTrialError:
        return "LOST"
    return state


RunUnit = Callable[[Any, Callable[[], bool]], Generator[Any, None, float]]


def work(storage, study, run_unit: RunUnit, stop: StopFlag = None, poll: float | None = None,
         wait: bool = True) -> Generator[Any, None, WorkResult]:
    """Claim and run units of ``study`` (opened on ``storage``, as :func:`open_storage`
    returned it) until none is waiting or running anywhere.

    ``run_unit(trial, stop)`` is a generator that yields events (passed on), checks
    ``stop`` and returns the unit's value; it may raise ``optuna.TrialPruned`` (the unit
    ends pruned) or :class:`Cancelled` when stopped (the unit goes back to the queue for
    a later resume). Any other error puts the unit back as a retry and is raised.
    ``wait=False`` returns as soon as nothing is waiting, leaving others' units alone.
    """
    optuna = _optuna()
    poll = poll if poll is not None else min(float(heartbeat_interval(storage) or 10), 10.0)
    result = WorkResult()
    while True:
        if stop_requested(stop):
            result.stopped = True
            break
        optuna.storages.fail_stale_trials(study)
        claimed = claim(storage, study)
        if claimed is None:
            running = counts(study).running
            if running and wait:
                yield Waiting(running)
                deadline = time.monotonic() + poll
                while time.monotonic() < deadline and not stop_requested(stop):
                    time.sleep(min(0.2, poll))
                continue
            break
        trial, tid = claimed
        first = origin(trial)
        unit = unit_of(trial)
        yield Claimed(trial.number, first, unit, resumed=first != trial.number)
        started = time.perf_counter()
        with Heartbeat(storage, tid) as beat:
            def halt() -> bool:
                return stop_requested(stop) or beat.lost.is_set()

            state, value, error = "COMPLETE", None, None
            try:
                value = yield from run_unit(trial, halt)
            except optuna.TrialPruned:
                state = "PRUNED"
            except Cancelled:
                state = "REQUEUED"
            except (KeyboardInterrupt, GeneratorExit) as exc:  # put back, then raised
                state, error = "REQUEUED", exc
            except Exception as exc:  # noqa: BLE001 - put back as a retry, then raised
                state, error = "FAIL", exc
        seconds = time.perf_counter() - started
        state = _settle(storage, study, trial, tid, state, value)
        if isinstance(error, GeneratorExit):
            raise error  # the consumer closed this generator: no more yields
        done = Finished(trial.number, first, unit, state,
                        None if value is None else float(value), seconds)
        result.finished.append(done)
        yield done
        if error is not None:
            raise error
        if state == "REQUEUED":
            result.stopped = True
            break
    result.counts = counts(study)
    return result
