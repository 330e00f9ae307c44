"""One loop for one model and for a stack of seeds: a change to the loss of a batch
(engine/contract.py LossStep) or to the optimizer step (Trainer.optimizer_step) is made in
one function, and both paths (vectorize_seeds true and false) run it."""
import pytest
import torch

from config import RunConfig
from engine.contract import LossStep
from engine.reproducibility import set_seed
from engine.run import run
from engine.trainer import Trainer


def train_both(tiny: dict, together: bool):
    config = RunConfig.from_dict({**tiny, "seeds": [1, 2], "epochs": 2, "group": f"g{together}",
                                  "trainer": {"vectorize_seeds": together}})
    result = run(config)
    assert [s.vectorized for s in result.seeds] == [together, together]
    return config, result


@pytest.mark.slow
@pytest.mark.parametrize("together", [False, True], ids=["one-by-one", "seeds-together"])
def test_a_changed_loss_step_is_what_both_paths_train_and_validate(workdir, tiny, monkeypatch, together):
    original = LossStep.forward

    def shifted(self, x, y, prediction=False):
        loss, pred = original(self, x, y, prediction)
        return loss + 100.0, pred

    monkeypatch.setattr(LossStep, "forward", shifted)
    _, result = train_both(tiny, together)
    rows = [row for seed in result.seeds for row in seed.history]
    assert len(rows) == 4
    assert all(row["train_loss"] > 100 and row["val_loss"] > 100 for row in rows)


@pytest.mark.slow
@pytest.mark.parametrize("together", [False, True], ids=["one-by-one", "seeds-together"])
def test_a_changed_optimizer_step_is_what_both_paths_take(workdir, tiny, monkeypatch, together):
    steps = []

    def frozen(self):  # no update at all: the weights must end as they were built
        steps.append(self.stacked)
        self.optimizer.zero_grad(set_to_none=True)

    monkeypatch.setattr(Trainer, "optimizer_step", frozen)
    config, result = train_both(tiny, together)
    batches = 2 * -(-300 // config.batch_size)  # 2 epochs of the 300 training samples
    # Together: one step for both seeds, and one in the one-batch trial that lets them stack.
    assert steps == ([True] * (batches + 1) if together else [False] * 2 * batches)
    for seed in result.seeds:
        set_seed(seed.seed)
        built = config.create_model("cpu").state_dict()
        trained = torch.load(f"{seed.run_dir}/model.pt", weights_only=True)
        assert all(torch.equal(built[k], trained[k]) for k in built)
