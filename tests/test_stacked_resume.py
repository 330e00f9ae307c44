"""Seeds trained together resume whatever their models hold and however the last run ended:
a seed stopped without its result.json, buffers that are not saved, 0-dimensional parameters
with Adam and gradient clipping; and what cannot stack says why and trains one by one (an
optimizer built from more than parameters(), a stack too big for the accelerator)."""
import json

import pytest

from config import RunConfig
from conftest import user_module
from engine.run import run
from engine.stacking import fits
from test_vectorized import MODELS as VECTORIZED_MODELS

MODELS = '''
import torch
from model import MLP


class Scaled(MLP):
    """A learnable 0-dimensional temperature, and a causal-mask-like buffer that is not saved."""
    def __init__(self, hparams, device="cpu"):
        super().__init__(hparams, device)
        self.scale = torch.nn.Parameter(torch.tensor(1.0))
        self.register_buffer("mask", torch.ones(1), persistent=False)

    def forward(self, x):
        return super().forward(x) * self.scale * self.mask


'''


@pytest.fixture
def models(workdir, monkeypatch):
    user_module(workdir, monkeypatch, "stacked_models", MODELS)
    user_module(workdir, monkeypatch, "models", VECTORIZED_MODELS)  # Poisoned: a NaN for some seeds
    return workdir


def interrupted_at(epoch):
    def callback(at, metrics):
        if at == epoch:
            raise KeyboardInterrupt
    return [callback]


@pytest.mark.slow
def test_a_seed_stopped_without_its_result_json_finishes_on_a_stacked_resume(models, tiny):
    config = RunConfig.from_dict({**tiny, "net": "models.Poisoned", "seeds": [1, 2, 3, 4, 5],
                                  "epochs": 4, "checkpoint_every_s": 0, "group": "g"})
    with pytest.raises(KeyboardInterrupt):
        run(config, first_seed_callbacks=interrupted_at(3))
    group = models / "runs" / "test" / "g"
    diverged = [d for d in group.iterdir() if (d / "result.json").exists()
                and json.loads((d / "result.json").read_text())["status"] == "diverged"]
    assert diverged, "no seed diverged: the test needs one"
    for d in diverged:  # killed between its last checkpoint and its result.json
        (d / "result.json").unlink()
    result = run(config, resume=True)
    assert {s.status for s in result.seeds} == {"diverged", "completed"}
    assert all(json.loads((d / "result.json").read_text())["status"] == "diverged" for d in diverged)


@pytest.mark.slow
def test_unsaved_buffers_and_0_dim_parameters_resume_stacked_with_adam_and_clipping(models, tiny, capsys):
    data = {**tiny, "net": "stacked_models.Scaled", "seeds": [1, 2], "epochs": 4, "checkpoint_every_s": 0,
            "optimizer": "torch.optim.Adam", "trainer": {"grad_clip": 0.5}}
    straight = run(RunConfig.from_dict({**data, "group": "straight"}))
    assert "seeds 1,2 train together" in capsys.readouterr().err  # clipping a 0-dim gradient stacks too
    config = RunConfig.from_dict({**data, "group": "resumed"})
    with pytest.raises(KeyboardInterrupt):
        run(config, first_seed_callbacks=interrupted_at(2))
    resumed = run(config, resume=True)
    assert [s.vectorized for s in resumed.seeds] == [True, True]
    assert [s.best_value for s in resumed.seeds] == [s.best_value for s in straight.seeds]


@pytest.mark.slow
def test_a_create_optimizer_that_reads_named_parameters_trains_one_by_one(models, tiny, monkeypatch, capsys):
    import torch

    def create_optimizer(self, model):  # config.py edited for the common recipe: no decay on biases
        named = list(model.named_parameters())
        biases = [p for n, p in named if n.endswith("bias")]
        weights = [p for n, p in named if not n.endswith("bias")]
        return torch.optim.AdamW([{"params": weights}, {"params": biases, "weight_decay": 0.0}], lr=1e-2)

    monkeypatch.setattr(RunConfig, "create_optimizer", create_optimizer)
    result = run(RunConfig.from_dict({**tiny, "seeds": [1, 2], "epochs": 1}))
    (line,) = [line for line in capsys.readouterr().err.splitlines() if line.startswith("seeds")]
    assert line == ("seeds train one after another: the optimizer cannot be built over the stacked weights: "
                    "AttributeError: 'types.SimpleNamespace' object has no attribute 'named_parameters'")
    assert [s.vectorized for s in result.seeds] == [False, False]
    assert all(s.status == "completed" for s in result.seeds)


def test_a_stack_that_would_not_fit_the_accelerator_trains_one_by_one():
    # The decision the trial makes on CUDA, from what a seed added to the stack and what is free.
    gib = 2**30
    assert fits(per_seed=1 * gib, seeds=5, free=8 * gib)
    assert not fits(per_seed=1 * gib, seeds=10, free=8 * gib)  # one by one needs a tenth of it
    assert not fits(per_seed=2 * gib, seeds=4, free=8 * gib)   # a fifth is kept to spare
