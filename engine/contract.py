"""What the engine asks of your model, and the one place each part of it is used.

    model = config.create_model()        # Net(net_config, device=...) or Net(**net_config):
                                         #   engine/resolve.py build_model, by Net's signature
    step = LossStep(model, criterion)    # the loss of a batch: model.loss(x, y, criterion), or
    loss, pred = step(x, y, True)        # criterion(model(x), y); training, validation, --preflight
    pred = predict(model, x)             # what metrics, plots and load_run compare with y

A model class in model.py needs only `__init__` and `forward`, as public repositories write
them. It may add `loss(self, x, y, criterion)`, the scalar loss of one batch (a physics-informed
residual, a regulariser, several terms, an output that is not one tensor), and
`predict(self, x)`, the tensor to compare with y. The loop, one model or a stack of seeds, DDP
and torch.compile all run the loss through LossStep, so it never needs an edit in the engine.
"""
from __future__ import annotations

import inspect
import sys
from typing import Any, Callable

import torch


def has_own_loss(model: torch.nn.Module) -> bool:
    """Whether the model's class defines `loss(self, x, y, criterion)`."""
    return inspect.isfunction(getattr(type(model), "loss", None))


class LossStep(torch.nn.Module):
    """The loss of one batch, the one place it is computed: `model.loss(x, y, criterion)` when
    the model defines it, else `criterion(model(x), y)`. A module, so that DDP, torch.compile and
    vmap wrap the whole step. Returns (loss, the prediction); where the prediction costs a second
    forward pass (the model's own loss or predict), it comes only when `prediction` asks."""

    def __init__(self, model: torch.nn.Module, criterion: Callable):
        super().__init__()
        self.model, self.criterion, self.own_loss = model, criterion, has_own_loss(model)
        self.own_predict = inspect.isfunction(getattr(type(model), "predict", None))

    def forward(self, x: Any, y: Any, prediction: bool = False) -> tuple[torch.Tensor, Any]:
        if self.own_loss:
            return self.model.loss(x, y, self.criterion), (predict(self.model, x) if prediction else None)
        out = first_output(self.model, self.model(x))
        return self.criterion(out, y), (self.model.predict(x) if prediction and self.own_predict else out)


def loss_and_metrics(step: Callable, x: Any, y: Any, metrics: dict[str, Callable]) -> torch.Tensor:
    """(1 + metrics,): a batch's loss and its metric means, as floats, through the loss step."""
    loss, pred = step(x, y, bool(metrics))
    return torch.stack([v.float() for v in (loss, *(m(pred, y) for m in metrics.values()))])


_told: set[type] = set()  # model classes whose first output element was said to be the prediction


def predict(model: torch.nn.Module, x: Any) -> Any:
    """What metrics, plots and load_run compare with y: `model.predict(x)` where the model defines
    it, else `model(x)`, or its first element when forward returns a tuple (said once per class)."""
    if inspect.isfunction(getattr(type(model), "predict", None)):
        return model.predict(x)
    return first_output(model, model(x))


def first_output(model: torch.nn.Module, output: Any) -> Any:
    if isinstance(output, (tuple, list)):
        if type(model) not in _told:
            _told.add(type(model))
            print(f"{type(model).__name__} returns a {type(output).__name__} of {len(output)}: metrics and "
                  "plots see its first element (define predict(self, x) to choose)", file=sys.stderr)
        return output[0]
    return output
