"""The `trainer:` options on CPU, and the fast in-memory path against a plain loop."""
import csv
import math
import os

import pytest
import torch

from config import RunConfig
from conftest import PlainDataset, needs_cuda
from engine import checkpoint
from engine.reproducibility import set_seed
from engine.run import run
from engine.trainer import LossStep, Trainer
from model import MLP
from util import load_data

BASE = {"project": "t", "seeds": [0], "epochs": 3, "batch_size": 8, "net": "model.MLP",
        "net_config": {"nodes": 8, "layers": 2}, "optimizer": "torch.optim.SGD",
        "optimizer_config": {"lr": 0.05}, "data": "util.load_data", "data_config": {"n": 320}}


def make_trainer(config):
    model = config.create_model()
    return model, Trainer(model, config.create_optimizer(model), config.trainer_settings(),
                          criterion=config.create_criterion())


def train(settings=None, seed=0, expect_step=LossStep, wrap=lambda dataset: dataset):
    """Train BASE (+ dotted settings) with the Trainer; returns (history, final state_dict).
    `expect_step`: the type the step must call (the compiled loss step under compile)."""
    config = RunConfig.from_dict(BASE).with_overrides(settings or {})
    set_seed(seed)
    model, trainer = make_trainer(config)
    assert isinstance(trainer.loss_step, expect_step)
    result = trainer.train(*map(wrap, config.load_data()), seed=seed)
    return result.history, model.state_dict()


def test_fast_path_matches_a_plain_pytorch_loop():
    history, state = train({"early_stopping.patience": None})
    # The plain loop everyone writes, with the same seed, order and weighting.
    set_seed(0)
    model = MLP({"nodes": 8, "layers": 2})
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    (x, y), (vx, vy) = (d.tensors for d in load_data(n=320))
    generator = torch.Generator().manual_seed(0)
    for epoch in range(3):
        order, total = torch.randperm(len(x), generator=generator), 0.0
        for i in range(0, len(x), 8):
            index = order[i:i + 8]
            optimizer.zero_grad()
            loss = torch.nn.functional.mse_loss(model(x[index]), y[index])
            loss.backward()
            optimizer.step()
            total += loss.item() * len(index)
        with torch.no_grad():
            val = torch.nn.functional.mse_loss(model(vx), vy).item()
        assert history[epoch]["train_loss"] == pytest.approx(total / len(x), rel=1e-5)
        assert history[epoch]["val_loss"] == pytest.approx(val, rel=1e-5)


def test_gradient_accumulation_equals_a_bigger_batch():
    big, big_state = train({"batch_size": 16})
    accumulated, acc_state = train({"batch_size": 8, "trainer.grad_accum": 2})
    for a, b in zip(big, accumulated):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)
        assert a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-5)
    for key in big_state:
        assert torch.allclose(big_state[key], acc_state[key], atol=1e-6)


def test_the_last_shorter_accumulation_is_not_under_scaled():
    # 256 training samples in batches of 8: 32 batches, so grad_accum 3 leaves 2 for the last step.
    _, state = train({"epochs": 1, "trainer.grad_accum": 3})
    set_seed(0)
    model = MLP({"nodes": 8, "layers": 2})
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    x, y = load_data(n=320)[0].tensors
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    batches = [order[i:i + 8] for i in range(0, len(x), 8)]
    assert len(batches) % 3 == 2
    for first in range(0, len(batches), 3):  # each step: the mean of the batch losses it sums
        group = batches[first:first + 3]
        for index in group:
            (torch.nn.functional.mse_loss(model(x[index]), y[index]) / len(group)).backward()
        optimizer.step()
        optimizer.zero_grad()
    for key, value in model.state_dict().items():
        assert torch.allclose(state[key], value, atol=1e-6), key


def test_gradient_clipping_bounds_each_step():
    config = RunConfig.from_dict({**BASE, "epochs": 1, "batch_size": 320, "optimizer_config": {"lr": 1.0},
                                  "trainer": {"grad_clip": 1e-3}})
    set_seed(0)
    model, trainer = make_trainer(config)
    before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
    trainer.train_epoch(trainer.on_device(config.load_data()[0]))  # one batch: one step
    after = torch.cat([p.detach().flatten() for p in model.parameters()])
    assert 0 < (after - before).norm().item() <= 1e-3 * (1 + 1e-4)  # lr x clip


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_trains_on_cpu(precision, workdir):
    fp32, _ = train()
    mixed, _ = train({"trainer.precision": precision})
    assert all(math.isfinite(h["train_loss"]) for h in mixed)
    assert mixed[-1]["val_loss"] == pytest.approx(fp32[-1]["val_loss"], rel=0.1)  # close, not equal
    assert mixed[-1]["val_loss"] != fp32[-1]["val_loss"]  # autocast really ran
    # The gradient scaler's state is part of the checkpoint, and resuming with it works.
    config = {**BASE, "group": "amp", "checkpoint_every_s": 0, "wandb": {"mode": "disabled"},
              "trainer": {"precision": precision}}
    done = run(RunConfig.from_dict(config))
    state = checkpoint.load(done.group_dir / "0" / "checkpoint.pt")
    assert ("scale" in state["scaler"]) == (precision == "fp16")  # a scaler only where fp16 needs one
    longer = run(RunConfig.from_dict({**config, "epochs": 5}), resume=True)
    assert longer.seeds[0].status == "completed" and longer.seeds[0].epochs_run == 5


@pytest.mark.slow
def test_compile_gives_the_same_numbers():
    eager, _ = train({"epochs": 1})
    compiled, _ = train({"epochs": 1, "trainer.compile": True},
                        expect_step=torch._dynamo.eval_frame.OptimizedModule)
    assert compiled[0]["train_loss"] == pytest.approx(eager[0]["train_loss"], rel=1e-4)
    assert compiled[0]["val_loss"] == pytest.approx(eager[0]["val_loss"], rel=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=needs_cuda)])
def test_checkpoints_move_between_compiled_and_eager(workdir, device):
    # trainer.compile changes how fast a group trains, not what: a resume may switch it.
    config = {**BASE, "device": device, "group": "g", "checkpoint_every_s": 0, "wandb": {"mode": "disabled"}}
    straight = run(RunConfig.from_dict({**config, "group": "straight", "epochs": 4})).seeds[0].history
    run(RunConfig.from_dict({**config, "epochs": 2, "trainer": {"compile": True}}))
    run(RunConfig.from_dict({**config, "epochs": 3}), resume=True)  # eager, from a compiled run
    back = run(RunConfig.from_dict({**config, "epochs": 4, "trainer": {"compile": True}}), resume=True)
    (seed,) = back.seeds
    assert seed.status == "completed" and seed.epochs_run == 4
    with open(back.group_dir / "0" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    for row, reference in zip(rows, straight, strict=True):
        assert float(row["val_loss"]) == pytest.approx(reference["val_loss"], rel=1e-4)


class WorkerOnlyDataset(PlainDataset):
    """Fails outside a DataLoader worker, and writes each worker's process id to `pids`."""

    def __init__(self, inner, pids):
        super().__init__(inner)
        self.pids = pids

    def __getitem__(self, i):
        if torch.utils.data.get_worker_info() is None:
            raise RuntimeError("loaded in the main process: num_workers was ignored")
        with open(self.pids, "a") as f:
            f.write(f"{os.getpid()}\n")
        return self.inner[i]


@pytest.mark.parametrize("persistent", [False, True])
def test_dataloader_workers_give_the_same_numbers(tmp_path, persistent):
    inline, _ = train({"epochs": 3}, wrap=PlainDataset)
    pids = tmp_path / "pids"
    options = {"epochs": 3, "trainer.num_workers": 1, "trainer.persistent_workers": persistent}
    workers, _ = train(options, wrap=lambda dataset: WorkerOnlyDataset(dataset, pids))
    assert [h["train_loss"] for h in inline] == [h["train_loss"] for h in workers]
    assert [h["val_loss"] for h in inline] == [h["val_loss"] for h in workers]
    # One worker each for training and validation: persistent ones live through all 3 epochs.
    assert len(set(pids.read_text().split())) == (2 if persistent else 6)
