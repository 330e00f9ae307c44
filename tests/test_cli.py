"""main.py as a user runs it: the shipped entry point end to end, and bad input."""
import csv
import json
import subprocess
import sys
import textwrap

import pytest
import torch

from config import RunConfig
from conftest import ROOT, child_env, run_main, write_yaml

pytestmark = pytest.mark.slow  # every test here starts processes


def test_train_writes_every_file_and_refuses_to_overwrite(workdir, tiny):
    tiny["seeds"] = [3, 4]
    config_path = write_yaml(workdir / "tiny.yaml", tiny)
    result = run_main("--run_config", str(config_path), cwd=workdir)
    assert result.returncode == 0, result.stderr
    group_dir = workdir / "runs" / "test" / RunConfig.from_dict(tiny).group_name()
    # The summary: one line per seed, mean ± std, where the files went.
    lines = result.stdout.splitlines()
    assert (any(line.split()[:1] == ["3"] for line in lines)
            and any(line.split()[:1] == ["4"] for line in lines))
    assert "val_loss:" in result.stdout and "±" in result.stdout and "over 2 seed(s)" in result.stdout
    assert str(group_dir.relative_to(workdir)) in result.stdout
    assert "seeds 3,4" in result.stderr  # the progress bar names the seeds (training together)

    saved = RunConfig.from_yaml(group_dir / "config.yaml")
    assert saved.with_overrides({"group": None}) == RunConfig.from_dict(tiny)
    for seed in (3, 4):
        with open(group_dir / str(seed) / "metrics.csv") as f:
            rows = list(csv.DictReader(f))
        assert list(rows[0]) == ["epoch", "train_loss", "val_loss", "lr", "wall_time"]
        assert [int(r["epoch"]) for r in rows] == [1, 2, 3, 4]
        state = torch.load(group_dir / str(seed) / "model.pt", weights_only=True)
        assert "net.0.weight" in state
        result = json.loads((group_dir / str(seed) / "result.json").read_text())
        assert set(result) == {"seed", "status", "best_value", "best_epoch", "epochs_run", "run_dir",
                               "vectorized"}
        assert result["seed"] == seed and result["status"] == "completed" and result["epochs_run"] == 4

    before = {p: p.read_bytes() for p in group_dir.rglob("*") if p.is_file()}
    again = run_main("--run_config", str(config_path), cwd=workdir)
    assert again.returncode == 2
    assert "already holds seed(s) 3, 4" in again.stderr and "Traceback" not in again.stderr
    assert {p: p.read_bytes() for p in group_dir.rglob("*") if p.is_file()} == before


def test_a_new_model_class_from_a_users_module(workdir, tiny):
    (workdir / "my_models.py").write_text(textwrap.dedent("""
        from torch import nn

        class Tiny(nn.Module):
            def __init__(self, hparams, device="cpu"):
                super().__init__()
                self.width = hparams["width"]
                self.net = nn.Sequential(nn.Linear(1, self.width), nn.Tanh(), nn.Linear(self.width, 1))

            def forward(self, x):
                return self.net(x)
    """))
    tiny.update(net="my_models.Tiny", net_config={"width": 5})
    result = run_main("--run_config", str(write_yaml(workdir / "c.yaml", tiny)), cwd=workdir)
    assert result.returncode == 0, result.stderr
    group_dir = next((workdir / "runs" / "test").iterdir())
    assert group_dir.name.startswith("Tiny_")
    state = torch.load(group_dir / "7" / "model.pt", weights_only=True)
    assert state["net.0.weight"].shape == (5, 1)


def test_device_flag_overrides_the_file(workdir, tiny):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    write_yaml(workdir / "c.yaml", tiny)
    result = run_main("--run_config", "c.yaml", "--device", "cuda", cwd=workdir)
    assert result.returncode == 2
    assert result.stderr.strip() == ("error: c.yaml (with --device cuda): device: 'cuda' requested but "
                                     "CUDA is not available")
    assert not (workdir / "runs").exists()


def test_all_seeds_diverging_is_reported(workdir, tiny):
    tiny.update(optimizer="torch.optim.SGD", optimizer_config={"lr": 1e6}, epochs=6, scheduler=None,
                scheduler_config={})
    result = run_main("--run_config", str(write_yaml(workdir / "c.yaml", tiny)), cwd=workdir)
    assert result.returncode == 1
    assert "diverged" in result.stdout and "seeds [7]" in result.stdout
    assert "Traceback" not in result.stderr


def test_optuna_and_wandb_load_only_when_used(workdir, tiny):
    write_yaml(workdir / "c.yaml", tiny)
    probe = (f"import sys; sys.path.insert(0, {str(ROOT)!r}); import main\n"
             "code = main.main(sys.argv[1:]) if sys.argv[1:] != ['--help'] else None\n"
             "print(code, sorted(m for m in ('torch', 'optuna', 'wandb', 'matplotlib') if m in sys.modules))")
    trained = subprocess.run([sys.executable, "-c", probe, "--run_config", "c.yaml"], cwd=workdir,
                             env=child_env(), capture_output=True, text=True, timeout=120)
    assert trained.stdout.strip().splitlines()[-1] == "0 ['torch']", trained.stderr
    parsed_only = subprocess.run([sys.executable, "-c", probe, "--help"],
                                 cwd=workdir, env=child_env(), capture_output=True, text=True, timeout=60)
    assert parsed_only.stdout.strip().splitlines()[-1] == "None []"  # importing main.py loads no torch


def test_tqdm_disable_in_the_environment_hides_the_progress_bar(workdir, tiny, monkeypatch):
    monkeypatch.setenv("TQDM_DISABLE", "1")  # tqdm's own switch: the Trainer must not override it
    result = run_main("--run_config", str(write_yaml(workdir / "tiny.yaml", tiny)), cwd=workdir)
    assert result.returncode == 0, result.stderr
    assert "epoch/s" not in result.stderr and "seed 7" not in result.stderr and "completed" in result.stdout


@pytest.mark.parametrize("flag", [["--workers", "2"], ["--storage", "sqlite:///x.db"]])
def test_search_flags_without_a_search_are_refused(workdir, tiny, flag):
    result = run_main("--run_config", str(write_yaml(workdir / "c.yaml", tiny)), *flag, cwd=workdir)
    assert result.returncode == 2
    assert result.stderr == f"error: {flag[0]}: only a search uses it: add --optimize_config YAML\n"
    assert not (workdir / "runs").exists() and not (workdir / "x.db").exists()
