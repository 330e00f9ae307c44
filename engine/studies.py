"""Where a study is, and Optuna Dashboard over it.

    url = study_storage("demo", project=None, storage=None)   # runs/*/optuna.db, or the URL given
    serve_dashboard("demo", url, port=8080)                   # http://127.0.0.1:8080/..., until Ctrl-C

A search without `storage:` keeps its study in runs/<project>/optuna.db (engine/search.py);
with one, in that URL. Reports, notebooks and the dashboard find it the same way.
"""
from __future__ import annotations

import re

from engine.errors import ConfigError
from engine.folders import RUNS_DIR


def study_storage(name: str, project: str | None, storage: str | None) -> str:
    """The URL of the storage that holds study `name`: `storage`, or else the
    runs/<project>/optuna.db that holds it (every project's when none is given)."""
    import optuna
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if storage:
        try:
            names = optuna.get_all_study_names(storage)
        except Exception as e:  # a bad URL, a missing driver, a server that does not answer
            reason = str(e).splitlines()[0] if str(e) else ""
            raise ConfigError("--storage", "", f"cannot open {hide_password(storage)}: "
                                               f"{type(e).__name__}: {reason}") from None
        places = [(storage, names)]
    else:
        found = [RUNS_DIR / project / "optuna.db"] if project else sorted(RUNS_DIR.glob("*/optuna.db"))
        databases = [db for db in found if db.exists()]
        places = [(f"sqlite:///{db}", optuna.get_all_study_names(f"sqlite:///{db}")) for db in databases]
    for url, names in places:
        if name in names:
            return url
    where = hide_password(storage) if storage else \
        ", ".join(str(db) for db in databases) or f"{RUNS_DIR}/ (no optuna.db found)"
    raise ConfigError("--study", "", f"no study '{name}' in {where}")


def find_study(name: str, project: str | None, storage: str | None):
    """The Optuna study `name`, loaded from where study_storage finds it."""
    import optuna
    return optuna.load_study(study_name=name, storage=study_storage(name, project, storage))


def hide_password(url: str) -> str:
    """An Optuna storage URL fit to print: user:secret@host becomes user:***@host."""
    return re.sub(r"(//[^/:@]+:)[^/@]+@", r"\1***@", url)


def serve_dashboard(name: str, url: str, port: int) -> None:
    """Optuna Dashboard over the storage at `url`, on 127.0.0.1 only, until Ctrl-C; prints the
    address of study `name`'s page. Port 0 takes a free one."""
    from wsgiref.simple_server import WSGIRequestHandler, make_server

    import optuna
    import optuna_dashboard

    class Quiet(WSGIRequestHandler):
        def log_message(self, format: str, *args) -> None:  # no line per request on the terminal
            pass

    storage = optuna.storages.RDBStorage(url)
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

