"""The researcher's daily loop: --set, --preflight, --version, provenance, study reports,
and the classification example (metrics beyond the loss)."""
import csv
import json
import re

import pytest

import analyze
from config import OptimizeConfig, RunConfig, load_yaml
from conftest import ROOT, run_main, write_yaml
from engine.search import run_study
from engine.run import run


@pytest.mark.slow
def test_set_overrides_nested_keys_and_records_them(workdir, tiny):
    write_yaml(workdir / "c.yaml", tiny)
    result = run_main("--run_config", "c.yaml", "--set", "optimizer_config.lr=3e-4", "--set", "seeds=[1,2]",
                      "--set", "early_stopping.patience=2", cwd=workdir)
    assert result.returncode == 0, result.stderr
    (group_dir,) = (workdir / "runs" / "test").iterdir()
    saved = RunConfig.from_yaml(group_dir / "config.yaml")  # the merged config
    assert (saved.optimizer_config["lr"] == 3e-4 and saved.seeds == [1, 2]
            and saved.early_stopping.patience == 2)
    header = (group_dir / "config.yaml").read_text().splitlines()[:2]
    assert header == ["# merged from c.yaml (with --set optimizer_config.lr=3e-4 --set seeds=[1,2] "
                      "--set early_stopping.patience=2)",
                      "# overrides: --set optimizer_config.lr=3e-4 --set seeds=[1,2] "
                      "--set early_stopping.patience=2"]
    record = json.loads((group_dir / "provenance.json").read_text())["invocations"][-1]
    assert record["overrides"] == ["--set optimizer_config.lr=3e-4", "--set seeds=[1,2]",
                                   "--set early_stopping.patience=2"]


@pytest.mark.parametrize("override,words", [
    ("optimizer_config.lrr=1",
     "optimizer_config.lrr: no key 'optimizer_config.lrr' in the run config (did you mean 'lr'?)"),
    ("epoch=3", "epoch: no key 'epoch' in the run config (did you mean 'epochs'?)"),
    ("epochs", "--set: epochs: expected key=value"),
    ("epochs=0", "epochs: must be a positive integer"),
])
@pytest.mark.slow
def test_bad_overrides(workdir, tiny, override, words):
    write_yaml(workdir / "c.yaml", tiny)
    result = run_main("--run_config", "c.yaml", "--set", override, cwd=workdir)
    assert result.returncode == 2
    assert words in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (workdir / "runs").exists()


@pytest.mark.slow
@pytest.mark.parametrize("config", ["run_template.yaml", "run_classify.yaml"])
def test_shipped_configs_pass_preflight_and_write_nothing(workdir, config):
    result = run_main("--run_config", str(ROOT / "configs" / config), "--preflight", "--device", "cpu",
                      cwd=workdir)
    assert result.returncode == 0, result.stdout + result.stderr
    for row in ("parameters", "batch", "loss", "gradient norm", "peak memory", "seconds"):
        assert re.search(rf"^  {row}\s+\S", result.stdout, re.M), row
    assert "all checks passed" in result.stdout
    assert not (workdir / "runs").exists() and not list(workdir.rglob("wandb"))[1:]


@pytest.mark.parametrize("override,check", [
    ("net_config.output_size=2", "FAIL output shape: output (64, 2) vs target (64, 1)"),
    ("optimizer_config.lr=0", "FAIL optimizer step: no parameter changed"),
    ("criterion=torch.nn.CrossEntropyLoss", "FAIL gradients non-zero"),  # one class: the loss is constant
])
@pytest.mark.slow
def test_preflight_names_the_failing_check(workdir, tiny, override, check):
    tiny["net_config"]["output_size"] = 1
    write_yaml(workdir / "c.yaml", tiny)
    result = run_main("--run_config", "c.yaml", "--preflight", "--set", override, cwd=workdir)
    assert result.returncode == 1, result.stdout + result.stderr
    assert check in result.stdout
    assert not (workdir / "runs").exists()


@pytest.mark.slow
def test_help_and_version(workdir):
    help_text = run_main("--help", cwd=workdir).stdout
    for option in ("--run_config", "--optimize_config", "--set", "--device", "--resume", "--preflight",
                   "--version"):
        assert re.search(rf"^  {option}\b", help_text, re.M), option
    version = run_main("--version", cwd=workdir)
    assert version.returncode == 0
    assert re.fullmatch(r"pytorch_template \S+, torch \S+, optuna \S+, wandb \S+\n", version.stdout)


def test_provenance_records_how_to_reproduce(workdir, tiny):
    tiny["wandb"] = {"mode": "offline", "tags": []}
    config = RunConfig.from_dict(tiny)
    result = run(config)
    data = json.loads((result.group_dir / "provenance.json").read_text())
    assert data["config_hash"] == config.config_hash()
    (record,) = data["invocations"]
    for key in ("command", "git_commit", "git_dirty", "python", "torch", "cuda", "packages", "device_name",
                "started", "ended"):
        assert key in record
    assert record["status"] == "finished" and record["ended"] >= record["started"]
    assert record["packages"]["optuna"] and record["packages"]["torch"]
    assert record["git_commit"] is None or re.fullmatch(r"[0-9a-f]{40}", record["git_commit"])
    # The same hash travels with the wandb run.
    (log,) = (workdir / "wandb_dir" / "wandb").glob("offline-run-*/run-*.wandb")
    assert config.config_hash().encode() in log.read_bytes()


def test_group_loss_plot_has_every_seed_and_a_band(workdir, tiny):
    tiny["seeds"] = [1, 2, 3]
    result = run(RunConfig.from_dict(tiny))
    analyze.plot_losses(result.group_dir, workdir / "losses.png")
    assert (workdir / "losses.png").read_bytes()[:4] == b"\x89PNG"
    assert set(analyze.read_metrics(result.group_dir)) == {"1", "2", "3"}


@pytest.mark.slow
def test_study_report(workdir, tiny, capsys):
    tiny["epochs"] = 2
    opt = OptimizeConfig.from_dict({"trials": 4, "seed": 0, "study_name": "s", "pruner": None,
                                    "search_space": {
                                        "optimizer_config": {"lr": {"type": "float", "min": 1e-3, "max": 1e-1,
                                                                    "log": True}},
                                        "batch_size": {"type": "categorical", "choices": [16, 32, 64]}}})
    study = run_study(RunConfig.from_dict(tiny), opt)
    assert analyze.main(["--study", "s", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["best"]["number"] == study.best_trial.number and report["best"]["value"] == study.best_value
    assert set(report["importances"]) == {"optimizer_config.lr", "batch_size"}
    assert sum(report["importances"].values()) == pytest.approx(1.0)
    assert all(p.endswith(".png") and (workdir / p).exists() for p in report["plots"])
    assert ({p.rsplit("/", 1)[1] for p in report["plots"]}
            == {"history.png", "importances.png", "best_losses.png"})
    assert report["warnings"] == analyze.edge_warnings(study.best_trial)
    assert analyze.main(["--study", "s"]) == 0
    assert "parameter importances:" in capsys.readouterr().out


def test_edge_warnings():
    import optuna
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
    trial = optuna.trial.create_trial(
        params={"lr": 0.0099, "layers": 3, "width": 64, "mid": 0.001},
        distributions={"lr": FloatDistribution(1e-4, 1e-2, log=True), "layers": IntDistribution(1, 9),
                       "width": CategoricalDistribution([16, 32, 64]),
                       "mid": FloatDistribution(1e-4, 1e-2, log=True)},
        value=0.1)
    warnings = analyze.edge_warnings(trial)
    assert len(warnings) == 2
    assert warnings[0].startswith("lr = 0.0099 is at the upper edge")
    assert warnings[1].startswith("width = 64 is the highest of its choices")


@pytest.fixture
def spirals():
    config = load_yaml(ROOT / "configs" / "run_classify.yaml")
    config.update(project="cls", device="cpu", seeds=[1], epochs=15, wandb={"mode": "disabled", "tags": []},
                  scheduler_config={"T_max": 15, "eta_min": 1e-4})
    return config


@pytest.mark.slow
def test_classification_trains_to_90_percent_with_accuracy_logged(workdir, spirals):
    result = run(RunConfig.from_dict(spirals))
    (seed,) = result.seeds
    assert result.monitor == "val_accuracy" and seed.best_value >= 0.9
    with open(result.group_dir / "1" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["epoch", "train_loss", "val_loss", "val_accuracy", "lr", "wall_time"]
    assert max(float(r["val_accuracy"]) for r in rows) == seed.best_value  # the best epoch by accuracy (max)


def test_classification_search(workdir, spirals):
    spirals["epochs"] = 4
    opt = OptimizeConfig.from_yaml(ROOT / "configs" / "optimize_classify.yaml")
    opt = OptimizeConfig.from_dict({**{k: v for k, v in opt.__dict__.items() if k != "source"},
                                    "trials": 3, "search_space": opt.search_space})
    study = run_study(RunConfig.from_dict(spirals), opt)
    assert study.direction.name == "MAXIMIZE"
    assert len(study.get_trials()) == 3 and 0.5 < study.best_value <= 1.0


def test_unknown_metric_and_monitor_are_config_errors(tiny):
    from config import ConfigError
    with pytest.raises(ConfigError, match=r"metrics\[0\]: module 'util' has no attribute 'acuracy'"):
        RunConfig.from_dict({**tiny, "metrics": ["util.acuracy"]})
    with pytest.raises(ConfigError, match=r"monitor: must be one of .* \(did you mean 'val_accuracy'\?\)"):
        RunConfig.from_dict({**tiny, "metrics": ["util.accuracy"], "monitor": "val_acuracy"})
