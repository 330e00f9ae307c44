"""RunConfig / OptimizeConfig: loading, round trips, naming and every kind of bad input."""

import pytest
import yaml

from config import ConfigError, OptimizeConfig, RunConfig, load_yaml, resolve
from conftest import ROOT, write_yaml


def test_every_shipped_config_loads():
    run_configs = sorted((ROOT / "configs").glob("run_*.yaml"))
    assert run_configs, "no run config shipped"
    for path in run_configs:
        config = RunConfig.from_yaml(path)
        for path_opt in sorted((ROOT / "configs").glob("optimize_*.yaml")):
            OptimizeConfig.from_yaml(path_opt).check_against(config)


def test_round_trip(tmp_path, tiny):
    config = RunConfig.from_dict(tiny, source="tiny")
    config.to_yaml(tmp_path / "c.yaml")
    again = RunConfig.from_yaml(tmp_path / "c.yaml")
    assert again == config
    assert again.to_dict() == config.to_dict()
    assert again.group_name() == config.group_name()


def test_scientific_notation_without_dot_is_a_float(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("a: 1e-3\nb: 5E+2\nc: -2.5e-4\nd: 1.0e3\ne: '1e-3'\nf: 12\n")
    data = load_yaml(path)
    assert data == {"a": 0.001, "b": 500.0, "c": -0.00025, "d": 1000.0, "e": "1e-3", "f": 12}
    assert type(data["a"]) is float and type(data["f"]) is int
    # Our loader must not change PyYAML's global SafeLoader for anyone else.
    assert yaml.safe_load("a: 1e-3") == {"a": "1e-3"}


def test_shipped_lr_is_float():
    config = RunConfig.from_yaml(ROOT / "configs" / "run_template.yaml")
    assert config.optimizer_config["lr"] == 1e-3
    assert isinstance(config.optimizer_config["lr"], float)


def test_duplicate_keys_are_an_error(tmp_path):
    path = tmp_path / "dup.yaml"
    path.write_text("epochs: 3\nnet_config:\n  nodes: 4\n  nodes: 8\n")
    with pytest.raises(ConfigError, match=r"dup.yaml: line 4: .*duplicate key 'nodes'"):
        load_yaml(path)


def test_with_overrides_copies(tiny):
    base = RunConfig.from_dict(tiny)
    trial = base.with_overrides({"optimizer_config.lr": 3e-4, "batch_size": 16, "early_stopping.patience": 2})
    assert trial.optimizer_config["lr"] == 3e-4 and trial.batch_size == 16
    assert trial.early_stopping.patience == 2
    assert base.optimizer_config["lr"] == 1e-2 and base.batch_size == 64  # untouched
    assert base.early_stopping.patience == tiny["early_stopping"]["patience"]
    with pytest.raises(ConfigError, match=r"optimizer_config.lrr: .*did you mean 'lr'"):
        base.with_overrides({"optimizer_config.lrr": 1.0})


def test_group_names_are_unique_to_the_whole_config(tiny):
    # Names built from first letters (MLP_n8_l2_lr0.01) would collide for these two.
    a = RunConfig.from_dict(tiny)
    b = a.with_overrides({"optimizer_config.lr": 1.1e-2})
    c = a.with_overrides({"net_config.layers": 3})
    names = {a.group_name(), b.group_name(), c.group_name()}
    assert len(names) == 3
    assert a.group_name() == RunConfig.from_dict(tiny).group_name()  # and stable
    assert a.group_name().startswith("MLP_")
    assert a.with_overrides({"group": "mine"}).group_name() == "mine"


def test_speed_settings_change_neither_the_group_nor_what_a_resume_compares(tiny):
    a = RunConfig.from_dict(tiny)
    b = a.with_overrides({"trainer.compile": True, "trainer.num_workers": 2,
                          "trainer.persistent_workers": True})
    assert a.group_name() == b.group_name() and a.differences(b) == []
    assert a.differences(a.with_overrides({"trainer.precision": "bf16"})) == ["trainer.precision"]


def test_resolver_names_the_part_that_failed():
    import torch
    assert resolve("torch.optim.lr_scheduler.StepLR") is torch.optim.lr_scheduler.StepLR
    with pytest.raises(ImportError, match="module 'modle' not found"):
        resolve("modle.MLP")
    with pytest.raises(ImportError, match="module 'model' has no attribute 'MLPP'"):
        resolve("model.MLPP")
    with pytest.raises(ImportError, match="not an import path"):
        resolve("MLP")


BAD_RUN = [
    # (change to the tiny config, key named in the error, words in the error)
    ({"epochs": 0}, "epochs", "positive"),
    ({"epochs": -3}, "epochs", "positive"),
    ({"epochs": "ten"}, "epochs", "integer"),
    ({"epochs": 2.5}, "epochs", "integer"),
    ({"batch_size": 0}, "batch_size", "positive"),
    ({"seeds": []}, "seeds", "at least one"),
    ({"seeds": [1, "two"]}, "seeds[1]", "integer"),
    ({"seeds": 3}, "seeds", "list"),
    ({"epoch": 3}, "epoch", "did you mean 'epochs'"),
    ({"net": "modle.MLP"}, "net", "module 'modle' not found"),
    ({"net": "model.MLPP"}, "net", "has no attribute 'MLPP'"),
    ({"optimizer": "torch.optim.AdamWW"}, "optimizer", "has no attribute 'AdamWW'"),
    ({"optimizer_config": {"lrr": 1e-3}}, "optimizer_config", "did you mean 'lr'"),
    ({"scheduler_config": {"T_maxx": 3}}, "scheduler_config", "T_max"),
    ({"criterion": "torch.nn.MSELos"}, "criterion", "has no attribute"),
    ({"data_config": {"nn": 10}}, "data_config", "did you mean 'n'"),
    ({"device": "gpu"}, "device", "auto, cpu"),
    ({"mode": "minimize"}, "mode", "'min' or 'max'"),
    ({"early_stopping": {"patience": 0}}, "early_stopping.patience", "positive"),
    ({"early_stopping": {"patiense": 3}}, "early_stopping.patiense", "did you mean 'patience'"),
    ({"wandb": {"mode": "silent"}}, "wandb.mode", "disabled"),
    ({"net_config": [1, 2]}, "net_config", "mapping"),
]


@pytest.mark.parametrize("change,key,words", BAD_RUN, ids=[c[1] + ":" + c[2] for c in BAD_RUN])
def test_bad_run_config(tmp_path, tiny, change, key, words):
    path = write_yaml(tmp_path / "bad.yaml", {**tiny, **change})
    with pytest.raises(ConfigError) as info:
        RunConfig.from_yaml(path)
    assert info.value.key == key
    assert words in str(info.value)
    assert str(info.value).startswith(f"{path}: {key}: ")


def test_missing_key(tmp_path, tiny):
    del tiny["net"]
    with pytest.raises(ConfigError, match=r"bad.yaml: net: missing required key"):
        RunConfig.from_yaml(write_yaml(tmp_path / "bad.yaml", tiny))


def test_model_rejecting_net_config_names_net_config(tiny):
    config = RunConfig.from_dict({**tiny, "net_config": {"nodes": 8}}, source="c.yaml")
    with pytest.raises(ConfigError, match=r"c.yaml: net_config: model.MLP rejected it: KeyError: 'layers'"):
        config.create_model()


def test_explicit_cuda_without_cuda_is_an_error(tiny):
    import torch
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert RunConfig.from_dict({**tiny, "device": "auto"}).device == "cpu"
    with pytest.raises(ConfigError, match="device: 'cuda' requested but CUDA is not available"):
        RunConfig.from_dict({**tiny, "device": "cuda"}).check_device()


SPACE = {"optimizer_config": {"lr": {"type": "float", "min": 1e-4, "max": 1e-2, "log": True}}}
BAD_OPT = [
    ({"search_space": {"optimizer_config": {"lr": {"type": "float", "min": 1.0, "max": 0.1}}}},
     "search_space.optimizer_config.lr.min", "greater than max"),
    ({"search_space": {"batch_size": {"type": "normal", "min": 1, "max": 2}}},
     "search_space.batch_size.type", "unknown distribution"),
    ({"search_space": {"batch_size": {"type": "categorical", "choices": []}}},
     "search_space.batch_size.choices", "non-empty"),
    ({"search_space": {"batch_size": {"type": "int", "min": 1}}}, "search_space.batch_size.max", "missing"),
    ({"search_space": {"batch_size": {"type": "int", "min": 1, "max": 4, "stpe": 1}}},
     "search_space.batch_size.stpe", "did you mean 'step'"),
    ({"search_space": {"optimizer_config": {"lr": {"type": "float", "min": 0.0, "max": 1.0, "log": True}}}},
     "search_space.optimizer_config.lr.min", "min > 0"),
    ({"search_space": {}}, "search_space", "at least one"),
    ({"sampler": "optuna.samplers.NoSuchSampler"}, "sampler", "has no attribute 'NoSuchSampler'"),
    ({"sampler": "optuna.samplers.GridSampler"}, "search_space.optimizer_config.lr", "categorical"),
    ({"sampler_config": {"n_startup_trails": 3}}, "sampler_config", "did you mean 'n_startup_trials'"),
    ({"pruner": "engine.pruner.NoPruner"}, "pruner", "has no attribute 'NoPruner'"),
    ({"trials": 0}, "trials", "positive"),
    ({"trails": 3}, "trails", "did you mean 'trials'"),
]


@pytest.mark.parametrize("change,key,words", BAD_OPT, ids=[c[1] + ":" + c[2] for c in BAD_OPT])
def test_bad_optimize_config(tmp_path, change, key, words):
    path = write_yaml(tmp_path / "opt.yaml", {"trials": 3, "search_space": SPACE, **change})
    with pytest.raises(ConfigError) as info:
        OptimizeConfig.from_yaml(path)
    assert info.value.key == key
    assert words in str(info.value)


def test_search_keys_must_exist_in_run_config(tiny):
    opt = OptimizeConfig.from_dict({"search_space": {"net_config": {
                                       "nodez": {"type": "int", "min": 1, "max": 4}}}},
                                   source="opt.yaml")
    with pytest.raises(ConfigError, match=r"search_space.net_config.nodez: .*did you mean 'nodes'"):
        opt.check_against(RunConfig.from_dict(tiny))


def test_study_name_ignores_how_long_and_where_only(tiny):
    run_config = RunConfig.from_dict(tiny)
    a = OptimizeConfig.from_dict({"trials": 3, "search_space": SPACE})
    b = OptimizeConfig.from_dict({"trials": 9, "search_space": SPACE})
    c = OptimizeConfig.from_dict({"trials": 3, "seed": 1, "search_space": SPACE})
    assert a.name_for(run_config) == b.name_for(run_config) != c.name_for(run_config)
    elsewhere = run_config.with_overrides({"device": "auto", "wandb.mode": "offline",
                                           "checkpoint_every_s": 5})
    assert a.name_for(elsewhere) == a.name_for(run_config)  # --device or logging: the same study
    for changed in ({"epochs": 9}, {"seeds": [1, 2]}, {"optimizer_config.lr": 0.5}):  # other trials
        assert a.name_for(run_config.with_overrides(changed)) != a.name_for(run_config)
