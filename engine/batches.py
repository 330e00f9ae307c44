"""How the Trainer draws its batches, in one process or as one torchrun rank.

    batches = Batches("cpu", settings)                # rank 0 of a world of 1 (engine.settings.Settings)
    data = batches.on_device(train_set)               # a TensorDataset moves to the device once
    for x, y in batches(data, 256, generator):        # shuffled by `generator`; None: in order
        ...

In-memory tensors are sliced by index on the device: no per-sample Python work, no
DataLoader. Any other dataset goes through a DataLoader (trainer.num_workers,
pin_memory, persistent_workers). Either way the order comes from `generator` alone, so
a resumed run (`skip` batches already done) and every DDP rank draw the same batches.
"""
from __future__ import annotations

from typing import Any, Iterator

import torch
from torch.utils.data import (BatchSampler, DataLoader, Dataset, RandomSampler, SequentialSampler,
                              TensorDataset)

from engine.settings import Settings


class Batches:
    def __init__(self, device: str, options: Settings, rank: int = 0, world: int = 1):
        self.device, self.options, self.rank, self.world = device, options, rank, world
        self.loaders: dict = {}  # (dataset id, batch size) -> (its batches, its DataLoader)

    def on_device(self, dataset: Dataset) -> Any:
        """A TensorDataset moves to the device once; anything else stays a Dataset."""
        if isinstance(dataset, TensorDataset):
            return tuple(t.to(self.device) for t in dataset.tensors)
        return dataset

    def count(self, data: Any, batch_size: int) -> int:
        """How many batches an epoch of `data` has (on every rank the same)."""
        n = len(data[0]) if isinstance(data, tuple) else len(data)
        batches = -(-n // batch_size)
        # Under torchrun a last global batch with fewer samples than ranks is dropped.
        return batches - 1 if self.world > 1 and n - (batches - 1) * batch_size < self.world else batches

    def __call__(self, data: Any, batch_size: int, generator: torch.Generator | list | None = None,
                skip: int = 0) -> Iterator[tuple]:
        """In-memory tensors are indexed on the device (no per-sample Python work); any other
        dataset goes through a DataLoader. `generator` shuffles; `skip` resumes. A list
        of generators (a stack of seeds, in-memory data only) gives each seed its own batches,
        drawn as for that seed alone, stacked: (seeds, batch, ...)."""
        rank, world = self.rank, self.world
        if isinstance(data, tuple):
            n = len(data[0])
            orders = [epoch_order(n, g, self.device) for g in (generator if isinstance(generator, list) else
                                                               [generator] if generator is not None else [])]
            order = torch.stack(orders) if isinstance(generator, list) else orders[0] if orders else None
            for start in range(skip * batch_size, n, batch_size):
                index = (order[..., start:start + batch_size] if order is not None
                         else slice(start, start + batch_size))
                if world > 1:  # this rank's share; a last batch smaller than the world is dropped
                    if min(batch_size, n - start) < world:
                        break
                    index = (index if order is not None else torch.arange(start, min(start + batch_size, n),
                                                                          device=self.device))[rank::world]
                # In order, a slice: contiguous like a shuffled batch (a gathered copy) even where
                # the data's own tensors are not, so code that works in training works here too.
                yield tuple(t[index] if order is not None else t[index].contiguous() for t in data)
        else:
            yield from self.loader_batches(data, batch_size, generator, skip)

    def loader_batches(self, dataset: Dataset, batch_size: int, generator: torch.Generator | None,
                       skip: int) -> Iterator[tuple]:
        """A general dataset through a DataLoader. We draw each epoch's batches ourselves,
        exactly as DataLoader(shuffle=True, generator=...) would (its workers' base seed,
        then the order), so one process, every DDP rank and a resumed run see the same
        batches; each rank takes its share. The DataLoader is built once per dataset, so
        that `persistent_workers` really keeps its workers from one epoch to the next."""
        key = (id(dataset), batch_size)
        if key not in self.loaders:
            o = self.options
            epoch_batches = _EpochBatches()
            # A generator of its own: a loader never draws from the global RNG (dropout's).
            self.loaders[key] = (epoch_batches, DataLoader(
                dataset, batch_sampler=epoch_batches, generator=torch.Generator(), num_workers=o.num_workers,
                pin_memory=o.pin_memory, persistent_workers=o.persistent_workers))
        epoch_batches, loader = self.loaders[key]
        if generator is not None:
            base_seed = torch.empty((), dtype=torch.int64).random_(generator=generator).item()
            loader.generator = torch.Generator().manual_seed(base_seed)  # the workers' seeds
            sampler = RandomSampler(dataset, generator=generator)
        else:
            sampler = SequentialSampler(dataset)
        rank, world = self.rank, self.world  # a last global batch smaller than the world is dropped
        epoch_batches.batches = [b[rank::world] for b in BatchSampler(sampler, batch_size, drop_last=False)
                                 if len(b) >= world][skip:]
        for batch in loader:
            yield tuple(t.to(self.device, non_blocking=True) for t in batch)


def epoch_order(n: int, generator: torch.Generator, device: str) -> torch.Tensor:
    """An epoch's shuffled order of n in-memory samples, drawn from `generator` alone."""
    return torch.randperm(n, generator=generator).to(device)


class _EpochBatches:
    """The batch_sampler of a DataLoader that lives across epochs: the current epoch's
    batches, set before each pass (a DataLoader reads its batch_sampler anew each pass)."""

    def __init__(self):
        self.batches: list[list[int]] = []

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def accumulation(batch: int, accumulate: int, in_epoch: int) -> tuple[int, bool]:
    """(micro_batches, steps) for batch number `batch` of an epoch of `in_epoch` batches: the
    optimizer step it counts towards sums `micro_batches` of them (grad_accum, or fewer for the
    epoch's last, shorter accumulation; each counts 1/micro_batches), and whether it steps."""
    first = batch - batch % accumulate
    micro_batches = min(accumulate, in_epoch - first)
    return micro_batches, batch + 1 == first + micro_batches
