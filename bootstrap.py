"""Set up a virtual environment from the lock, and run the shipped example or the tests.
Needs nothing but Python 3.10+ (with its venv module).

    python3 bootstrap.py run      # .venv from requirements.lock, then train configs/run_template.yaml
    python3 bootstrap.py test     # .venv from requirements-dev.lock, then pytest (extra args go to pytest)
    python3 bootstrap.py lock     # remake both locks after editing requirements*.txt (--upgrade: newest)

The locks pin every package, for Linux x86-64 and aarch64 and macOS arm64. uv, installed into
.venv by pip, installs them; plain pip does where uv cannot. TORCH chooses how torch is installed,
as pip arguments: e.g. TORCH="torch==2.13.0" (what CI uses). When it is set, torch and the packages
the lock has only for torch (nvidia-*, triton, ...) come from it, held to the lock's versions.
Installing is skipped when the lock, TORCH and this file have not changed. docs/setup.md says more.
"""
from __future__ import annotations  # so that Python 3.9 and older reach the version check

import hashlib
import os
import shlex
import subprocess
import sys
import venv
from pathlib import Path

from engine.lockfile import only_for_torch, read_lock  # the standard library only, like this file

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
UV = "uv==0.13.9"  # the uv that makes and installs the locks
TORCH_LOCKED = "torch==2.13.0"  # the torch that CI tests: `lock` pins it
LOCKS = {"run": ("requirements.txt", "requirements.lock"),
         "test": ("requirements-dev.txt", "requirements-dev.lock")}


def make_venv() -> Path:
    if sys.version_info < (3, 10):
        sys.exit("error: Python 3.10 or newer is needed")
    python = VENV / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    if not python.exists():
        print(f"creating {VENV.name}/", flush=True)
        venv.create(VENV, with_pip=True)
    return python


def pip(python: Path) -> list[str]:
    return [str(python), "-m", "pip", "install", "--disable-pip-version-check", "-q"]


def install_uv(python: Path) -> Path | None:
    """uv in .venv (pip leaves it be when it is there), or None where it cannot be had."""
    if subprocess.run(pip(python) + [UV]).returncode != 0:
        return None
    return python.parent / ("uv.exe" if os.name == "nt" else "uv")


def setup(task: str) -> Path:
    python = make_venv()
    lock = ROOT / LOCKS[task][1]
    torch_args = shlex.split(os.environ.get("TORCH", ""))
    wanted = hashlib.sha256(f"{task} {torch_args}".encode() + Path(__file__).read_bytes()
                            + lock.read_bytes()).hexdigest()
    stamp = VENV / ".installed"
    if stamp.exists() and stamp.read_text() == wanted:
        return python
    pins = read_lock(lock.read_text())
    skipped = only_for_torch(pins) if torch_args else set()
    if torch_args:  # e.g. the CPU build; what it brings along is held to the lock's versions
        held = VENV / "lock-constraints.txt"
        held.write_text("".join(pin.line + "\n" for pin in pins if pin.name != "torch"))
        subprocess.run(pip(python) + torch_args + ["-c", str(held)], check=True)
    chosen = VENV / "lock-install.txt"  # complete: installed without resolving
    chosen.write_text("".join(pin.line + "\n" for pin in pins if pin.name not in skipped))
    uv = install_uv(python)
    # .pyc files now, as pip makes them: under PYTHONDONTWRITEBYTECODE=1 (or a read-only .venv)
    # each process would compile again all it imports, which doubles the test suite's time
    if uv is None or subprocess.run([str(uv), "pip", "install", "-q", "--compile-bytecode", "--python",
                                     str(python), "--no-deps", "-r", str(chosen)]).returncode != 0:
        print("uv could not install the lock: pip does", flush=True)
        subprocess.run(pip(python) + ["--no-deps", "-r", str(chosen)], check=True)
    stamp.write_text(wanted)
    return python


def lock(uv_args: list[str]) -> int:
    """Both locks from requirements*.txt; the test lock keeps the run lock's versions."""
    uv = install_uv(make_venv())
    if uv is None:
        sys.exit("error: pip could not install uv, which makes the locks")
    (run_source, run_lock), (test_source, test_lock) = LOCKS["run"], LOCKS["test"]
    compile_ = [str(uv), "pip", "compile", "-q", "--universal", "--python-version", "3.10",
                "--custom-compile-command", "python3 bootstrap.py lock", *uv_args]
    # the torch pin comes in on stdin, so that no temporary path is written into the lock
    done = subprocess.run(compile_ + ["-c", "-", run_source, "-o", run_lock], cwd=ROOT,
                          input=TORCH_LOCKED, text=True)
    if done.returncode == 0:
        done = subprocess.run(compile_ + ["-c", run_lock, test_source, "-o", test_lock], cwd=ROOT)
    return done.returncode


def main() -> int:
    task = sys.argv[1] if len(sys.argv) > 1 else ""
    if task == "run":
        python = setup(task)
        command = [str(python), "main.py", "--run_config", "configs/run_template.yaml", *sys.argv[2:]]
    elif task == "test":
        python = setup(task)
        command = [str(python), "-m", "pytest", *sys.argv[2:]]
    elif task == "lock":
        return lock(sys.argv[2:])
    else:
        print(__doc__)
        return 2
    return subprocess.run(command, cwd=ROOT).returncode


if __name__ == "__main__":
    sys.exit(main())
