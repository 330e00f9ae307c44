"""How training stops on a signal (Ctrl-C, SIGTERM, a Slurm job's warning signal) without losing
work: a handler only sets a flag, and the loop, between two steps, saves a checkpoint of exactly
where it stands and raises KeyboardInterrupt (main.py: exit status 130, rerun with --resume).

    stop = StopRequest()
    with stop.on_signals():           # the handlers, while the loop runs; then the previous ones
        ... if stop.requested: save, raise KeyboardInterrupt
    stop.agreed(device)               # under torchrun: whether any rank was asked to stop
"""
from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from typing import Iterator

import torch

from engine import distributed


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

    def agreed(self, device: str) -> bool:
        """Under torchrun the ranks stop together: whether any rank was asked to (a collective)."""
        flag = torch.tensor([float(self.requested)], device=device)
        return distributed.sum_across_ranks(flag).item() > 0
