"""Benchmark: how long does the template take to start, beyond `import torch`?

    python bench/startup.py [--repeats 5]

Run it from the repository root. Each measurement is a fresh Python process
(this interpreter, sys.executable), repeated `--repeats` times; it prints the
median and min-max of:

    python -c pass                  the interpreter alone
    python -c "import torch"        the issue's reference point: the whole process,
                                    and (": imported", through the hook below) the moment
                                    the import is done, before torch's slow exit
    plain script, first step        a minimal plain-PyTorch script (import torch, the
                                    template's MLP from model.py, AdamW, one forward and
                                    backward on 64 samples): the floor for anything that
                                    trains, because building any torch.optim optimizer
                                    imports torch._dynamo (about a second on a small CPU)
    main.py, first training step    `python main.py --run_config <tmp config>` from its
                                    launch (time.time() just before Popen) to the first
                                    call of torch.Tensor.backward in the child, i.e. the
                                    first step's backward, after its forward.
    main.py, whole process          the same run until it exits: an upper bound that
                                    also holds the (tiny) epoch, the checkpoint and the
                                    exit
    main.py --help                  and whether it imports torch (python -X importtime)

The first-step time is taken without any help from the template: a sitecustomize.py
in a temporary folder on PYTHONPATH installs an import hook that, once torch has
been imported by whoever imports it, wraps torch.Tensor.backward to write
time.time() to a file on its first call (and records when `import torch`
finished). The temporary run config is configs/run_template.yaml with 1 epoch,
1 seed, wandb disabled and 64 samples of data (one batch), so the epoch costs
next to nothing; it runs in a temporary working folder, which is removed at the end.

It reports the template's extra time to its first step beyond `import torch` (first
step minus the median `import torch` process) and beyond the plain script's first step
(the same hook, so the two are measured alike). The goal, under 0.3 s added by the
template, is held against the second: the first also holds about a second that torch
spends after its import in any program that builds an optimizer (torch._dynamo).
Takes about a minute.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from config import load_yaml  # noqa: E402  (config imports no torch)

# Written into the child's sitecustomize.py. The hook costs one string comparison per
# import and imports only importlib.abc, so the child starts as fast as without it.
SITECUSTOMIZE = '''
import importlib.abc, sys, time

_OUT = {out!r}


def _write(key, value):
    with open(_OUT, "a") as f:
        f.write(f"{{key}} {{value!r}}\\n")


class _TorchHook(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name != "torch":
            return None
        sys.meta_path.remove(self)  # find the real torch, then wrap its loader
        import importlib.util
        spec = importlib.util.find_spec("torch")
        exec_module = spec.loader.exec_module

        def exec_and_wrap(module):
            exec_module(module)
            _write("torch_imported", time.time())
            backward = module.Tensor.backward

            def first_backward(self, *args, **kwargs):
                module.Tensor.backward = backward  # unwrap: one call only
                _write("first_backward", time.time())
                return backward(self, *args, **kwargs)

            module.Tensor.backward = first_backward

        spec.loader.exec_module = exec_and_wrap
        return spec


_write("interpreter_started", time.time())
sys.meta_path.insert(0, _TorchHook())
'''


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--config", default=str(ROOT / "configs" / "run_template.yaml"))
    return parser.parse_args()


def wall(command: list[str], **kwargs) -> tuple[float, subprocess.CompletedProcess]:
    started = time.perf_counter()
    done = subprocess.run(command, stdin=subprocess.DEVNULL, capture_output=True, text=True, **kwargs)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} exited {done.returncode}:\n{done.stderr[-2000:]}")
    return seconds, done


def tiny_config(source: Path, path: Path) -> Path:
    """The template shrunk to one seed, one epoch, one batch of data, no wandb."""
    data = load_yaml(source)  # the template's own loader: 1e-3 stays a float
    data.update(seeds=data["seeds"][:1], epochs=1, device="cpu", group="startup")
    data["data_config"] = {**data.get("data_config", {}), "n": 64}
    data["wandb"] = {**data.get("wandb", {}), "mode": "disabled"}
    data["early_stopping"] = {**data.get("early_stopping", {}), "patience": None}
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


# The floor: what any training script does before its first backward.
PLAIN_SCRIPT = """
import sys
import torch
sys.path.insert(0, {root!r})
import model
net = model.MLP({net_config!r})
optimizer = torch.optim.AdamW(net.parameters(), lr=1e-3)
x, y = torch.rand(64, 1), torch.rand(64, 1)
torch.nn.functional.mse_loss(net(x), y).backward()
optimizer.step()
"""


def first_step(command: list[str], workdir: Path, hookdir: Path, times_file: Path,
               backward: bool = True) -> dict[str, float]:
    """Launch `command` with the hook; return seconds from launch to interpreter start,
    torch imported, first backward, and process exit."""
    times_file.unlink(missing_ok=True)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(hookdir), env.get("PYTHONPATH")]))
    launched = time.time()
    started = time.perf_counter()
    done = subprocess.run(command, cwd=workdir, env=env, stdin=subprocess.DEVNULL, capture_output=True,
                          text=True)
    whole = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} exited {done.returncode}:\n{done.stderr[-2000:]}")
    marks = {}
    for line in times_file.read_text().splitlines():
        key, value = line.split(" ", 1)
        marks[key] = float(value) - launched
    if backward and "first_backward" not in marks:
        raise RuntimeError(f"{' '.join(command)} finished without calling backward: "
                           "is the hook on PYTHONPATH?")
    return {**marks, "whole_process": whole}


def imported_modules(stderr: str) -> list[str]:
    """Module names from `python -X importtime` output."""
    names = []
    for line in stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            name = line.rsplit("|", 1)[1].strip()
            if name != "imported package":
                names.append(name)
    return names


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.3f} s [{min(values):.3f}-{max(values):.3f}]"


def main() -> int:
    args = parse_args()
    python = sys.executable
    results: dict[str, list[float]] = {k: [] for k in (
        "python -c pass", "python -c 'import torch'", "python -c 'import torch': imported",
        "main.py --help", "plain script: torch imported", "plain script: first step",
        "main.py: interpreter started", "main.py: torch imported", "main.py: first training step",
        "main.py: whole process")}
    with tempfile.TemporaryDirectory(prefix="bench_startup_") as tmp:
        tmp = Path(tmp)
        hookdir, workdir = tmp / "hook", tmp / "work"
        hookdir.mkdir()
        workdir.mkdir()
        times_file = tmp / "times.txt"
        (hookdir / "sitecustomize.py").write_text(SITECUSTOMIZE.format(out=str(times_file)))
        config = tiny_config(Path(args.config), tmp / "startup.yaml")
        net_config = load_yaml(args.config).get("net_config") or {}
        plain = [python, "-c", PLAIN_SCRIPT.format(root=str(ROOT), net_config=net_config)]
        template = [python, str(ROOT / "main.py"), "--run_config", str(config)]
        # Warm the file cache once (the first torch import after a while reads ~1 GB of
        # libraries from disk), so that every repeat measures the same thing.
        wall([python, "-c", "import torch"])
        for repeat in range(args.repeats):  # interleaved, so that load changes hit all alike
            results["python -c pass"].append(wall([python, "-c", "pass"])[0])
            results["python -c 'import torch'"].append(wall([python, "-c", "import torch"])[0])
            marks = first_step([python, "-c", "import torch"], workdir, hookdir, times_file, backward=False)
            results["python -c 'import torch': imported"].append(marks["torch_imported"])
            results["main.py --help"].append(wall([python, str(ROOT / "main.py"), "--help"], cwd=workdir)[0])
            marks = first_step(plain, workdir, hookdir, times_file)
            results["plain script: torch imported"].append(marks["torch_imported"])
            results["plain script: first step"].append(marks["first_backward"])
            for run_dir in workdir.glob("runs/*/startup"):  # each run starts from an empty group
                shutil.rmtree(run_dir)
            marks = first_step(template, workdir, hookdir, times_file)
            results["main.py: interpreter started"].append(marks["interpreter_started"])
            results["main.py: torch imported"].append(marks["torch_imported"])
            results["main.py: first training step"].append(marks["first_backward"])
            results["main.py: whole process"].append(marks["whole_process"])
        _, help_run = wall([python, "-X", "importtime", str(ROOT / "main.py"), "--help"], cwd=workdir)

    torch_modules = [m for m in imported_modules(help_run.stderr) if m.split(".")[0] == "torch"]
    import torch  # only for the report line below, after all timing
    print(f"Python {sys.version.split()[0]} ({python}), torch {torch.__version__}, "
          f"{os.cpu_count()} logical cores, load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"{args.repeats} repeats, each a fresh process; median [min-max], seconds from launch")
    for name, values in results.items():
        print(f"  {name:<36} {spread(values)}")
    import_torch = statistics.median(results["python -c 'import torch'"])
    imported = statistics.median(results["python -c 'import torch': imported"])
    first = results["main.py: first training step"]
    plain_first = results["plain script: first step"]
    in_child = [s - t for s, t in zip(first, results["main.py: torch imported"])]
    plain_in_child = [s - t for s, t in zip(plain_first, results["plain script: torch imported"])]
    print()
    print(f"main.py --help imports torch: {'yes' if torch_modules else 'no'} "
          f"({len(torch_modules)} torch modules in python -X importtime)")
    print(f"template time to the first step beyond `import torch`: "
          f"{statistics.median(first) - import_torch:.3f} s (first step {statistics.median(first):.3f} s - "
          f"import torch {import_torch:.3f} s; includes torch's own first-optimizer import of torch._dynamo)")
    print(f"  the same against `import torch` done, not the process's exit: "
          f"{statistics.median(first) - imported:.3f} s (import torch done at {imported:.3f} s)")
    print(f"template time to the first step beyond the plain script's: "
          f"{statistics.median(first) - statistics.median(plain_first):.3f} s "
          f"(per repeat: {spread([t - p for t, p in zip(first, plain_first)])}; "
          "goal < 0.3 s: what the template adds)")
    print(f"  after torch finished importing, to the first step: main.py {spread(in_child)}, "
          f"plain script {spread(plain_in_child)}")
    print(f"  whole main.py process beyond `import torch` (upper bound): "
          f"{statistics.median(results['main.py: whole process']) - import_torch:.3f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
