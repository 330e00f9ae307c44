"""Where a study is, and Optuna Dashboard over it.

    url = study_storage("demo", project=None, storage=None)   # runs/*/optuna.db, or the URL given
    serve_dashboard("demo", url, port=8080)                   # http://127.0.0.1:8080/..., until Ctrl-C

A search without `storage:` keeps its study in runs/<project>/optuna.db (engine/search.py),
or on a Slurm cluster in runs/<project>/optuna.journal (engine/slurm.py); with one, in that
URL or journal file. Reports, notebooks and the dashboard find it the same way.
"""
from __future__ import annotations

import functools
import inspect
import re
import signal
import time
import warnings
from typing import Callable

from engine.errors import ConfigError, first_line
from engine.folders import RUNS_DIR

HEARTBEAT = "heartbeat"  # a running trial's system attribute in a journal: the time of its last beat


def storage_at(url: str, heartbeat_interval: int | None = None, grace_period: int | None = None,
               stale_trial_callback: Callable | None = None):
    """The Optuna storage a URL names; a path ending in .journal is Optuna's journal file (no
    server, and safe on a shared file system). With a `heartbeat_interval`, each running trial
    beats, and one silent for `grace_period` seconds (default twice the interval) is failed
    and handed to `stale_trial_callback`, on every kind of storage."""
    import optuna
    if url.endswith(".journal"):
        from optuna.storages.journal import JournalFileBackend, JournalStorage
        if heartbeat_interval is None:
            return JournalStorage(JournalFileBackend(url))
        return heartbeat_journal_storage()(JournalFileBackend(url), heartbeat_interval,
                                           grace_period or 2 * heartbeat_interval, stale_trial_callback)
    if heartbeat_interval is None:
        return optuna.storages.RDBStorage(url)
    # Optuna 4.9 renamed the callback's argument; 4.0 to 4.8 know only the old name.
    name = ("heartbeat_stale_trial_callback" if "heartbeat_stale_trial_callback" in
            inspect.signature(optuna.storages.RDBStorage).parameters else "failed_trial_callback")
    with warnings.catch_warnings():  # heartbeats are "experimental" in Optuna, and stable for years
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.storages.RDBStorage(url, heartbeat_interval=heartbeat_interval,
                                          grace_period=grace_period, **{name: stale_trial_callback})


@functools.cache
def heartbeat_journal_storage() -> type:
    """The class below, made on first use: analyze.py imports this module without optuna (--help)."""
    from optuna.storages import JournalStorage
    from optuna.storages._heartbeat import BaseHeartbeat  # the interface Optuna's optimize loop checks

    class HeartbeatJournalStorage(JournalStorage, BaseHeartbeat):
        """Optuna's journal storage with the heartbeats that its RDBStorage has (Optuna 5.1's journal
        has none, optuna/optuna#6615), so that Optuna's own optimize loop and fail_stale_trials see
        them. A beat is a journal line holding the writer's clock: `grace_period` must exceed the
        clock difference between nodes (NTP keeps it well under a second)."""

        def __init__(self, backend, heartbeat_interval: int, grace_period: int,
                     stale_trial_callback: Callable | None) -> None:
            super().__init__(backend)
            self.heartbeat_interval, self.grace_period = heartbeat_interval, grace_period
            self.stale_trial_callback = stale_trial_callback

        def record_heartbeat(self, trial_id: int) -> None:
            from optuna.exceptions import UpdateFinishedTrialError
            try:
                self.set_trial_system_attr(trial_id, HEARTBEAT, time.time())
            except UpdateFinishedTrialError:  # another worker already failed it: it thought us dead
                pass
            except OSError:  # a shared file system's hiccup: the next beat tries again
                pass

        def _get_stale_trial_ids(self, study_id: int) -> list[int]:
            from optuna.trial import TrialState
            now = time.time()
            running = self.get_all_trials(study_id, deepcopy=False, states=(TrialState.RUNNING,))
            return [t._trial_id for t in running  # one that never beat counts from its start
                    if now - t.system_attrs.get(HEARTBEAT, t.datetime_start.timestamp()) > self.grace_period]

        def get_heartbeat_interval(self) -> int | None:
            return self.heartbeat_interval

        def get_heartbeat_stale_trial_callback(self) -> Callable | None:  # Optuna >= 4.9
            return self.stale_trial_callback

        def get_failed_trial_callback(self) -> Callable | None:  # Optuna < 4.9
            return self.stale_trial_callback

    return HeartbeatJournalStorage


def study_storage(name: str, project: str | None, storage: str | None) -> str:
    """The URL of the storage that holds study `name`: `storage`, or else the
    runs/<project>/optuna.db or optuna.journal that holds it (every project's when none is given)."""
    import optuna
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if storage:
        try:
            names = optuna.get_all_study_names(storage_at(storage))
        except Exception as e:  # a bad URL, a missing driver, a server that does not answer
            raise ConfigError("--storage", "", f"cannot open {hide_password(storage)}: {first_line(e)}") \
                from None
        places = [(storage, names)]
    else:
        found = [RUNS_DIR / project / f"optuna.{kind}" for kind in ("db", "journal")] if project else \
            sorted(RUNS_DIR.glob("*/optuna.db")) + sorted(RUNS_DIR.glob("*/optuna.journal"))
        databases = [db for db in found if db.exists()]
        urls = [str(db) if db.suffix == ".journal" else f"sqlite:///{db}" for db in databases]
        places = [(url, optuna.get_all_study_names(storage_at(url))) for url in urls]
    for url, names in places:
        if name in names:
            return url
    where = hide_password(storage) if storage else \
        ", ".join(str(db) for db in databases) or f"{RUNS_DIR}/ (no optuna.db or optuna.journal found)"
    raise ConfigError("--study", "", f"no study '{name}' in {where}")


def find_study(name: str, project: str | None, storage: str | None):
    """The Optuna study `name`, loaded from where study_storage finds it."""
    import optuna
    return optuna.load_study(study_name=name, storage=storage_at(study_storage(name, project, storage)))


def hide_password(url: str) -> str:
    """An Optuna storage URL fit to print: user:secret@host becomes user:***@host."""
    return re.sub(r"^([\w+.-]+://[^:/@]*:)[^@]*@", r"\1***@", url)


def serve_dashboard(name: str, url: str, port: int) -> None:
    """Optuna Dashboard over the storage at `url`, on 127.0.0.1 only, until Ctrl-C; prints the
    address of study `name`'s page, and that every user of this machine can reach it (127.0.0.1
    is not private on a shared login node, and the dashboard has no login). Port 0 takes a free one."""
    from wsgiref.simple_server import WSGIRequestHandler, make_server

    import optuna_dashboard

    class Quiet(WSGIRequestHandler):
        def log_message(self, format: str, *args) -> None:  # no line per request on the terminal
            pass

    storage = storage_at(url)
    study_id = storage.get_study_id_from_name(name)
    # Bound here, before the address is printed: a busy port is an error, not a dead link.
    try:
        server = make_server("127.0.0.1", port, optuna_dashboard.wsgi(storage), handler_class=Quiet)
    except (OSError, OverflowError) as e:  # in use, not ours to take, or no port number
        reason = getattr(e, "strerror", None) or e
        raise ConfigError("--port", "", f"cannot listen on 127.0.0.1:{port}: {reason}") from None
    # Ctrl-C stops it, also when it was started where SIGINT is ignored (a shell's background job).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    with server:
        print(f"Optuna Dashboard for study {name} ({hide_password(url)}):\n"
              f"  http://127.0.0.1:{server.server_port}/dashboard/studies/{study_id}\n"
              "Ctrl-C stops it.\n"
              f"It has no login: every user of this machine can reach port {server.server_port} and delete "
              "studies. On a shared machine, run it on your own computer (python analyze.py --help).",
              flush=True)
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            pass

