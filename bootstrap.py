"""Set up a virtual environment and run the shipped example or the tests.
Needs nothing but Python 3.10+ (with its venv module).

    python3 bootstrap.py run      # .venv + requirements.txt, then train configs/run_template.yaml
    python3 bootstrap.py test     # .venv + requirements-dev.txt, then pytest (extra args go to pytest)

TORCH chooses how torch is installed, as pip arguments, before the requirements:
e.g. TORCH="torch==2.13.0" (what CI uses). Unset, pip takes torch from requirements.txt.
Installing is skipped when the requirements and TORCH have not changed.
"""
import hashlib
import os
import shlex
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"


def setup(requirements: str) -> Path:
    if sys.version_info < (3, 10):
        sys.exit("error: Python 3.10 or newer is needed")
    python = VENV / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    if not python.exists():
        print(f"creating {VENV.name}/", flush=True)
        venv.create(VENV, with_pip=True)
    torch_args = shlex.split(os.environ.get("TORCH", ""))
    wanted = hashlib.sha256(" ".join(torch_args).encode() + b"".join(
        (ROOT / name).read_bytes() for name in ("requirements.txt", requirements))).hexdigest()
    stamp = VENV / ".installed"
    if not stamp.exists() or stamp.read_text() != wanted:
        pip = [str(python), "-m", "pip", "install", "--disable-pip-version-check", "-q"]
        if torch_args:
            subprocess.run(pip + torch_args, check=True)
        subprocess.run(pip + ["-r", str(ROOT / requirements)], check=True)
        stamp.write_text(wanted)
    return python


def main() -> int:
    task = sys.argv[1] if len(sys.argv) > 1 else ""
    if task == "run":
        python = setup("requirements.txt")
        command = [str(python), "main.py", "--run_config", "configs/run_template.yaml", *sys.argv[2:]]
    elif task == "test":
        python = setup("requirements-dev.txt")
        command = [str(python), "-m", "pytest", *sys.argv[2:]]
    else:
        print(__doc__)
        return 2
    return subprocess.run(command, cwd=ROOT).returncode


if __name__ == "__main__":
    sys.exit(main())
