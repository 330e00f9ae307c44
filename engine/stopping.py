"""How training stops on a signal (Ctrl-C, SIGTERM, a Slurm job's warning signal) without losing
work: a handler only sets a flag, and the loop, between two steps, saves a checkpoint of exactly
where it stands and raises KeyboardInterrupt (main.py: exit status 130, rerun with --resume).

    stop = StopRequest()
    with stop.on_signals():           # the handlers, while the loop runs; then the previous ones
        ... if stop.requested: save, raise KeyboardInterrupt
    stop.now(steps, world, device)    # after an optimizer step: whether to stop there
"""
from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from typing import Iterator

import torch

from engine import distributed

# Under torchrun the ranks agree every this many optimizer steps (a collective, and a host sync
# on a GPU, so not after every step): a stop comes within seconds, well inside a warning's lead.
AGREE_EVERY = 8


class StopRequest:
    def __init__(self):
        self.requested = False  # set by a handler: it must do nothing heavier

    @contextmanager
    def on_signals(self) -> Iterator[None]:
        """SIGINT, SIGTERM, and any signal set to raise KeyboardInterrupt as Ctrl-C does (a Slurm
        job's warning signal: engine/slurm.py), set `requested` while the block runs."""
        if threading.current_thread() is not threading.main_thread():  # only the main thread may
            yield
            return
        stops = {signal.SIGINT, signal.SIGTERM, *(s for s in signal.valid_signals()
                                                  if signal.getsignal(s) is signal.default_int_handler)}
        previous = {s: signal.signal(s, self._handle) for s in stops}
        try:
            yield
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

    def _handle(self, signum: int, frame: object) -> None:
        self.requested = True

    def now(self, steps: int, world: int, device: str) -> bool:
        """After `steps` optimizer steps of an epoch (no gradient half-accumulated): whether to stop
        here. Under torchrun every rank stops at the same step, so they agree every AGREE_EVERY."""
        return self.requested if world == 1 else steps % AGREE_EVERY == 0 and self.agreed(device)

    def agreed(self, device: str) -> bool:
        """Under torchrun the ranks stop together: whether any rank was asked to (a collective)."""
        flag = torch.tensor([float(self.requested)], device=device)
        return distributed.sum_across_ranks(flag).item() > 0
