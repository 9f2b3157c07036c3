"""Samplers and the training loader that make a resumed run see exactly the batches an uninterrupted run sees.

* :class:`EpochSampler` — the order of epoch ``e`` is a function of ``(seed, e)`` only (never of the global RNG),
  in one process as under DDP (it is a :class:`~torch.utils.data.DistributedSampler`, one replica when not
  distributed; Lightning calls ``set_epoch``). It can skip the batches a checkpoint says were already trained on.
* :class:`ResumableDataLoader` — a ``DataLoader`` with ``state_dict``/``load_state_dict`` (Lightning's
  ``_Stateful`` protocol): a checkpoint written in the middle of an epoch stores the epoch and the number of
  batches the training loop finished, and the resumed loader starts at the next one.
* :class:`PaddedEvalSampler` — evaluation shards under DDP: every rank gets the same number of samples (so no rank
  waits in a collective), and the samples added to even the shards out are flagged ``pad`` so that metrics skip
  them instead of counting them twice.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Iterator

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

__all__ = ["EpochSampler", "ResumableDataLoader", "PaddedEvalSampler", "PadFlagged"]


def _world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size(), torch.distributed.get_rank()
    return 1, 0


class EpochSampler(DistributedSampler):
    """``DistributedSampler`` that also works in one process and can skip a number of leading batches once.

    Args:
        dataset: the data set. shuffle, seed: permutation of epoch ``e`` drawn from ``seed + e``.
        batch_size: per-rank batch size (to turn skipped batches into skipped samples).
    """

    def __init__(self, dataset: Dataset, *, shuffle: bool, seed: int, batch_size: int):
        world, rank = _world()
        super().__init__(dataset, num_replicas=world, rank=rank, shuffle=shuffle, seed=seed, drop_last=False)
        self.batch_size = int(batch_size)
        self._resume: tuple[int, int] | None = None  # (epoch, batches already trained) from a checkpoint

    def skip_batches(self, epoch: int, batches: int) -> None:
        """In epoch ``epoch`` (only), start after the first ``batches`` batches (once)."""
        self._resume = (int(epoch), int(batches))

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())
        if self._resume is not None:
            epoch, batches = self._resume
            if epoch == self.epoch:
                self._resume = None
                indices = indices[batches * self.batch_size:]
            elif self.epoch > epoch:
                self._resume = None
        return iter(indices)


class ResumableDataLoader(DataLoader):
    """A ``DataLoader`` over an :class:`EpochSampler` whose position survives a checkpoint.

    ``progress`` (set by the data module) returns ``(epoch, batches finished)`` of the training loop at the
    moment Lightning writes the checkpoint. The loader's own count of yielded batches would be off by the
    batches Lightning prefetches, so the loop's count is the one stored.
    """

    progress: Callable[[], tuple[int, int]] | None = None

    def state_dict(self) -> dict[str, Any]:
        if self.progress is None:
            return {}
        epoch, batches = self.progress()
        return {"epoch": int(epoch), "batches": int(batches), "batches_per_epoch": len(self)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state or not isinstance(self.sampler, EpochSampler):
            return
        if 0 < state["batches"] < state["batches_per_epoch"]:  # a checkpoint from inside an epoch
            self.sampler.skip_batches(state["epoch"], state["batches"])


class PaddedEvalSampler(DistributedSampler):
    """Rank ``r`` of ``W`` takes samples ``r, r+W, ...``; the shards are evened out with indices ``>= len``
    that :class:`PadFlagged` maps back to real samples flagged ``pad=True`` (metrics skip them).

    A ``DistributedSampler`` subclass only so that Lightning sees a distributed sampler and does not wrap it in
    another one (which would shard the shards)."""

    def __init__(self, dataset: Dataset, world: int | None = None, rank: int | None = None):
        w, r = _world()
        world, rank = world or w, r if rank is None else rank
        super().__init__(dataset, num_replicas=world, rank=rank, shuffle=False, drop_last=False)
        self.n = len(dataset)
        self.total = math.ceil(self.n / world) * world if self.n else 0

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.total, self.num_replicas))

    def __len__(self) -> int:
        return self.total // self.num_replicas


class PadFlagged(Dataset):
    """``ds[i]`` for ``i < len(ds)``; for ``i >= len(ds)`` sample ``i - len(ds)`` with ``pad=True``."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict:
        n = len(self.dataset)
        if i < n:
            return self.dataset[i]
        return {**self.dataset[i - n], "pad": True}

    def __getattr__(self, name):  # subset / indices / set_pseudo_labels of the wrapped data set
        if name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)
