"""A config's seeds trained as one stacked model (engine/vectorized.py): the same training as
one seed at a time up to float rounding, seed by seed, with the same files; and a fallback,
decided before training and said in one line, for what cannot be stacked."""
import json
import sys

import pytest
import torch

from config import RunConfig, load_yaml
from conftest import ROOT
from engine.run import run

MODELS = '''
import torch
from model import MLP


class Penalised(MLP):
    """Brings its own loss: the metric columns still see model(x)."""
    def loss(self, x, y, criterion):
        return criterion(self(x), y) + 1e-3 * sum(p.square().sum() for p in self.parameters())


class Poisoned(MLP):
    """Diverges on its first batch for some seeds (a NaN drawn at initialisation), not others."""
    def __init__(self, hparams, device="cpu"):
        super().__init__(hparams, device)
        self.poison = torch.nn.Parameter(torch.tensor(float("nan") if torch.rand(()) < 0.5 else 0.0))

    def forward(self, x):
        return super().forward(x) + self.poison


class Normed(MLP):
    def __init__(self, hparams, device="cpu"):
        super().__init__(hparams, device)
        self.norm = torch.nn.BatchNorm1d(1)

    def forward(self, x):
        return self.norm(super().forward(x))


class Branching(MLP):
    """Python control flow on a tensor's value: cannot be mapped over seeds."""
    def forward(self, x):
        out = super().forward(x)
        return out if out.sum() > 0 else -out
'''


@pytest.fixture
def models(workdir, monkeypatch):
    (workdir / "models.py").write_text(MODELS)
    monkeypatch.syspath_prepend(str(workdir))
    monkeypatch.delitem(sys.modules, "models", raising=False)
    return workdir


def both_paths(data: dict) -> tuple:
    """The same config trained seed by seed and as one stack: their results, seed by seed."""
    results = []
    for together in (False, True):
        config = RunConfig.from_dict({**data, "group": f"together_{together}",
                                      "trainer": {**data.get("trainer", {}), "vectorize_seeds": together}})
        results.append(run(config).seeds)
    return tuple(results)


def assert_agree(one_by_one, together, rel=1e-5):
    assert [s.vectorized for s in together] == [True] * len(together)
    assert [s.vectorized for s in one_by_one] == [False] * len(one_by_one)
    for a, b in zip(one_by_one, together):
        summary = [(s.seed, s.status, s.best_epoch, s.epochs_run) for s in (a, b)]
        assert summary[0] == summary[1]
        assert b.best_value == pytest.approx(a.best_value, rel=rel), a.seed
        for row_a, row_b in zip(a.history, b.history):
            assert {k: v for k, v in row_b.items() if k != "wall_time"} == pytest.approx(
                {k: v for k, v in row_a.items() if k != "wall_time"}, rel=rel)


def test_the_shipped_task_agrees_with_one_seed_at_a_time(models, tiny):
    # Gradient accumulation over a batch count it does not divide (5 batches, 2 per step), and a
    # clip that bites: both per seed, as on the sequential path.
    one_by_one, together = both_paths({**tiny, "seeds": [1, 2, 3], "epochs": 5,
                                       "trainer": {"grad_clip": 0.05, "grad_accum": 2}})
    assert_agree(one_by_one, together)
    assert len({s.best_value for s in together}) == 3  # each seed its own initialisation and order
    seed_dir = models / "runs" / "test" / "together_True" / "2"
    assert json.loads((seed_dir / "result.json").read_text())["vectorized"] is True
    assert sorted(p.name for p in seed_dir.iterdir()) == sorted(
        p.name for p in (models / "runs" / "test" / "together_False" / "2").iterdir())
    weights = torch.load(seed_dir / "model.pt", weights_only=True)
    reference = torch.load(models / "runs" / "test" / "together_False" / "2" / "model.pt", weights_only=True)
    assert weights.keys() == reference.keys()
    assert all(torch.allclose(weights[k], reference[k], rtol=1e-4, atol=1e-6) for k in weights)
    provenance = json.loads((seed_dir.parent / "provenance.json").read_text())["invocations"][-1]
    assert (provenance["vectorized"], provenance["one_by_one_because"]) == (True, None)


def test_the_classification_example_agrees(models):
    data = load_yaml(ROOT / "configs" / "run_classify.yaml")
    data.update(project="test", device="cpu", seeds=[1, 2], epochs=6, batch_size=128,
                net_config={**data["net_config"], "nodes": 16},
                data_config={**data["data_config"], "n": 600}, wandb={"mode": "disabled", "tags": []},
                early_stopping={"patience": 2, "min_delta": 0.02})
    one_by_one, together = both_paths(data)
    assert_agree(one_by_one, together)
    assert {"val_accuracy"} <= together[0].history[0].keys()


def test_a_models_own_loss_and_per_seed_stops(models, tiny):
    # The loss hook under vmap; a patience that stops seeds at different epochs.
    one_by_one, together = both_paths({**tiny, "net": "models.Penalised", "seeds": [1, 2, 3],
                                       "epochs": 8, "early_stopping": {"patience": 1, "min_delta": 0.01}})
    assert_agree(one_by_one, together)
    assert "early_stopped" in {s.status for s in together}


def test_a_diverging_seed_changes_no_other(models, tiny):
    one_by_one, together = both_paths({**tiny, "net": "models.Poisoned", "seeds": [1, 2, 3, 4, 5],
                                       "epochs": 3})
    statuses = [s.status for s in together]
    assert "diverged" in statuses and "completed" in statuses
    assert_agree(*([s for s in seeds if s.status != "diverged"] for seeds in (one_by_one, together)))
    assert [s.status for s in one_by_one] == statuses


@pytest.mark.parametrize("change,reason", [
    ({"net": "models.Normed"}, "the model keeps running statistics while training (BatchNorm)"),
    ({"net": "models.Branching"}, "the model's step cannot be mapped over seeds: "),
    ({"scheduler": "torch.optim.lr_scheduler.ReduceLROnPlateau", "scheduler_config": {}},
     "ReduceLROnPlateau needs a learning rate per seed"),
    ({"trainer": {"precision": "fp16"}}, "fp16's gradient scaler"),
    ({"data": "plain_data.load"}, "the data is not in-memory tensors"),  # tests/ is on the path
    ({"optimizer": "torch.optim.Adadelta", "optimizer_config": {}}, "torch.optim.Adadelta is not known"),
    ({"net_config": {"nodes": 256, "layers": 4}, "batch_size": 128}, "each seed's step keeps the CPU busy"),
])
def test_what_cannot_be_stacked_trains_one_by_one_and_says_why_once(models, tiny, capsys, change, reason):
    config = RunConfig.from_dict({**tiny, "seeds": [1, 2], "epochs": 1, "group": "g", **change})
    result = run(config)
    lines = [line for line in capsys.readouterr().err.splitlines() if "one after another" in line]
    assert len(lines) == 1 and lines[0].startswith(f"seeds train one after another: {reason}"), lines
    assert [s.vectorized for s in result.seeds] == [False, False]
    provenance = json.loads((models / "runs" / "test" / "g" / "provenance.json").read_text())
    provenance = provenance["invocations"][-1]
    assert provenance["vectorized"] is False and provenance["one_by_one_because"].startswith(reason)


def test_a_search_trains_each_trials_seeds_together(models, tiny):
    from config import OptimizeConfig
    from engine.search import run_study
    space = {"optimizer_config": {"lr": {"type": "float", "min": 1e-3, "max": 1e-2}}}
    opt = OptimizeConfig.from_dict({"trials": 2, "seed": 0, "study_name": "v", "pruner": None,
                                    "search_space": space})
    study = run_study(RunConfig.from_dict({**tiny, "seeds": [1, 2], "epochs": 2}), opt)
    for trial in study.trials:
        run_dir = models / trial.user_attrs["run_dir"]
        assert [json.loads((run_dir / s / "result.json").read_text())["vectorized"] for s in ("1", "2")] == \
            [True, True]
        assert set(trial.user_attrs["seed_values"]) == {"1", "2"}


def test_each_seed_draws_its_own_dropout_masks(tiny):
    from engine.reproducibility import set_seed
    from engine.vectorized import SeedStack
    config = RunConfig.from_dict(tiny)
    models = []
    for _ in range(2):  # the same weights in both slices: only the dropout masks can differ
        set_seed(0)
        models.append(torch.nn.Sequential(torch.nn.Linear(1, 64), torch.nn.Dropout(0.5),
                                          torch.nn.Linear(64, 1)))
    stack = SeedStack(models, config, config.trainer_settings(), "cpu", [1, 2])
    x = torch.randn(32, 1).expand(2, 32, 1)
    stack.step.train()
    losses = stack.losses(stack.params, stack.buffers, x, torch.zeros(2, 32, 1))
    assert losses[0] != losses[1]
    stack.step.eval()  # and none at all in evaluation
    losses = stack.losses(stack.params, stack.buffers, x, torch.zeros(2, 32, 1))
    assert losses[0] == losses[1]


def test_bf16_autocast_trains_together_as_one_by_one(models, tiny):
    one_by_one, together = both_paths({**tiny, "seeds": [1, 2], "epochs": 3,
                                       "trainer": {"precision": "bf16"}})
    assert_agree(one_by_one, together, rel=2e-2)  # bf16 keeps ~3 significant digits
