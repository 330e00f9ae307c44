"""Hostile and broken input, table-driven, through main.py as a user runs it: each case
ends with exit status 2, one line on stderr that names the file and the key, no
traceback, and nothing created under runs/."""
import pytest

from conftest import run_main, write_yaml

pytestmark = pytest.mark.slow  # every test here starts processes

RAISING_MODEL = ("import torch\nclass Net(torch.nn.Module):\n    def __init__(self, hparams, device='cpu'):\n"
                 "        raise ValueError('width must be even')\n")
IMPORT_ERROR_MODEL = "import no_such_dependency\n"
SPACE = {"optimizer_config": {"lr": {"type": "float", "min": 1e-3, "max": 1e-2}}}


def _alias_bomb(depth: int = 8, width: int = 9) -> str:
    """A config of about 1 KB whose net_config expands to width**(depth+1) (~3.9e8) values."""
    levels = [f"  l0: &a0 [{', '.join(['x'] * width)}]"]
    levels += [f"  l{d}: &a{d} [{', '.join([f'*a{d - 1}'] * width)}]" for d in range(1, depth + 1)]
    return "WITH net_config:\n  nodes: 8\n  layers: 2\n" + "\n".join(levels) + "\n"


# (id, change to the run config (dict), its raw text (str), or "WITH key: ..." for the tiny config
#  with that key's YAML text instead, change to the optimize config or
#  its raw text (None: no search), expected start of the line after "error: ")
CASES = [
    # syntax
    ("yaml-unclosed-list", "epochs: [1, 2\nseeds: 3\n", None, "c.yaml: line"),
    ("yaml-bad-indent", "epochs: 1\n  seeds: [1]\n", None, "c.yaml: line"),
    ("yaml-tab", "epochs:\t1\n\tseeds: [1]\n", None, "c.yaml: line"),
    ("yaml-duplicate-key", "epochs: 1\nepochs: 2\n", None,
     "c.yaml: line 2: invalid YAML: duplicate key 'epochs'"),
    ("yaml-list-at-top", "- 1\n- 2\n", None, "c.yaml: expected a mapping"),
    ("yaml-empty-file", "", None, "c.yaml: expected a mapping"),
    ("yaml-alias-bomb", _alias_bomb(), None,
     "c.yaml: net_config: expands to more than 100000 values (YAML aliases)"),
    ("yaml-alias-loop", "WITH net_config:\n  nodes: 8\n  layers: 2\n  loop: &a [1, *a]\n",
     None, "c.yaml: net_config: refers to itself"),
    ("yaml-python-object", "epochs: !!python/object/apply:os.system ['touch pwned']\n", None, "c.yaml: line"),
    # unknown, misspelt and missing keys
    ("unknown-key", {"colour": "red"}, None, "c.yaml: colour: unknown key"),
    ("misspelt-epochs", {"epoch": 3}, None, "c.yaml: epoch: unknown key (did you mean 'epochs'?)"),
    ("misspelt-nested", {"early_stopping": {"patiense": 3}}, None,
     "c.yaml: early_stopping.patiense: unknown key"),
    ("misspelt-optimizer-kwarg", {"optimizer_config": {"lrr": 1e-3}}, None, "c.yaml: optimizer_config:"),
    ("misspelt-scheduler-kwarg", {"scheduler_config": {"T_maxx": 3}}, None, "c.yaml: scheduler_config:"),
    ("misspelt-criterion-kwarg", {"criterion_config": {"reductio": "sum"}}, None,
     "c.yaml: criterion_config:"),
    ("misspelt-data-kwarg", {"data_config": {"noize": 0.1}}, None, "c.yaml: data_config:"),
    ("missing-net", {"net": None}, None, "c.yaml: net: expected a string"),
    ("missing-epochs", "DELETE epochs", None, "c.yaml: epochs: missing required key"),
    ("missing-seeds", "DELETE seeds", None, "c.yaml: seeds: missing required key"),
    # wrong types
    ("epochs-string", {"epochs": "ten"}, None, "c.yaml: epochs: expected an integer"),
    ("epochs-float", {"epochs": 2.5}, None, "c.yaml: epochs: expected an integer"),
    ("batch-bool", {"batch_size": True}, None, "c.yaml: batch_size: expected an integer"),
    ("project-dotdot", {"project": "..", "group": ".."}, None,
     "c.yaml: project: must name a folder of its own, not '..'"),
    ("group-dotdot", {"group": ".."}, None, "c.yaml: group: must name a folder of its own, not '..'"),
    ("group-dot", {"group": "."}, None, "c.yaml: group: must name a folder of its own, not '.'"),
    ("seeds-not-list", {"seeds": 3}, None, "c.yaml: seeds: expected a list"),
    ("seed-not-int", {"seeds": [1, "x"]}, None, "c.yaml: seeds[1]: expected an integer"),
    ("net-config-list", {"net_config": [8, 2]}, None, "c.yaml: net_config: expected a mapping"),
    ("lr-string", {"optimizer_config": {"lr": "fast"}}, None, "c.yaml: optimizer_config:"),
    # sizes
    ("zero-epochs", {"epochs": 0}, None, "c.yaml: epochs: must be a positive integer"),
    ("negative-epochs", {"epochs": -1}, None, "c.yaml: epochs: must be a positive integer"),
    ("zero-batch", {"batch_size": 0}, None, "c.yaml: batch_size: must be a positive integer"),
    ("negative-batch", {"batch_size": -64}, None, "c.yaml: batch_size: must be a positive integer"),
    ("empty-seeds", {"seeds": []}, None, "c.yaml: seeds: must list at least one seed"),
    ("negative-patience", {"early_stopping": {"patience": -2}}, None, "c.yaml: early_stopping.patience:"),
    ("negative-checkpoint-every", {"checkpoint_every_s": -1}, None, "c.yaml: checkpoint_every_s:"),
    ("zero-data", {"data_config": {"n": 0}}, None, "c.yaml: data_config: util.load_data rejected it"),
    # import paths and user code
    ("no-module", {"net": "modle.MLP"}, None, "c.yaml: net: module 'modle' not found"),
    ("no-class", {"net": "model.MLPP"}, None, "c.yaml: net: module 'model' has no attribute 'MLPP'"),
    ("no-optimizer", {"optimizer": "torch.optim.AdamWW"}, None,
     "c.yaml: optimizer: module 'torch.optim' has no"),
    ("no-scheduler", {"scheduler": "torch.optim.lr_scheduler.Cosine"}, None, "c.yaml: scheduler: module"),
    ("no-criterion", {"criterion": "torch.nn.MSE"}, None, "c.yaml: criterion: module 'torch.nn' has no"),
    ("no-data", {"data": "util.load_dataa"}, None, "c.yaml: data: module 'util' has no attribute"),
    ("not-a-path", {"net": "MLP"}, None, "c.yaml: net: 'MLP' is not an import path"),
    ("metric-named-loss",
     {"metrics": ["torch.nn.functional.mse_loss", "util.accuracy", "util.accuracy"]}, None,
     "c.yaml: metrics[2]: util.accuracy would be a second val_accuracy column"),
    ("model-raises", {"net": "raising.Net"}, None, "c.yaml: net_config: raising.Net rejected it: ValueError"),
    ("model-import-fails", {"net": "broken_import.Net"}, None, "c.yaml: net: importing"),
    ("net-config-rejected", {"net_config": {"nodes": 8}}, None, "c.yaml: net_config: model.MLP rejected it"),
    ("net-config-negative", {"net_config": {"nodes": -8, "layers": 2}}, None,
     "c.yaml: net_config: model.MLP"),
    # devices
    ("device-unknown", {"device": "tpu"}, None, "c.yaml: device: must be auto"),
    ("device-cuda-absent", {"device": "cuda"}, None, "c.yaml: device: 'cuda' requested but CUDA"),
    ("device-cuda-index", {"device": "cuda:7"}, None, "c.yaml: device: 'cuda:7' requested but"),
    ("vectorize-not-bool", {"trainer": {"vectorize_seeds": "yes"}}, None,
     "c.yaml: trainer.vectorize_seeds: expected true or false"),
    ("mode-unknown", {"mode": "lowest"}, None, "c.yaml: mode: must be 'min' or 'max'"),
    ("wandb-mode", {"wandb": {"mode": "loud"}}, None, "c.yaml: wandb.mode:"),
    # search configs
    ("opt-yaml", {}, "trials: [3\n", "o.yaml: line"),
    ("opt-min-gt-max", {}, {"search_space": {"net_config": {"nodes": {"type": "int", "min": 9, "max": 2}}}},
     "o.yaml: search_space.net_config.nodes.min: min (9) is greater than max (2)"),
    ("opt-unknown-distribution", {},
     {"search_space": {"batch_size": {"type": "gaussian", "min": 1, "max": 2}}},
     "o.yaml: search_space.batch_size.type: unknown distribution"),
    ("opt-empty-choices", {}, {"search_space": {"batch_size": {"type": "categorical", "choices": []}}},
     "o.yaml: search_space.batch_size.choices: must be a non-empty list"),
    ("opt-no-sampler", {}, {"sampler": "optuna.samplers.BestSampler"},
     "o.yaml: sampler: module 'optuna.samplers'"),
    ("opt-no-pruner", {}, {"pruner": "optuna.pruners.Median"}, "o.yaml: pruner: module 'optuna.pruners'"),
    ("opt-sampler-kwarg", {}, {"sampler_config": {"n_startup": 3}}, "o.yaml: sampler_config:"),
    ("opt-pruner-rejects", {}, {"pruner_config": {"top_k": 0}},
     "o.yaml: pruner_config: engine.pruner.PFLPruner rejected"),
    ("opt-unknown-space-key", {},
     {"search_space": {"net_config": {"nodez": {"type": "int", "min": 1, "max": 2}}}},
     "o.yaml: search_space.net_config.nodez:"),
    ("opt-zero-trials", {}, {"trials": 0}, "o.yaml: trials: must be a positive integer"),
    ("opt-grid-non-categorical", {}, {"sampler": "optuna.samplers.GridSampler"},
     "o.yaml: search_space.optimizer_config.lr: GridSampler needs categorical"),
    ("opt-study-dotdot", {}, {"study_name": ".."}, "o.yaml: study_name: must name a folder of its own"),
    ("opt-misspelt-key", {}, {"trails": 3}, "o.yaml: trails: unknown key (did you mean 'trials'?)"),
]


@pytest.mark.parametrize("run_change,opt_change,expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_broken_input(workdir, tiny, run_change, opt_change, expected):
    import torch
    if "cuda" in expected and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    (workdir / "raising.py").write_text(RAISING_MODEL)
    (workdir / "broken_import.py").write_text(IMPORT_ERROR_MODEL)
    if isinstance(run_change, str) and run_change.startswith("DELETE "):
        write_yaml(workdir / "c.yaml", {k: v for k, v in tiny.items() if k != run_change.split()[1]})
    elif isinstance(run_change, str) and run_change.startswith("WITH "):  # this text instead of its key
        text = run_change.removeprefix("WITH ")
        write_yaml(workdir / "c.yaml", {k: v for k, v in tiny.items() if k != text.split(":")[0]})
        (workdir / "c.yaml").write_text((workdir / "c.yaml").read_text() + text)
    elif isinstance(run_change, str):
        (workdir / "c.yaml").write_text(run_change)
    else:
        write_yaml(workdir / "c.yaml", {**tiny, **run_change})
    args = ["--run_config", "c.yaml"]
    if opt_change is not None:
        if isinstance(opt_change, str):
            (workdir / "o.yaml").write_text(opt_change)
        else:
            write_yaml(workdir / "o.yaml", {"trials": 2, "search_space": SPACE, **opt_change})
        args += ["--optimize_config", "o.yaml"]
    result = run_main(*args, cwd=workdir)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"error: {expected}"), lines[0]
    assert "Traceback" not in result.stderr
    assert not (workdir / "runs").exists()
    assert not (workdir / "pwned").exists()
    # Nothing but the test's own files here, nor in the folder above ('..' as a name).
    assert {p.name for p in workdir.iterdir()} <= {"c.yaml", "o.yaml", "raising.py", "broken_import.py",
                                                   "wandb_dir", "__pycache__"}
    assert not (workdir.parent / "config.yaml").exists()

