"""Your models. Add a class here (or in any importable module) and point `net:` in the run
config at it, e.g. `net: model.MLP`; give its settings in `net_config:`.

The contract: the class is built as `Cls(net_config, device=device)`, where `net_config` is
the YAML's `net_config:` mapping as a plain dict, and then moved to `device`
(`RunConfig.create_model()` does both). Raise (KeyError, ValueError, ...) on settings you
cannot accept: the message reaches the user as one line naming `net_config`, before
anything is written.

The loss: by default a batch's loss is `criterion(model(x), y)`. A model that needs more (a
physics-informed residual, a regulariser, several terms) defines it here, and training,
validation and --preflight all use it; metrics still see `model(x)`:

    def loss(self, x, y, criterion):
        return criterion(self(x), y) + 1e-4 * sum(p.square().sum() for p in self.parameters())
"""
from torch import nn


class MLP(nn.Module):
    """A plain multi-layer perceptron: `layers` hidden layers of `nodes` units with GELU."""

    def __init__(self, hparams: dict, device: str = "cpu"):
        super().__init__()
        self.hparams = hparams
        self.device = device  # where create_model() puts it; build on the CPU, it is moved once
        nodes, layers = hparams["nodes"], hparams["layers"]
        if nodes < 1 or layers < 1:
            raise ValueError(f"nodes and layers must be positive, got nodes={nodes}, layers={layers}")
        input_size = hparams.get("input_size", 1)
        output_size = hparams.get("output_size", 1)

        net = [nn.Linear(input_size, nodes), nn.GELU()]
        for _ in range(layers - 1):
            net += [nn.Linear(nodes, nodes), nn.GELU()]
        net.append(nn.Linear(nodes, output_size))
        self.net = nn.Sequential(*net)

    def forward(self, x):
        return self.net(x)
