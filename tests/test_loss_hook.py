"""The one loss step: a model's own `loss(x, y, criterion)` is what training, validation and
--preflight compute; metrics still see model(x)."""
import csv
import re

import pytest
import torch

from config import RunConfig
from engine.preflight import preflight
from engine.run import run

HOOKED = '''
from model import MLP


class Offset(MLP):
    """The MLP with a known constant added to its loss: no gradient changes."""

    def loss(self, x, y, criterion):
        return criterion(self(x), y) + 1.0


class Shrink(MLP):
    """The MLP with a weight penalty: a term that changes what is learned."""

    def loss(self, x, y, criterion):
        return criterion(self(x), y) + 0.1 * sum(p.square().sum() for p in self.parameters())
'''


@pytest.fixture
def hooked(workdir, monkeypatch, tiny):
    """The tiny config, with mse_loss as a metric (it sees model(x)); the hooked models importable."""
    (workdir / "hooked_models.py").write_text(HOOKED)
    monkeypatch.syspath_prepend(str(workdir))
    tiny.update(seeds=[3], metrics=["torch.nn.functional.mse_loss"])
    return tiny


def rows(result):
    with open(result.group_dir / "3" / "metrics.csv") as f:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]


def weights(result):
    return torch.load(result.group_dir / "3" / "model.pt", weights_only=True)


def test_training_and_validation_use_the_models_loss(hooked):
    plain = run(RunConfig.from_dict({**hooked, "group": "plain"}))
    offset = run(RunConfig.from_dict({**hooked, "group": "offset", "net": "hooked_models.Offset"}))
    # A constant changes no gradient: the same weights, bit for bit ...
    assert all(torch.equal(weights(plain)[k], weights(offset)[k]) for k in weights(plain))
    # ... while every loss that was logged is the model's own: one more.
    for p, o in zip(rows(plain), rows(offset), strict=True):
        assert o["train_loss"] == pytest.approx(p["train_loss"] + 1.0, abs=1e-5)
        assert o["val_loss"] == pytest.approx(p["val_loss"] + 1.0, abs=1e-5)
        assert o["val_mse_loss"] == p["val_mse_loss"]  # metrics see model(x), not the loss
    assert offset.seeds[0].best_value == pytest.approx(plain.seeds[0].best_value + 1.0, abs=1e-5)


def test_a_loss_term_changes_what_is_learned(hooked):
    plain = run(RunConfig.from_dict({**hooked, "group": "plain"}))
    shrunk = run(RunConfig.from_dict({**hooked, "group": "shrunk", "net": "hooked_models.Shrink"}))
    norm = lambda result: sum(w.square().sum() for w in weights(result).values())  # noqa: E731
    assert norm(shrunk) < 0.9 * norm(plain)
    last = rows(shrunk)[-1]
    assert last["val_loss"] > last["val_mse_loss"]  # the penalty is in the reported loss


def preflight_table(config, capsys):
    assert preflight(config) == 0
    out = capsys.readouterr().out
    return {name: value for name, value in re.findall(r"^  (loss|gradient norm)\s+(\S+)$", out, re.M)}


def test_preflight_checks_the_models_loss(hooked, capsys):
    plain = preflight_table(RunConfig.from_dict(hooked), capsys)
    offset = preflight_table(RunConfig.from_dict({**hooked, "net": "hooked_models.Offset"}), capsys)
    assert float(offset["loss"]) == pytest.approx(float(plain["loss"]) + 1.0, abs=1e-5)
    assert offset["gradient norm"] == plain["gradient norm"]
    shrunk = preflight_table(RunConfig.from_dict({**hooked, "net": "hooked_models.Shrink"}), capsys)
    assert float(shrunk["gradient norm"]) != float(plain["gradient norm"])  # the penalty's gradient


def test_preflight_leaves_the_output_shape_to_a_models_own_loss(workdir, monkeypatch, tiny, capsys):
    # Two outputs, of which the loss uses the first: criterion(model(x), y) would broadcast,
    # the model's own loss does not, and that is what training runs.
    (workdir / "sliced.py").write_text(
        "from model import MLP\n\n"
        "class Sliced(MLP):\n"
        "    def loss(self, x, y, criterion):\n"
        "        return criterion(self(x)[:, :1], y)\n")
    monkeypatch.syspath_prepend(str(workdir))
    tiny["net_config"].update(output_size=2)
    assert preflight(RunConfig.from_dict({**tiny, "net": "sliced.Sliced"})) == 0
    out = capsys.readouterr().out
    assert "all checks passed" in out and re.search(r"^  output\s+\(64, 2\) float32$", out, re.M)
    with pytest.warns(UserWarning, match="broadcasting"):  # torch's own warning, for the plain MLP
        assert preflight(RunConfig.from_dict(tiny)) == 1  # whose shapes do not fit
    assert "FAIL output shape: output (64, 2) vs target (64, 1)" in capsys.readouterr().out
