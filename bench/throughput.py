"""Benchmark: how much slower per epoch is the template's training loop than the
tightest plain-PyTorch loop, and than the usual DataLoader loop?

    python bench/throughput.py [--device cpu|cuda] [--repeats 5] [--epochs E]
                               [--batch-sizes 32 256 4096] [--threads N]

Run it from the repository root. On the shipped task (configs/run_template.yaml:
its model, data, AdamW settings and cosine schedule), for each batch size it times
three loops, interleaved (every repeat runs all three, in a rotating order) and
repeated, in this one process:

    a  template   engine.run.run(config): one seed, wandb disabled, no early stopping,
                  E epochs (below). Seconds per epoch = the `wall_time` of the last
                  row of metrics.csv / epochs. wall_time starts at the training loop,
                  so building the model and the data is left out, while validation
                  (in batches of trainer.val_batch_size, by default batch_size), metrics.csv,
                  checkpoints (checkpoint_every_s as in the template) and the progress
                  bar are in.
    b  plain      the limit: the same model, data, optimizer and scheduler as plain
                  tensors in memory, a fresh torch.randperm per epoch and index
                  slicing, the loss summed on the device (one .item() per epoch),
                  validation of the whole validation set in chunks of 4096 under
                  torch.inference_mode.
    c  dataloader what most templates do: DataLoader(TensorDataset, shuffle=True),
                  loss.item() per batch, validation through a DataLoader of the same
                  batch size under torch.no_grad.

Each run trains E epochs: `--epochs` if given, else 3, or more at large batch
sizes so that a run has at least 256 optimizer steps (at 4096, 2 steps an epoch,
3 epochs last ~40 ms and the ratio would be mostly noise; with 64 steps, single
repeats still ranged 0.8-1.3).

It prints each loop's seconds per epoch (median and min-max over the repeats) and
the ratios a/b and c/b (ratio of the medians, and the min-max of the per-repeat
ratios), plus the machine. On CUDA it also prints samples/s (training samples per
second of the whole epoch, validation included). The goal: a/b <= 1.10 at every
batch size on CPU. `--threads N` sets torch.set_num_threads for all three loops;
on a small machine that other processes share, torch's default (one thread per
core) can be several times slower for this small MLP and makes the numbers noisy,
so compare with `--threads 1` there. Runs go to a temporary folder that is removed
at the end; nothing is written to the repository.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from config import RunConfig  # noqa: E402
from engine import reproducibility  # noqa: E402
from engine.run import run  # noqa: E402

METHODS = ("a", "b", "c")
MIN_STEPS = 256  # optimizer steps per run, at least, unless --epochs says otherwise
NAMES = {"a": "template", "b": "plain", "c": "dataloader"}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=None,
                        help="epochs per run at every batch size (default: 3, more for big batches)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[32, 256, 4096])
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads (default: torch's own choice)")
    parser.add_argument("--config", default=str(ROOT / "configs" / "run_template.yaml"))
    return parser.parse_args()


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


# --------------------------------------------------------------------------- (a) the template

def time_template(config: RunConfig, runs_dir: Path, group: str) -> float:
    """engine.run.run on the config; seconds per epoch from metrics.csv's last wall_time."""
    config = config.with_overrides({"group": group}, source="bench")
    here = os.getcwd()
    os.chdir(runs_dir.parent)  # runs/ is relative to the current folder
    try:
        # The progress bar still formats every update; only its terminal write goes to
        # /dev/null, so that 3 x repeats x batch sizes bars do not bury the report.
        with open(os.devnull, "w") as devnull, contextlib.redirect_stderr(devnull):
            result = run(config)
    finally:
        os.chdir(here)
    with open(runs_dir.parent / result.seeds[0].run_dir / "metrics.csv", newline="") as f:
        last = list(csv.DictReader(f))[-1]
    return float(last["wall_time"]) / int(last["epoch"])


# --------------------------------------------------------------------------- (b) the limit

def build(config: RunConfig, device: str) -> tuple:
    """The same model, optimizer, scheduler and criterion the template builds, same seed."""
    reproducibility.set_seed(config.seeds[0])
    model = config.create_model(device)
    optimizer = config.create_optimizer(model)
    return model, optimizer, config.create_scheduler(optimizer), config.create_criterion()


def time_plain(config: RunConfig, data: tuple, device: str) -> float:
    model, optimizer, scheduler, criterion = build(config, device)
    (x_train, y_train), (x_val, y_val) = ((t.to(device) for t in d.tensors) for d in data)
    n, batch_size = len(x_train), config.batch_size
    sync(device)
    started = time.perf_counter()
    for _ in range(config.epochs):
        model.train()
        order = torch.randperm(n, device=device)
        loss_sum = torch.zeros((), device=device)
        for start in range(0, n, batch_size):
            index = order[start:start + batch_size]
            x, y = x_train[index], y_train[index]
            loss = criterion(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += loss.detach() * len(index)
        (loss_sum / n).item()  # the one host sync per epoch, as in the template
        model.eval()
        with torch.inference_mode():
            val_sum = torch.zeros((), device=device)
            for start in range(0, len(x_val), 4096):
                x, y = x_val[start:start + 4096], y_val[start:start + 4096]
                val_sum += criterion(model(x), y) * len(x)
            (val_sum / len(x_val)).item()
        scheduler.step()
    sync(device)
    return (time.perf_counter() - started) / config.epochs


# --------------------------------------------------------------------------- (c) the usual loop

def time_dataloader(config: RunConfig, data: tuple, device: str) -> float:
    model, optimizer, scheduler, criterion = build(config, device)
    train_set, val_set = data  # CPU TensorDatasets, batches moved to the device as they come
    train_loader = DataLoader(train_set, batch_size=config.batch_size, shuffle=True)
    val_loader = DataLoader(val_set, batch_size=config.batch_size)
    sync(device)
    started = time.perf_counter()
    for _ in range(config.epochs):
        model.train()
        # The common habit, kept on purpose: loss.item() every batch (a host sync per step).
        train_sum = 0.0
        for x, y in train_loader:
            x, y = x.to(device), y.to(device)
            optimizer.zero_grad()
            loss = criterion(model(x), y)
            loss.backward()
            optimizer.step()
            train_sum += loss.item() * len(x)
        model.eval()
        val_sum = 0.0
        with torch.no_grad():
            for x, y in val_loader:
                x, y = x.to(device), y.to(device)
                val_sum += criterion(model(x), y).item() * len(x)
        scheduler.step()
    sync(device)
    return (time.perf_counter() - started) / config.epochs


# --------------------------------------------------------------------------- report

def machine(device: str) -> str:
    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    text = (f"CPU: {cpu} ({os.cpu_count()} logical cores), torch {torch.__version__}, "
            f"torch.get_num_threads() = {torch.get_num_threads()}, Python {platform.python_version()}")
    if device.startswith("cuda"):
        text += f"\nGPU: {torch.cuda.get_device_name()}"
    load = os.getloadavg()[0]
    text += f"\nload average at start: {load:.2f}"
    if load > 0.5:
        text += (f" -- other processes are running; they compete with torch's "
                 f"{torch.get_num_threads()} thread(s), so expect noise")
    return text


def spread(values: list[float], fmt: str = "{:.4f}") -> str:
    return f"{fmt.format(statistics.median(values))} [{fmt.format(min(values))}-{fmt.format(max(values))}]"


def main() -> int:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but CUDA is not available", file=sys.stderr)
        return 2
    template = RunConfig.from_yaml(args.config)
    base = template.with_overrides({"seeds": template.seeds[:1], "wandb.mode": "disabled",
                                    "early_stopping.patience": None, "device": args.device}, source="bench")
    data = base.load_data()
    n_train = len(data[0])
    print(machine(args.device))
    print(f"task: {args.config}, {n_train} training / {len(data[1])} validation samples, "
          f"{args.repeats} repeats, scheduler {base.scheduler}, "
          f"checkpoint_every_s {base.checkpoint_every_s}")
    started = time.perf_counter()
    seconds = {bs: {m: [] for m in METHODS} for bs in args.batch_sizes}
    with tempfile.TemporaryDirectory(prefix="bench_throughput_") as tmp:
        runs_dir = Path(tmp) / "runs"
        configs = {bs: base.with_overrides({"batch_size": bs, "epochs": args.epochs or max(
                       3, math.ceil(MIN_STEPS / math.ceil(n_train / bs)))}, source="bench")
                   for bs in args.batch_sizes}
        print("epochs per run: " + ", ".join(f"{configs[bs].epochs} at batch size {bs}"
                                             for bs in args.batch_sizes))
        timers = {
            "a": lambda bs, tag: time_template(configs[bs], runs_dir, f"bs{bs}_{tag}"),
            "b": lambda bs, tag: time_plain(configs[bs], data, args.device),
            "c": lambda bs, tag: time_dataloader(configs[bs], data, args.device),
        }
        # One untimed round first: lazy initialisation (kernels, allocator, imports) is
        # paid once per process and belongs to none of the three loops.
        warm = base.with_overrides({"epochs": 1, "batch_size": max(args.batch_sizes)}, source="bench")
        time_template(warm, runs_dir, "warmup")
        time_plain(warm, data, args.device)
        time_dataloader(warm, data, args.device)
        for repeat in range(args.repeats):
            for bs in args.batch_sizes:
                # Rotate the order so that no loop always runs first (or after the slowest).
                order = METHODS[repeat % 3:] + METHODS[:repeat % 3]
                for method in order:
                    seconds[bs][method].append(timers[method](bs, f"r{repeat}"))
            print(f"repeat {repeat + 1}/{args.repeats} done ({time.perf_counter() - started:.0f} s)",
                  flush=True)

    print()
    header = f"{'batch':>6}  {'loop':<14}{'s/epoch: median [min-max]':<30}{'ratio to b':<26}"
    if args.device == "cuda":
        header += "samples/s (median)"
    print(header.rstrip())
    for bs in args.batch_sizes:
        b = seconds[bs]["b"]
        for method in METHODS:
            s = seconds[bs][method]
            if method == "b":
                ratio = "1"
            else:
                paired = [x / y for x, y in zip(s, b)]
                ratio = (f"{statistics.median(s) / statistics.median(b):.3f} "
                         f"[{min(paired):.2f}-{max(paired):.2f}]")
            line = f"{bs:>6}  {method + ' ' + NAMES[method]:<14}{spread(s):<30}{ratio:<26}"
            if args.device == "cuda":
                line += f"{n_train / statistics.median(s):,.0f}"
            print(line.rstrip())
    print()
    print("a/b (template / plain) at batch size: " + ", ".join(
        f"{bs}: {statistics.median(seconds[bs]['a']) / statistics.median(seconds[bs]['b']):.3f}"
        for bs in args.batch_sizes) + "   (goal on CPU: <= 1.10)")
    print("c/b (dataloader / plain) at batch size: " + ", ".join(
        f"{bs}: {statistics.median(seconds[bs]['c']) / statistics.median(seconds[bs]['b']):.3f}"
        for bs in args.batch_sizes))
    print(f"total time: {time.perf_counter() - started:.0f} s, "
          f"load average at the end: {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
