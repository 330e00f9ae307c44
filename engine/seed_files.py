"""One seed's folder, runs/<project>/<group>/<seed>/: what it holds, which checkpoint a resume
continues from, and what a seed writes while it trains, on either path (one seed at a time,
engine/trainer.py, or all at once, engine/vectorized.py).

    files = SeedFiles(config, group, run_dir, seed, tags, labels, state)  # metrics.csv, wandb run
    trainer = Trainer(..., callbacks=files.callbacks, on_checkpoint=files.save_checkpoint)
    result = files.finish(trainer.train(...), model.state_dict())         # model.pt, result.json
    files.fail(error)                                                     # or: result.json says why
"""
from __future__ import annotations

import contextlib
import csv
import dataclasses
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engine import checkpoint, wandb_run
from engine.folders import FINISHED_STATUSES
from engine.trainer import EpochCallback, SeedResult

if TYPE_CHECKING:  # types only: the engine imports none of your files when it runs
    from config import RunConfig


def finished(config: RunConfig, run_dir: Path) -> dict | None:
    """The seed's result.json when it has nothing left to train (unless `epochs` was raised)."""
    done = json.loads((run_dir / "result.json").read_text()) if (run_dir / "result.json").exists() else {}
    longer = done.get("status") == "completed" and done.get("epochs_run", 0) < config.epochs
    return done if done.get("status") in FINISHED_STATUSES and not longer else None


def checkpoint_to_resume(run_dir: Path, seed: int, loaded: dict) -> tuple[Path | None, str | None, Any]:
    """The checkpoint a seed resumes from, why it is not checkpoint.pt (checkpoint.prev.pt when the
    newest is damaged, or missing: a kill between a save's two renames), and its state. Each file
    is read once: `loaded` keeps what was read, for as long as the file stays as it was."""
    newest = run_dir / "checkpoint.pt"
    found = [p for p in (newest, checkpoint.previous_of(newest)) if p.exists()]
    problems = {}
    for path in found:
        try:
            state = read_once(path, loaded)
        except checkpoint.Unreadable as e:
            problems[path] = e.message
            continue
        return path, None if path == newest else f"{newest}: {problems.get(newest, 'missing')}", state
    if not found:
        return None, None, None
    kept = ["best.pt"] if (run_dir / "best.pt").exists() else []
    with contextlib.suppress(OSError, csv.Error):
        with open(run_dir / "metrics.csv") as f:
            epochs = [row["epoch"] for row in csv.DictReader(f)]
        if epochs:
            kept.append(f"metrics.csv up to epoch {epochs[-1]}")
    names, kept = " and ".join(p.name for p in found), ", ".join(kept) or "nothing"
    raise checkpoint.Unreadable(str(found[0]), "", f"{problems[found[0]]}; kept: {kept}; delete {names} "
                                f"to train seed {seed} again from the start, or restore a copy")


def read_once(path: Path, loaded: dict) -> dict:
    """checkpoint.load(path), unless `loaded` holds it from when the file was as it is now."""
    stat = path.stat()
    key = (path, stat.st_mtime_ns, stat.st_size)
    if key not in loaded:
        loaded[key] = checkpoint.load(path)
    return loaded[key]


def _continue_from(run_dir: Path, seed: int, path: Path, state: dict, note: str | None, writer: bool) -> dict:
    if path.name != "checkpoint.pt" and writer:
        # The newest goes (damaged, or a save ahead of the position we continue from), so that
        # the next save does not keep it as the previous one.
        (run_dir / "checkpoint.pt").unlink(missing_ok=True)
    if note and writer:
        print(f"seed {seed}: {note}; resumed from {path.name} (epoch {state['epoch']})", file=sys.stderr)
    return state


def states_at_one_position(run_dirs: list[Path], seeds: list[int], writer: bool,
                           loaded: dict) -> list[dict | None] | str:
    """For seeds that train together, one checkpoint each, all at one position (epoch, batch);
    or why there is none. They save one after another, so a kill can leave some a checkpoint
    ahead of the others: theirs is then the previous one (checkpoint.prev.pt)."""
    # Per seed: (path, note, state) of the newest readable checkpoint.
    chosen = [checkpoint_to_resume(run_dir, seed, loaded) for run_dir, seed in zip(run_dirs, seeds)]
    for key in [key for key in loaded if key[0].parent in run_dirs]:
        del loaded[key]  # what is not chosen now is not needed again
    if all(path is None for path, _, _ in chosen):
        return [None] * len(run_dirs)
    if any(path is None for path, _, _ in chosen):
        return "some seeds have a checkpoint and some none"
    position = lambda state: (state["epoch"], state["batch"])  # noqa: E731
    target = min(position(state) for _, _, state in chosen)
    for i, (run_dir, (path, note, state)) in enumerate(zip(run_dirs, chosen)):
        previous = checkpoint.previous_of(run_dir / "checkpoint.pt")
        ahead = position(state) != target and path != previous
        if ahead and previous.exists():  # a save ahead: one back, if that one is readable
            with contextlib.suppress(checkpoint.Unreadable):
                chosen[i] = (previous, None, checkpoint.load(previous))
    if any(position(state) != target for _, _, state in chosen):
        return "their checkpoints stand at different epochs"
    return [_continue_from(run_dir, seed, path, state, note, writer)
            for run_dir, seed, (path, note, state) in zip(run_dirs, seeds, chosen)]


class SeedFiles:
    """What one seed writes (rank 0 only): metrics.csv, rewritten up to the checkpoint it resumes
    from and then a row per epoch; best.pt and checkpoint.pt; its wandb run; and at its end
    model.pt and result.json."""

    def __init__(self, config: RunConfig, group: str, run_dir: Path, seed: int, tags: tuple[str, ...],
                 labels: dict | None, state: dict | None):
        self.run_dir, self.seed, self.columns = run_dir, seed, config.columns()
        run_dir.mkdir(exist_ok=True)
        history = state["history"] if state else []
        with open(run_dir / "metrics.csv", "w", newline="") as f:  # rows after the checkpoint are redone
            csv.writer(f).writerows([self.columns] + [[m[k] for k in self.columns] for m in history])
        # A new process writes best.pt at its first checkpoint: the last one may have died first.
        self.saved_best = None
        self.logger = wandb_run.start(config, group, seed, tags, run_dir, labels)
        self.csv_file = open(run_dir / "metrics.csv", "a", newline="")
        self.writer = csv.writer(self.csv_file)

    @property
    def callbacks(self) -> list[EpochCallback]:
        return [self.write_row] + ([self.log] if self.logger is not None else [])

    def write_row(self, epoch: int, metrics: dict) -> None:
        try:
            self.writer.writerow([metrics[k] for k in self.columns])
            self.csv_file.flush()  # a crash keeps every finished epoch
        except OSError as e:
            raise checkpoint.WriteError(e.errno, f"{self.run_dir / 'metrics.csv'}: cannot write the row of "
                                                 f"epoch {epoch}: {e.strerror}") from None

    def log(self, epoch: int, metrics: dict) -> None:
        wandb_run.log(self.logger, epoch, metrics)

    def save_checkpoint(self, state: dict) -> None:
        # best.pt before checkpoint.pt: a kill between the two never leaves a checkpoint
        # that claims a best epoch whose weights best.pt does not hold.
        if state["best_state"] is not None and state["best_epoch"] != self.saved_best:
            checkpoint.save(self.run_dir / "best.pt", state["best_state"])
            self.saved_best = state["best_epoch"]
        checkpoint.save(self.run_dir / "checkpoint.pt", state, keep_previous=True)

    def close(self, outcome: str) -> None:
        self.csv_file.close()
        if self.logger is not None:  # always close the wandb run, whatever happened
            self.logger.summary.update({"status": outcome})
            self.logger.finish(exit_code=0 if outcome not in ("failed", "interrupted") else 1)
            self.logger = None

    def fail(self, error: BaseException) -> None:
        """Pruned, interrupted or crashed: result.json says which."""
        outcome = ("pruned" if type(error).__name__ == "TrialPruned" else
                   "interrupted" if isinstance(error, KeyboardInterrupt) else "failed")
        with contextlib.suppress(OSError):  # a full disk: what failed first is what gets reported
            checkpoint.write_json(self.run_dir / "result.json",
                                  {"seed": self.seed, "status": outcome, "error": repr(error)})
        with contextlib.suppress(OSError):
            self.close(outcome)

    def finish(self, result: SeedResult, weights: dict) -> SeedResult:
        """The seed ended: model.pt gets `weights` (its best epoch's), result.json the result."""
        self.close(result.status)
        checkpoint.save(self.run_dir / "model.pt", weights)
        result = dataclasses.replace(result, run_dir=str(self.run_dir))
        checkpoint.write_json(self.run_dir / "result.json",
                              {k: v for k, v in dataclasses.asdict(result).items() if k != "history"})
        # The safety copy goes, so a finished seed takes no more disk than before it existed.
        checkpoint.previous_of(self.run_dir / "checkpoint.pt").unlink(missing_ok=True)
        return result
