"""Data order and augmentation as functions of ``(seed, epoch, position)``: the same in every process and every resume.

A stock ``DataLoader(shuffle=True)`` draws its order, and MONAI seeds its random transforms, from generator states
that a checkpoint does not hold, and a plain ignite ``Engine`` resumed mid-epoch restarts that epoch's data from
its first batch. So a run resumed from a checkpoint would see other batches than the run it continues. Here:

- :class:`ResumableSampler` shuffles with ``seed + epoch`` (PyTorch's ``DistributedSampler``, which also shards the
  data over the ranks of a multi-process run) and, after a resume, skips the batches the checkpoint already trained on;
- :class:`EpochSeededDataset` seeds the random transforms before each sample from ``(seed, epoch, index)``, which
  also makes augmentation independent of the number of DataLoader workers.

MONAI's ``Workflow`` calls ``sampler.set_epoch(epoch)`` at every epoch start (it does for any ``DistributedSampler``);
:class:`~pgl_bundle.handlers.SkipTrainedBatches` tells the sampler where a resumed epoch starts.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import ignite.distributed as idist
import numpy as np
import torch
import torch.distributed as dist
from monai.data import DistributedSampler
from monai.transforms import Compose, Randomizable
from monai.utils import MAX_SEED
from torch.utils.data import Dataset

__all__ = ["EpochSeededDataset", "ResumableSampler", "each_node_first", "rank_zero_first"]

T = TypeVar("T")


def rank_zero_first(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """``fn(*args, **kwargs)`` in rank 0 before the other ranks, e.g. to write files that they then read.

    ignite's ``one_rank_first`` as a call, because config expressions cannot hold a ``with`` block.
    """
    with idist.one_rank_first():
        return fn(*args, **kwargs)


@contextmanager
def each_node_first() -> Iterator[bool]:
    """Run the block in the first process of each node before the other processes, e.g. to write node-local files.

    Yields whether this process is its node's first (the lowest global rank of its node). A node is a ``torchrun``
    agent (its ``GROUP_RANK``; the host name without ``torchrun``), so that nodes simulated on one machine count
    apart. The first processes of all nodes run the block at the same time; every other process waits at one
    barrier of the whole job until they all finished. Outside ``torch.distributed``: just the block.

    Hand-written because ignite's ``one_rank_first(local=True)`` takes the local rank from ``SLURM_LOCALID`` under
    SLURM (and writes it into ``LOCAL_RANK``): 0 for every process of a ``torchrun`` that ``srun`` starts once per
    node, so every process would go first.
    """
    if not (dist.is_available() and dist.is_initialized()):
        yield True
        return
    nodes: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(nodes, os.environ.get("GROUP_RANK") or socket.gethostname())
    rank = dist.get_rank()
    first = nodes.index(nodes[rank]) == rank
    if not first:
        dist.barrier()
    yield first
    if first:
        dist.barrier()


class ResumableSampler(DistributedSampler):
    """MONAI's ``DistributedSampler`` (order: a permutation seeded by ``seed + epoch``) that can start mid-epoch.

    In a single process it is a reproducible shuffle of the whole dataset; under ``torchrun`` each rank takes every
    ``num_replicas``-th index of the same permutation. ``set_epoch`` also reaches the dataset when it has one.

    Args:
        dataset: the dataset to sample from.
        num_replicas: processes sharing the data; default: the world size (1 outside ``torchrun``).
        rank: this process's rank; default: the current rank (0 outside ``torchrun``).
        shuffle: permute the indices every epoch.
        seed: the permutation's seed (the same on every rank).
        even_divisible: pad the index list so that every rank gets as many samples (MONAI's meaning).
    """

    def __init__(
        self,
        dataset: Dataset,
        num_replicas: int | None = None,
        rank: int | None = None,
        shuffle: bool = True,
        seed: int = 0,
        even_divisible: bool = True,
    ) -> None:
        num_replicas = idist.get_world_size() if num_replicas is None else num_replicas
        rank = idist.get_rank() if rank is None else rank
        super().__init__(dataset, even_divisible, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed)
        self._skip = 0

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)

    def skip(self, num_samples: int) -> None:
        """Leave out the first ``num_samples`` indices of the next iteration over this sampler (once)."""
        self._skip = num_samples

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())
        start, self._skip = self._skip, 0
        return iter(indices[start:])


def reseed(transform: Randomizable, seed: int) -> None:
    """``transform.set_random_state(seed=seed)`` as MONAI does it (a ``Compose`` seeds each random transform in it
    from its own draws, recursively), but reseeding each transform's ``RandomState`` in place.

    Hand-written because MONAI's builds a new ``np.random.RandomState`` per transform: 0.28 ms per sample for the
    pretraining chain against 0.01 ms, about 5 % of a view pair's CPU (``scripts/benchmark_data.py parts``,
    docs/benchmarks.md section 5).
    """
    if "R" in vars(transform):
        transform.R.seed(seed % MAX_SEED)
    else:  # still the class's shared generator: give it its own, as set_random_state does
        transform.R = np.random.RandomState(seed % MAX_SEED)
    if isinstance(transform, Compose):
        for member in transform.transforms:
            if isinstance(member, Randomizable):
                reseed(member, int(transform.R.randint(MAX_SEED, dtype="uint32")))


class EpochSeededDataset(Dataset):
    """Wrap a MONAI dataset so that the random transforms of sample ``index`` in ``epoch`` depend on nothing else.

    Before each item, the dataset's ``transform`` (a ``Compose``) is seeded from ``(seed, epoch, index)``. The epoch
    is set by :class:`ResumableSampler` before each epoch's first index is drawn, and held in shared memory, so that
    DataLoader workers kept across epochs (``persistent_workers=True``) see it too.

    Args:
        dataset: a dataset whose ``transform`` is a MONAI ``Randomizable`` (e.g. a ``Compose``), as MONAI's
            ``Dataset`` and ``CacheDataset`` have.
        seed: the run's seed.
    """

    def __init__(self, dataset: Dataset, seed: int = 0) -> None:
        if not isinstance(getattr(dataset, "transform", None), Randomizable):
            raise TypeError(f"{type(dataset).__name__} has no Randomizable transform (with set_random_state) to seed.")
        self.dataset = dataset
        self.seed = seed
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()  # one value for this process and its workers

    @property
    def epoch(self) -> int:
        return int(self._epoch)

    def set_epoch(self, epoch: int) -> None:
        self._epoch.fill_(epoch)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        state = np.random.SeedSequence([self.seed, self.epoch, index]).generate_state(1)[0]
        reseed(self.dataset.transform, int(state))
        return self.dataset[index]
