"""Where things are: the template's own folder, and runs/<project>/<group>/<seed>/, where
results go, with the checks made before anything is written there: results are never
overwritten, a resume never mixes two configs, and two processes never train one seed (an
exclusive mkdir for a fresh run's seeds, and engine/locks.py's flock for each seed)."""
from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING

from engine.errors import ConfigError
from engine.loader import from_mapping, load_yaml
from engine.locks import check_locks

if TYPE_CHECKING:  # types only: the engine imports none of your files when it runs
    from config import RunConfig
    from engine.trust import Untrusted

RUNS_DIR = Path("runs")                            # relative: results land where you run from
TEMPLATE_DIR = Path(__file__).resolve().parent.parent  # main.py, and the git checkout provenance reads
# The statuses of a seed that has nothing left to train (unless `epochs` is raised).
FINISHED_STATUSES = ("completed", "early_stopped", "diverged")


def name_problem(name: str) -> str | None:
    """Why `name` cannot be one folder under runs/ (a project, group or study), or None."""
    if not re.fullmatch(r"[\w.-]+", name):
        return f"must be a folder name (letters, digits, _ . -), got {name!r}"
    if name in (".", ".."):  # allowed characters, but they mean "here" and "the folder above"
        return f"must name a folder of its own, not {name!r}"
    return None


def check_group(config: RunConfig, group_dir: Path, resume: bool) -> None:
    """Refuse, before writing anything, to overwrite results or to resume another config.
    The saved config is read back only to compare (saved_config): nothing it names is imported."""
    for key, name in (("project", group_dir.parent.name), ("group", group_dir.name)):
        if name_problem(name) or group_dir.parent.parent != RUNS_DIR:  # a group given by code
            raise ConfigError(config.source, key, name_problem(name) or f"{group_dir} is not in {RUNS_DIR}/")
    if group_dir.exists() and not group_dir.is_dir():
        raise ConfigError(config.source, "project", f"{group_dir} exists and is not a folder")
    for parent in (RUNS_DIR, RUNS_DIR / config.project):
        if parent.exists() and not parent.is_dir():
            raise ConfigError(str(parent), "", "exists and is not a folder, so runs cannot be written there")
    started = [str(s) for s in config.seeds if (group_dir / str(s)).exists()]
    saved = group_dir / "config.yaml"
    if not resume:
        if started:
            raise ConfigError(config.source, "seeds",
                              f"{group_dir}/ already holds seed(s) {', '.join(started)}; results are never "
                              "overwritten: pass --resume to continue unfinished seeds (finished ones are "
                              "kept), or delete that folder to train again")
    elif not saved.exists():
        nearest = nearest_group(config, group_dir.parent)
        hint = f"; the nearest, {nearest[0]}, differs in {', '.join(nearest[1])}" if nearest else ""
        raise ConfigError(config.source, "group", f"nothing to resume at {group_dir}/{hint}")
    if saved.exists():
        differing = saved_config(config, saved).differences(config)
        if differing:
            raise ConfigError(config.source, differing[0],
                              f"{group_dir}/ was trained with a different config (differs in "
                              f"{', '.join(differing)}); only {', '.join(config.run_only_keys)} may change")
    check_locks(group_dir)  # a file system without flock fails here, before any write


def nearest_group(config: RunConfig, project_dir: Path) -> tuple[str, list[str]] | None:
    """The saved group whose config differs from `config` in the fewest keys, and those keys."""
    candidates = []
    for saved in sorted(project_dir.glob("*/config.yaml")):
        try:
            candidates.append((saved.parent.name, saved_config(config, saved).differences(config)))
        except ConfigError:
            continue
    return min(candidates, key=lambda c: len(c[1])) if candidates else None


def saved_config(config: RunConfig, path: Path) -> RunConfig:
    """A saved config, read with the class of `config` only to compare with it: typed and checked
    like any file, but nothing it names is imported, so a folder copied in runs no code."""
    return from_mapping(type(config), load_yaml(path), str(path))


def untrusted(folder: Path, hint: str = "pass --trust if you trust this folder") -> Untrusted:
    """How a config read from the run folder `folder` is checked (engine/resolve.py): the
    project's own code is what lies under the template's folder and the current one (which
    main.py and analyze.py put on sys.path, and where users keep their models); runs/ holds
    results, never code."""
    from engine.trust import Untrusted
    return Untrusted(folder, (TEMPLATE_DIR, Path.cwd()), RUNS_DIR, hint)


def claim_seeds(config: RunConfig, group_dir: Path) -> None:
    """Make a fresh run's seed folders, each with an exclusive mkdir: of two processes that both
    passed check_group (two identical commands started together), exactly one gets them."""
    made = []
    for seed in config.seeds:
        try:
            (group_dir / str(seed)).mkdir()
        except FileExistsError:
            for folder in made:
                folder.rmdir()
            raise ConfigError(config.source, "seeds", f"{group_dir}/{seed} was just made by another process "
                              "running this config; results are never overwritten (with --resume, "
                              "processes share the unfinished seeds)") from None
        made.append(group_dir / str(seed))
