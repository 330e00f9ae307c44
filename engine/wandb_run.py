"""One wandb run per seed, for the seed's whole life (a resumed seed continues its run).
Online only with credentials, so that wandb never prompts or hangs; offline otherwise."""
from __future__ import annotations

import os
import secrets
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # types only: the engine imports none of your files when it runs
    from config import RunConfig


def wandb_mode(mode: str) -> str:
    """auto = online only when credentials exist (WANDB_API_KEY or ~/.netrc), else offline."""
    if mode != "auto":
        return mode
    if os.environ.get("WANDB_MODE") in ("online", "offline", "disabled"):
        return os.environ["WANDB_MODE"]
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    try:
        import netrc
        if netrc.netrc().authenticators("api.wandb.ai"):
            return "online"
    except (OSError, netrc.NetrcParseError):
        pass
    return "offline"


def start(config: RunConfig, group: str, seed: int, tags: tuple[str, ...], run_dir: Path,
          labels: dict | None = None) -> Any:
    """The seed's wandb run, or None when wandb is disabled. `labels` go into the run's config
    beside the group and seed (a search trial's study and trial number)."""
    mode = wandb_mode(config.wandb.mode)
    if mode == "disabled":
        return None
    import wandb  # imported only when used: it costs start-up time
    id_file = run_dir / "wandb_id"
    if not id_file.exists():
        id_file.write_text(secrets.token_hex(4))
    return wandb.init(
        project=config.project, entity=config.wandb.entity, group=group, name=f"{group}/{seed}",
        id=id_file.read_text().strip(), resume="allow",
        tags=[config.net.rsplit(".", 1)[-1], *config.wandb.tags, *tags],
        # The group actually used (a config's `group` is null when it is the default name).
        config={**config.to_dict(), "group": group, "seed": seed, "config_hash": config.config_hash(),
                **(labels or {})},
        mode=mode,
        dir=os.environ.get("WANDB_DIR") or str(run_dir.parent),  # offline files sit beside the run
        settings=wandb.Settings(silent=True, console="off"),
        reinit="create_new",  # seeds that train together (engine/vectorized.py) have a run each, open at once
    )


def log(run: Any, epoch: int, metrics: dict) -> None:
    """One epoch's metrics. wandb's step is the epoch, so every chart's x axis is the epoch
    (in `wandb leet` and online), and the epoch is not drawn as a chart of its own."""
    run.log({k: v for k, v in metrics.items() if k != "epoch"}, step=epoch)


def offline_runs(group_dir: Path) -> list[Path]:
    """The offline run folders of a group's seeds, oldest first (a resumed seed has one per
    process), found by the run ids the seeds keep, wherever WANDB_DIR put them."""
    ids = [f.read_text().strip() for f in sorted(group_dir.glob("*/wandb_id"))]
    bases = (group_dir, os.environ.get("WANDB_DIR") or group_dir)
    roots = {(Path(base) / "wandb").resolve() for base in bases}
    found = [folder for root in roots for run_id in ids for folder in root.glob(f"offline-run-*-{run_id}")]
    return sorted(found, key=lambda folder: folder.name)  # offline-run-<date>_<time>-<id>


def sync_command(group_dir: Path) -> list[str]:
    """`wandb sync` over the group's offline runs, by this Python's wandb: what uploads them
    once a network (and credentials) are there."""
    return [sys.executable, "-m", "wandb", "sync", *map(str, offline_runs(group_dir))]
