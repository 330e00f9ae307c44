"""Benchmark: a config's seeds trained one after another against all at once as one stacked
model (trainer.vectorize_seeds, engine/vectorized.py).

    python bench/seeds.py [--device cpu|cuda] [--repeats 5] [--seeds 5] [--epochs E]
                          [--batch-sizes 32 256 4096] [--threads N] [--whole] [--search]

Run it from the repository root. On the shipped task (configs/run_template.yaml), for each
batch size it trains the config's seeds both ways with engine.run.run, interleaved (each
repeat runs both, in alternating order) and repeated, in this one process, and prints the
seconds per epoch for all seeds together (median, min-max), and the speed-up (sequential /
together: ratio of the medians, and the min-max of the per-repeat ratios). Seconds per
epoch come from metrics.csv's wall_time, which starts at the training loop: one by one,
the seeds' times add up; together, all seeds share one clock.

--whole also times `python main.py --run_config configs/run_template.yaml` as a user runs
it (5 seeds x 50 epochs, every start-up cost included) both ways, and --search a 12-trial
search with configs/optimize_template.yaml, both ways (wall-clock seconds, once each).
The goals on a 2-core CPU: at least 2x at batch size 256 and no slower at 4096; on a GPU,
at least 4x at 256. Runs go to a temporary folder that is removed at the end.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import torch  # noqa: E402

from config import RunConfig  # noqa: E402
from engine.run import run  # noqa: E402
from throughput import machine  # noqa: E402

WAYS = {False: "one by one", True: "together"}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=None,
                        help="epochs per run (default: enough for 128 optimizer steps, at least 3)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[32, 256, 4096])
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--whole", action="store_true", help="also time main.py, 5 seeds x 50 epochs")
    parser.add_argument("--search", action="store_true", help="also time a 12-trial search")
    return parser.parse_args()


def seconds_per_epoch(config: RunConfig, folder: Path, group: str, together: bool) -> tuple[float, bool]:
    """All seeds' seconds per epoch (engine.run.run, wall_time from each seed's metrics.csv), and
    whether they really trained together (run() may decide against it: engine/vectorized.py)."""
    config = config.with_overrides({"group": group, "trainer.vectorize_seeds": together}, source="bench")
    here = os.getcwd()
    os.chdir(folder)  # runs/ is relative to the current folder
    try:
        with open(os.devnull, "w") as devnull, contextlib.redirect_stderr(devnull):
            result = run(config)
    finally:
        os.chdir(here)
    times = []
    for seed in result.seeds:
        with open(folder / seed.run_dir / "metrics.csv", newline="") as f:
            last = list(csv.DictReader(f))[-1]
        times.append(float(last["wall_time"]) / int(last["epoch"]))
    stacked = all(seed.vectorized for seed in result.seeds)
    return (max(times) if stacked else sum(times)), stacked  # together: one shared clock


def wall_clock(args: list[str], folder: Path) -> float:
    started = time.perf_counter()
    subprocess.run([sys.executable, str(ROOT / "main.py"), *args], cwd=folder, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                   env={**os.environ, "WANDB_MODE": "disabled", "TQDM_DISABLE": "1"})
    return time.perf_counter() - started


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(machine(args.device))
    base = RunConfig.from_yaml(ROOT / "configs" / "run_template.yaml")
    seeds = list(range(1, args.seeds + 1))
    speedups = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        print(f"\n{'batch':>6}  {'way':<11} {'s/epoch, all seeds':>28}  speed-up")
        train = len(base.load_data()[0])
        for batch_size in args.batch_sizes:
            epochs = args.epochs or max(3, -(-128 // -(-train // batch_size)))
            config = base.with_overrides({
                "seeds": seeds, "epochs": epochs, "batch_size": batch_size, "device": args.device,
                "wandb.mode": "disabled", "checkpoint_every_s": 1e9, "early_stopping.patience": None,
                "scheduler_config.T_max": epochs}, source="bench")
            times, stacked = {False: [], True: []}, True
            for repeat in range(args.repeats):
                for together in ((False, True) if repeat % 2 == 0 else (True, False)):
                    group = f"b{batch_size}_r{repeat}_{int(together)}"
                    seconds, ran_together = seconds_per_epoch(config, folder, group, together)
                    times[together].append(seconds)
                    stacked = stacked and (ran_together or not together)
            ratios = [a / b for a, b in zip(times[False], times[True])]
            speedups[batch_size] = statistics.median(times[False]) / statistics.median(times[True])
            for together in (False, True):
                t = times[together]
                ratio = (f"{speedups[batch_size]:.2f} [{min(ratios):.2f}-{max(ratios):.2f}]" if together
                         else "1")
                way = WAYS[together] if stacked or not together else "default*"
                print(f"{batch_size:>6}  {way:<11} {statistics.median(t):>10.4f} "
                      f"[{min(t):.4f}-{max(t):.4f}]  {ratio}")
            if not stacked:
                print("        * run() trained these seeds one by one: too much work per step to gain "
                      "(engine/stacking.py, CPU_BUSY)")
        print("\nspeed-up (one by one / together) at batch size: "
              + ", ".join(f"{b}: {s:.2f}" for b, s in speedups.items())
              + "   (goal: >= 2 at 256 and >= 1 at 4096 on CPU; >= 4 at 256 on a GPU)")
        if args.whole:
            shipped = ["--run_config", str(ROOT / "configs" / "run_template.yaml"), "--device", args.device]
            took = {w: wall_clock([*shipped, "--set", f"group=whole{int(w)}",
                                   "--set", f"trainer.vectorize_seeds={str(w).lower()}"], folder)
                    for w in (False, True)}
            print(f"\nmain.py, shipped config (5 seeds x 50 epochs): one by one {took[False]:.1f} s, "
                  f"together {took[True]:.1f} s, speed-up {took[False] / took[True]:.2f}")
        if args.search:
            optimize = (ROOT / "configs" / "optimize_template.yaml").read_text()
            took = {}
            for together in (False, True):
                path = folder / f"o{int(together)}.yaml"
                path.write_text(optimize.replace("trials: 20", "trials: 12")
                                + f"\nstudy_name: bench{int(together)}\n")
                took[together] = wall_clock(["--run_config", str(ROOT / "configs" / "run_template.yaml"),
                                             "--device", args.device, "--set",
                                             f"trainer.vectorize_seeds={str(together).lower()}",
                                             "--optimize_config", str(path)], folder)
            print(f"search, 12 trials of the shipped config: one by one {took[False]:.1f} s, "
                  f"together {took[True]:.1f} s, speed-up {took[False] / took[True]:.2f}")


if __name__ == "__main__":
    main()
