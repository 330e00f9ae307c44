"""Where a study is, and Optuna Dashboard over it.

    url = study_storage("demo", project=None, storage=None)   # runs/*/optuna.db, or the URL given
    serve_dashboard("demo", url, port=8080)                   # http://127.0.0.1:8080/..., until Ctrl-C

A search without `storage:` keeps its study in runs/<project>/optuna.db (engine/search.py),
or on a Slurm cluster in runs/<project>/optuna.journal (engine/slurm.py); with one, in that
URL or journal file. Reports, notebooks and the dashboard find it the same way.
"""
from __future__ import annotations

import re

from engine.errors import ConfigError
from engine.folders import RUNS_DIR


def storage_at(url: str, **heartbeats):
    """The Optuna storage a URL names; a path ending in .journal is Optuna's journal file (no
    server, and safe on a shared file system). `heartbeats`: RDBStorage's heartbeat settings."""
    import optuna
    if url.endswith(".journal"):
        from optuna.storages.journal import JournalFileBackend, JournalStorage
        return JournalStorage(JournalFileBackend(url))
    return optuna.storages.RDBStorage(url, **heartbeats)


def study_storage(name: str, project: str | None, storage: str | None) -> str:
    """The URL of the storage that holds study `name`: `storage`, or else the
    runs/<project>/optuna.db or optuna.journal that holds it (every project's when none is given)."""
    import optuna
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if storage:
        try:
            names = optuna.get_all_study_names(storage_at(storage))
        except Exception as e:  # a bad URL, a missing driver, a server that does not answer
            reason = str(e).splitlines()[0] if str(e) else ""
            raise ConfigError("--storage", "", f"cannot open {hide_password(storage)}: "
                                               f"{type(e).__name__}: {reason}") from None
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
    return re.sub(r"(//[^/:@]+:)[^/@]+@", r"\1***@", url)


def serve_dashboard(name: str, url: str, port: int) -> None:
    """Optuna Dashboard over the storage at `url`, on 127.0.0.1 only, until Ctrl-C; prints the
    address of study `name`'s page. Port 0 takes a free one."""
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
    with server:
        print(f"Optuna Dashboard for study {name} ({hide_password(url)}):\n"
              f"  http://127.0.0.1:{server.server_port}/dashboard/studies/{study_id}\n"
              "Ctrl-C stops it.", flush=True)
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            pass

