"""The one place that reaches into Optuna's private API: a heartbeat for the journal file.

Tested with Optuna 4.9 and 5.0; pyproject.toml pins ``optuna>=4.9,<5.1`` for this module.
Check it again before widening that range.

Optuna's heartbeat (a worker's periodic sign of life, and
``optuna.storages.fail_stale_trials``, which fails the running trials whose worker stopped
beating) is built into ``RDBStorage`` only. ``fail_stale_trials`` accepts any storage that
is an instance of ``optuna.storages._heartbeat.BaseHeartbeat`` and asks it for
``_get_stale_trial_ids``; neither name is public. :class:`HeartbeatJournal` gives the
journal file that interface, so that both storages go through the same public
``fail_stale_trials`` and the same retry callback. Everything else the engine does with
Optuna is public API (the storage's methods, ``Study``, ``Trial``, ``FrozenTrial``).
"""

from __future__ import annotations

import time

from optuna.exceptions import UpdateFinishedTrialError
from optuna.storages import JournalStorage
from optuna.storages._heartbeat import (
    BaseHeartbeat,  # private: see the module docstring
)
from optuna.trial import TrialState

HEARTBEAT_ATTR = "heartbeat"  # the trial system attribute a journal beat writes


class HeartbeatJournal(JournalStorage, BaseHeartbeat):
    """A journal storage with Optuna's heartbeat interface.

    The heartbeat is a trial system attribute (seconds since the epoch, by the worker's
    clock): one journal line per beat. A running trial is stale when neither its last beat
    nor its start is within ``grace`` seconds.
    """

    def __init__(self, backend, heartbeat_interval: int, grace_period: int | None,
                 stale_trial_callback=None):
        super().__init__(backend)
        self.heartbeat_interval = heartbeat_interval
        self.grace_period = grace_period or 2 * heartbeat_interval
        self.stale_trial_callback = stale_trial_callback

    def record_heartbeat(self, trial_id: int) -> None:
        try:
            self.set_trial_system_attr(trial_id, HEARTBEAT_ATTR, time.time())
        except UpdateFinishedTrialError:
            pass  # failed as stale meanwhile: the worker's heartbeat thread notices

    def _get_stale_trial_ids(self, study_id: int) -> list[int]:  # BaseHeartbeat's hook
        now = time.time()
        stale = []
        for t in self.get_all_trials(study_id, deepcopy=False, states=(TrialState.RUNNING,)):
            started = t.datetime_start.timestamp() if t.datetime_start else 0.0
            last = max(float(t.system_attrs.get(HEARTBEAT_ATTR, 0.0)), started)
            if now - last > self.grace_period:
                stale.append(self.get_trial_id_from_study_id_trial_number(study_id, t.number))
        return stale

    def get_heartbeat_interval(self) -> int | None:
        return self.heartbeat_interval

    def get_heartbeat_stale_trial_callback(self):
        return self.stale_trial_callback
