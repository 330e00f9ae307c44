"""Model definitions. Add your own class here (or in any importable module) and
point `net:` in the run config at it, e.g. `net: model.MLP`.

The contract: the class is built as `Cls(net_config, device=device)`, where
`net_config` is the YAML's `net_config:` mapping as a plain dict. Raise
(KeyError, ValueError, ...) on settings you cannot accept: the message reaches
the user as one line naming `net_config`, before anything is written.
"""
from torch import nn


class MLP(nn.Module):
    """A plain multi-layer perceptron: `layers` hidden layers of `nodes` units with GELU."""

    def __init__(self, hparams: dict, device: str = "cpu"):
        super().__init__()
        self.hparams = hparams
        self.device = device
        nodes, layers = hparams["nodes"], hparams["layers"]
        if nodes < 1 or layers < 1:
            raise ValueError(f"nodes and layers must be positive, got nodes={nodes}, layers={layers}")
        input_size = hparams.get("input_size", 1)
        output_size = hparams.get("output_size", 1)

        net = [nn.Linear(input_size, nodes), nn.GELU()]
        for _ in range(layers - 1):
            net += [nn.Linear(nodes, nodes), nn.GELU()]
        net.append(nn.Linear(nodes, output_size))
        self.net = nn.Sequential(*net).to(device)

    def forward(self, x):
        return self.net(x)
