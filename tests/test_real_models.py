"""Models in the shapes public repositories write them, pasted unchanged into a module of the
user's: they train (seeds together where torch.func allows, else one by one), pre-flight,
analyse and load. Every class and data function here is our own, written in those shapes."""
import json

import pytest
import torch

import analyze
from config import ConfigError, RunConfig
from conftest import user_module
from engine.preflight import preflight
from engine.run import run

SHAPES = '''
import torch
from torch import nn
from torch.utils.data import TensorDataset


def regression(n=96, inputs=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, inputs, generator=g)
    y = x.sum(dim=1, keepdim=True).sin()
    return TensorDataset(x[:64], y[:64]), TensorDataset(x[64:], y[64:])


def autoencoding(n=96, inputs=3, seed=0):
    x = torch.randn(n, inputs, generator=torch.Generator().manual_seed(seed))
    return TensorDataset(x[:64], x[:64]), TensorDataset(x[64:], x[64:])


def images(n=96, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    label = torch.randint(classes, (n,), generator=g)
    x = torch.randn(n, 1, 8, 8, generator=g) + label.view(-1, 1, 1, 1)
    return TensorDataset(x[:64], label[:64]), TensorDataset(x[64:], label[64:])


def sequences(n=96, steps=6, features=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, steps, features, generator=g)  # batch-first, as the data function gives it
    y = x.sum(dim=(1, 2)).unsqueeze(1) / steps
    return TensorDataset(x[:64], y[:64]), TensorDataset(x[64:], y[64:])


def tokens(n=96, steps=8, vocab=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(vocab, (n, steps), generator=g)
    y = (x + 1) % vocab  # the next token, one step on
    return TensorDataset(x[:64], y[:64]), TensorDataset(x[64:], y[64:])


class DenseNet(nn.Module):
    """Keyword arguments, as Hydra's _target_ builds them."""
    def __init__(self, input_size: int = 784, lin1_size: int = 256, output_size: int = 10):
        super().__init__()
        self.model = nn.Sequential(nn.Linear(input_size, lin1_size), nn.ReLU(),
                                   nn.Linear(lin1_size, output_size))

    def forward(self, x):
        return self.model(x)


class Net(nn.Module):
    """No arguments at all; 4-D image input, class scores out."""
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 8 * 8, 3)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).flatten(1))


class VAE(nn.Module):
    """forward returns (reconstruction, mu, logvar); the loss needs all three."""
    def __init__(self, input_dim, latent_dim=2):
        super().__init__()
        self.encode = nn.Linear(input_dim, 2 * latent_dim)
        self.decode = nn.Linear(latent_dim, input_dim)

    def forward(self, x):
        mu, logvar = self.encode(x).chunk(2, dim=-1)
        z = mu + torch.randn_like(mu) * (0.5 * logvar).exp()
        return self.decode(z), mu, logvar

    def loss(self, x, y, criterion):
        recon, mu, logvar = self(x)
        return criterion(recon, y) - 0.5 * (1 + logvar - mu.square() - logvar.exp()).sum(-1).mean()


class RNN(nn.Module):
    """Sequence-first (batch_first=False), and forward needs a hidden state: loss and predict
    give it one, so the engine only ever calls loss(x, y, criterion) and predict(x)."""
    def __init__(self, features, hidden):
        super().__init__()
        self.rnn = nn.GRU(features, hidden)
        self.head = nn.Linear(hidden, 1)
        self.hidden = hidden

    def forward(self, x, hidden):
        out, hidden = self.rnn(x, hidden)
        return self.head(out[-1]), hidden

    def predict(self, x):
        x = x.transpose(0, 1)  # (steps, batch, features): what the GRU expects
        return self(x, x.new_zeros(1, x.shape[1], self.hidden))[0]

    def loss(self, x, y, criterion):
        return criterion(self.predict(x), y)


class GPT(nn.Module):
    """forward(idx, targets=None) returns (logits, loss), as nanoGPT-like models do."""
    def __init__(self, vocab_size, n_embd, block_size):
        super().__init__()
        self.tok = nn.Embedding(vocab_size, n_embd)
        self.pos = nn.Parameter(torch.zeros(block_size, n_embd))
        self.head = nn.Linear(n_embd, vocab_size)
        self.register_buffer("mask", torch.tril(torch.ones(block_size, block_size)), persistent=False)

    def forward(self, idx, targets=None):
        h = self.tok(idx) + self.pos[: idx.shape[1]]
        weights = (h @ h.transpose(-1, -2)).masked_fill(self.mask[: idx.shape[1], : idx.shape[1]] == 0,
                                                         float("-inf")).softmax(-1)
        logits = self.head(weights @ h)
        if targets is None:
            return logits, None
        return logits, nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())

    def loss(self, x, y, criterion):
        return self(x, y)[1]

    def predict(self, x):
        return self(x)[0]


def token_accuracy(pred, target):
    return (pred.argmax(-1) == target).float().mean()
'''

# name: (net, net_config, data, criterion, metrics)
CASES = {
    "keywords": ("DenseNet", {"input_size": 3, "lin1_size": 8, "output_size": 1}, "regression",
                 "torch.nn.MSELoss", []),
    "images": ("Net", {}, "images", "torch.nn.CrossEntropyLoss", ["util.accuracy"]),
    "tuple": ("VAE", {"input_dim": 3}, "autoencoding", "torch.nn.MSELoss", []),
    "hidden-state": ("RNN", {"features": 2, "hidden": 4}, "sequences", "torch.nn.MSELoss",
                     ["torch.nn.functional.mse_loss"]),
    "gpt": ("GPT", {"vocab_size": 5, "n_embd": 8, "block_size": 8}, "tokens", "torch.nn.CrossEntropyLoss",
            ["shapes.token_accuracy"]),
}


@pytest.fixture
def shapes(workdir, monkeypatch):
    user_module(workdir, monkeypatch, "shapes", SHAPES)
    return workdir


def config_for(tiny: dict, case: str, **change) -> RunConfig:
    net, net_config, data, criterion, metrics = CASES[case]
    return RunConfig.from_dict({**tiny, "seeds": [1, 2], "epochs": 2, "batch_size": 16, "scheduler": None,
                                "net": f"shapes.{net}", "net_config": net_config, "data": f"shapes.{data}",
                                "data_config": {}, "criterion": criterion, "metrics": metrics,
                                "group": case, **change})


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_each_shape_trains_preflights_analyses_and_loads(shapes, tiny, case, capsys):
    config = config_for(tiny, case)
    result = run(config)
    assert [s.status for s in result.seeds] == ["completed", "completed"]
    for seed in result.seeds:
        assert all(torch.isfinite(torch.tensor(row["val_loss"])) for row in seed.history)
    err = capsys.readouterr().err
    assert len([line for line in err.splitlines() if line.startswith("seeds ")]) == 1  # one line says how
    assert preflight(config) == 0, capsys.readouterr().out
    assert analyze.main(["--project", "test", "--group", case]) == 0
    out = capsys.readouterr().out
    assert "plots:" in out and "no prediction plot" not in out
    drawn = "confusion" if CASES[case][3].endswith("CrossEntropyLoss") else "prediction"
    assert all((result.group_dir / "plots" / f"{drawn}_{seed}.png").exists() for seed in (1, 2))
    loaded = analyze.load_run(result.group_dir)
    x, y = config.load_data()[1][:4]
    pred = loaded.predict(1, x)
    assert torch.is_tensor(pred) and pred.shape[0] == 4


@pytest.mark.slow
def test_a_tuple_output_is_the_first_element_for_metrics_said_once(shapes, tiny, capsys):
    run(config_for(tiny, "tuple", metrics=["torch.nn.functional.mse_loss"]))
    said = [line for line in capsys.readouterr().err.splitlines() if "first element" in line]
    assert said == ["VAE returns a tuple of 3: metrics and plots see its first element "
                    "(define predict(self, x) to choose)"]


@pytest.mark.parametrize("net_config,words", [
    ({"input_size": 3, "lin1_sise": 8}, "net_config: unknown key 'lin1_sise' for shapes.DenseNet "
                                        "(did you mean 'lin1_size'?)"),
    ({"features": 2}, "net_config: missing key 'hidden', which shapes.RNN needs (it takes features, hidden)"),
])
def test_a_net_config_that_does_not_fit_the_constructor_is_one_line(shapes, tiny, net_config, words):
    net = "DenseNet" if "input_size" in net_config else "RNN"
    with pytest.raises(ConfigError) as info:
        RunConfig.from_dict({**tiny, "net": f"shapes.{net}", "net_config": net_config}, source="c.yaml")
    assert str(info.value) == f"c.yaml: {words}"


@pytest.mark.slow
def test_a_models_constructor_runs_once_per_seed(shapes, tiny, capsys):
    (shapes / "counted.py").write_text(
        "from model import MLP\n\n\nclass Loud(MLP):\n"
        "    def __init__(self, hparams, device='cpu'):\n"
        "        print('built')\n        super().__init__(hparams, device)\n")
    for together in (True, False):
        run(RunConfig.from_dict({**tiny, "seeds": [1, 2, 3], "epochs": 1, "net": "counted.Loud",
                                 "group": f"g{together}", "trainer": {"vectorize_seeds": together}}))
        assert capsys.readouterr().out.count("built") == 3


@pytest.mark.slow
def test_the_line_gives_every_reason_the_seeds_train_one_by_one(shapes, tiny, capsys):
    (shapes / "normed.py").write_text(
        "import torch\nfrom model import MLP\n\n\nclass Normed(MLP):\n"
        "    def __init__(self, hparams, device='cpu'):\n"
        "        super().__init__(hparams, device)\n        self.norm = torch.nn.BatchNorm1d(1)\n\n"
        "    def forward(self, x):\n        return self.norm(super().forward(x))\n")
    run(RunConfig.from_dict({**tiny, "seeds": [1, 2], "epochs": 1, "net": "normed.Normed",
                             "scheduler": "torch.optim.lr_scheduler.ReduceLROnPlateau",
                             "scheduler_config": {}}))
    (line,) = [line for line in capsys.readouterr().err.splitlines() if line.startswith("seeds")]
    assert line == ("seeds train one after another: ReduceLROnPlateau needs a learning rate per seed; "
                    "the model keeps running statistics while training (BatchNorm)")
    run(RunConfig.from_dict({**tiny, "seeds": [1, 2], "epochs": 1, "group": "together"}))
    (line,) = [line for line in capsys.readouterr().err.splitlines() if line.startswith("seeds")]
    assert line == "seeds 1,2 train together as one stacked model"


EDGES = '''
import torch
from torch import nn
from torch.utils.data import TensorDataset
from model import MLP


def strided(n=96):
    """Tensors that are views with strides, as a transpose or a column slice gives them."""
    x = torch.randn(2, n).t()  # (n, 2), not contiguous
    y = x.sum(dim=1, keepdim=True)
    return TensorDataset(x[:64], y[:64]), TensorDataset(x[64:], y[64:])


class Flat(nn.Module):
    """Calls .view, which needs contiguous input: fine on shuffled (gathered) batches."""
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(2, 1)

    def forward(self, x):
        return self.fc(x.view(len(x), -1))


class Smooth(MLP):
    """An input-gradient penalty through torch.autograd.grad: needs gradients in validation."""
    def loss(self, x, y, criterion):
        x = x.requires_grad_(True)
        pred = self(x)
        (slope,) = torch.autograd.grad(pred.sum(), x, create_graph=True)
        return criterion(pred, y) + 1e-3 * slope.square().mean()


def broken_metric(pred, target):
    return pred.view(-1, 7).mean()  # fails on any batch whose size is not a multiple of 7
'''


@pytest.fixture
def edges(workdir, monkeypatch):
    user_module(workdir, monkeypatch, "edges", EDGES)
    return workdir


def test_validation_batches_are_contiguous_like_training_ones(edges, tiny):
    config = RunConfig.from_dict({**tiny, "net": "edges.Flat", "net_config": {}, "data": "edges.strided",
                                  "data_config": {}, "epochs": 2, "seeds": [1]})
    assert run(config).seeds[0].status == "completed"
    assert preflight(config) == 0


@pytest.mark.slow
def test_an_input_gradient_loss_trains_validates_and_preflights(edges, tiny, capsys):
    config = RunConfig.from_dict({**tiny, "net": "edges.Smooth", "epochs": 2, "seeds": [1, 2]})
    result = run(config)
    assert [s.status for s in result.seeds] == ["completed", "completed"]
    assert all(row["val_loss"] > 0 for s in result.seeds for row in s.history)
    (line,) = [line for line in capsys.readouterr().err.splitlines() if line.startswith("seeds")]
    # autograd.grad cannot run under vmap (torch.func.grad can: the PINN example): one by one.
    assert line.startswith("seeds train one after another: the model's step cannot be mapped over seeds")
    assert preflight(config) == 0


def test_preflight_runs_every_metric_and_names_the_stage_that_fails(edges, tiny, capsys):
    config = RunConfig.from_dict({**tiny, "metrics": ["edges.broken_metric"], "epochs": 1, "seeds": [1]})
    assert preflight(config) == 1
    out = capsys.readouterr().out
    (failure,) = [line for line in out.splitlines() if line.startswith("FAIL")]
    assert failure.startswith("FAIL validation (metric val_broken_metric): RuntimeError: shape '[-1, 7]'")
    assert "Traceback" not in out


DROPPED = '''
import torch
from model import MLP


class Dropped(MLP):
    """Dropout, and for some seeds a NaN drawn at initialisation: those diverge at once."""
    def __init__(self, hparams, device="cpu"):
        super().__init__(hparams, device)
        self.drop = torch.nn.Dropout(0.3)
        self.poison = torch.nn.Parameter(torch.tensor(float("nan") if torch.rand(()) < 0.5 else 0.0))

    def forward(self, x):
        return self.drop(super().forward(x)) + self.poison
'''


@pytest.mark.slow
def test_a_stacked_resume_after_a_seed_stopped_is_bit_identical_with_dropout(workdir, monkeypatch, tiny):
    from conftest import assert_same_as
    from engine.reproducibility import set_seed
    user_module(workdir, monkeypatch, "dropped", DROPPED)
    data = {**tiny, "net": "dropped.Dropped", "epochs": 5, "checkpoint_every_s": 0}
    poisoned = {}
    for seed in range(1, 30):
        set_seed(seed)
        poisoned[seed] = bool(RunConfig.from_dict(data).create_model("cpu").poison.isnan())
    clean = [s for s, bad in poisoned.items() if not bad]
    seeds = [clean[0], next(s for s, bad in poisoned.items() if bad), clean[1]]
    straight = run(RunConfig.from_dict({**data, "seeds": seeds, "group": "straight"}))
    assert [s.status for s in straight.seeds] == ["completed", "diverged", "completed"]

    def interrupt(epoch, metrics):
        if epoch == 3:
            raise KeyboardInterrupt

    config = RunConfig.from_dict({**data, "seeds": seeds, "group": "resumed"})
    with pytest.raises(KeyboardInterrupt):  # the middle seed stopped in epoch 1, and its files are written
        run(config, first_seed_callbacks=[interrupt])
    assert json.loads((workdir / "runs/test/resumed" / str(seeds[1]) / "result.json").read_text())[
        "status"] == "diverged"
    resumed = run(config, resume=True)
    assert [s.vectorized for s in resumed.seeds] == [True, True, True]
    assert_same_as(resumed.group_dir, straight.group_dir, [seeds[0], seeds[2]])


@pytest.mark.slow
def test_provenance_says_the_seeds_trained_one_by_one_when_a_resume_falls_back(workdir, tiny, capsys):
    def interrupt(epoch, metrics):
        if epoch == 2:
            raise KeyboardInterrupt

    config = RunConfig.from_dict({**tiny, "seeds": [1, 2], "checkpoint_every_s": 0, "group": "g"})
    with pytest.raises(KeyboardInterrupt):
        run(config, first_seed_callbacks=[interrupt])
    for name in ("checkpoint.pt", "checkpoint.prev.pt"):  # seed 2 starts again: the seeds cannot stack
        (workdir / "runs" / "test" / "g" / "2" / name).unlink(missing_ok=True)
    capsys.readouterr()
    result = run(config, resume=True)
    assert [s.vectorized for s in result.seeds] == [False, False]
    said = [line for line in capsys.readouterr().err.splitlines() if line.startswith("seeds")]
    assert said == ["seeds train one after another: some seeds have a checkpoint and some none"]  # one line
    last = json.loads((result.group_dir / "provenance.json").read_text())["invocations"][-1]
    assert last["vectorized"] is False
    assert last["one_by_one_because"] == "some seeds have a checkpoint and some none"
