"""Your models. Add a class here (or in any importable module) and point `net:` in the run
config at it, e.g. `net: model.MLP`; give its settings in `net_config:`.

How a class is built, decided by its constructor's signature before anything runs:
- `Cls(net_config, device=device)` when the constructor takes the settings as one mapping (a
  first parameter named hparams/config/cfg/..., annotated dict, or unannotated with no key of
  net_config near any parameter's name): the tutorial's form, as MLP below.
- otherwise `Cls(**net_config)`, as public models are written (`Net()`,
  `DenseNet(input_size=784, hidden=256)`), with `device=` only if the constructor takes it.
Either way the model is then moved to the device. A key the constructor cannot take, or a
required one missing, is one line naming net_config, the key, the class and the nearest
parameter; raise (KeyError, ValueError, ...) on values you cannot accept.

Two optional methods, used everywhere the engine needs them (engine/contract.py):
- `loss(self, x, y, criterion)`: the scalar loss of one batch, for training, validation and
  --preflight alike. Default: criterion(model(x), y). Define it for extra terms, a
  physics-informed residual (Oscillator below), or an output that is not one tensor (a VAE's
  (recon, mu, logvar), a GPT's (logits, loss)); validation then runs with gradients available.
- `predict(self, x)`: the tensor that metrics, plots and load_run compare with y. Default:
  model(x), or its first element when forward returns a tuple.
"""
import torch
from torch import nn
from torch.func import grad, vmap


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


class Oscillator(nn.Module):
    """A physics-informed network (configs/run_pinn.yaml): u(t) for the damped oscillator
    u'' + 2 zeta omega u' + omega^2 u = 0 with u(0) = 1, u'(0) = 0, learnt from the equation
    alone: the loss is the residual at the batch's times t plus the initial conditions, and y
    (the known solution) is only compared with, by metrics and plots."""

    def __init__(self, nodes: int = 32, layers: int = 3, equation: dict | None = None):
        super().__init__()
        equation = equation or {"zeta": 0.2, "omega": 6.0}
        self.zeta, self.omega = float(equation["zeta"]), float(equation["omega"])
        net = [nn.Linear(1, nodes), nn.Tanh()]
        for _ in range(layers - 1):
            net += [nn.Linear(nodes, nodes), nn.Tanh()]
        self.net = nn.Sequential(*net, nn.Linear(nodes, 1))

    def forward(self, t):
        return self.net(t)

    def loss(self, t, y, criterion):
        u = lambda s: self.net(s).squeeze(-1)  # noqa: E731  (one time, shape (1,), to u)
        du = grad(u)                           # torch.func, not autograd.grad: it works on one
        d2u = grad(lambda s: du(s).squeeze(-1))  # model and on seeds stacked with vmap alike
        # The residual, divided by omega^2 so that its terms are of order 1.
        residual = vmap(d2u)(t) / self.omega**2 + 2 * self.zeta / self.omega * vmap(du)(t) + self.net(t)
        start = torch.zeros(1, dtype=t.dtype, device=t.device)
        initial = (u(start) - 1) ** 2 + (du(start).squeeze(-1) / self.omega) ** 2
        return criterion(residual, torch.zeros_like(residual)) + initial
