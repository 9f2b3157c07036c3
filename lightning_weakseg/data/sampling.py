"""Samplers and the training loader that make a resumed run see exactly the batches an uninterrupted run sees.

* :class:`EpochSampler` — the order of epoch ``e`` is a function of ``(seed, e)`` only (never of the global RNG),
  in one process as under DDP (it is a :class:`~torch.utils.data.DistributedSampler`, one replica when not
  distributed; Lightning calls ``set_epoch``). It can skip the batches a checkpoint says were already trained on.
* :class:`TwoStreamSampler` — an :class:`EpochSampler` whose every batch holds a fixed number of labelled
  samples, the rest unlabelled (the two-stream batches of semi-supervised segmentation, Yu et al., MICCAI 2019).
* :class:`ResumableDataLoader` — a ``DataLoader`` with ``state_dict``/``load_state_dict`` (Lightning's
  ``_Stateful`` protocol): a checkpoint written in the middle of an epoch stores the epoch and the number of
  batches the training loop finished, and the resumed loader starts at the next one.
* :class:`PaddedEvalSampler` — evaluation shards under DDP: every rank gets the same number of samples (so no rank
  waits in a collective), and the samples added to even the shards out are flagged ``pad`` so that metrics skip
  them instead of counting them twice.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Iterator, Sequence

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

__all__ = ["EpochSampler", "TwoStreamSampler", "ResumableDataLoader", "PaddedEvalSampler", "PadFlagged"]


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

    def _order(self) -> list[int]:
        """This rank's indices of the current epoch, before any skip."""
        return list(super().__iter__())

    def __iter__(self) -> Iterator[int]:
        indices = self._order()
        if self._resume is not None:
            epoch, batches = self._resume
            if epoch == self.epoch:
                self._resume = None
                indices = indices[batches * self.batch_size:]
            elif self.epoch > epoch:
                self._resume = None
        return iter(indices)


class TwoStreamSampler(EpochSampler):
    """Batches of ``batch_size`` with ``labelled_per_batch`` labelled samples and the rest unlabelled.

    The labelled and the unlabelled indices are two streams, each a chain of permutations (drawn from
    ``(seed, epoch)``; sequential without ``shuffle``) consumed batch after batch; the shorter stream, usually the
    labelled one, starts over when it runs out, so a small labelled set is seen many times an epoch. An epoch
    has as many batches per rank as :class:`EpochSampler` would give (``ceil(ceil(N / W) / batch_size)``), all
    full. Under DDP the global batches are dealt to the ranks in turn (rank ``r`` gets batches ``r, r + W, ...``):
    every rank's batch has the same labelled count, and no two ranks share a sample within a pass of a stream.

    Args:
        dataset: the data set. labelled: bool per index of ``dataset`` (a sample that carries some label).
        labelled_per_batch: labelled samples in every batch, in ``[1, batch_size - 1]``.
        shuffle, seed, batch_size: as for :class:`EpochSampler`.

    >>> s = TwoStreamSampler(list(range(6)), labelled=[True, True, False, False, False, False],
    ...                      labelled_per_batch=1, shuffle=False, seed=0, batch_size=2)
    >>> list(s)
    [0, 2, 1, 3, 0, 4]
    """

    def __init__(self, dataset: Dataset, *, labelled: Sequence[bool], labelled_per_batch: int, shuffle: bool,
                 seed: int, batch_size: int):
        super().__init__(dataset, shuffle=shuffle, seed=seed, batch_size=batch_size)
        flags = [bool(v) for v in labelled]
        if len(flags) != len(dataset):
            raise ValueError(f"TwoStreamSampler: {len(flags)} labelled flags for {len(dataset)} samples")
        k = int(labelled_per_batch)
        if not 1 <= k <= self.batch_size - 1:
            raise ValueError(f"TwoStreamSampler: labelled_per_batch must be in [1, batch_size - 1 = "
                             f"{self.batch_size - 1}], got {labelled_per_batch}")
        self.labelled_idx = [i for i, f in enumerate(flags) if f]
        self.unlabelled_idx = [i for i, f in enumerate(flags) if not f]
        if not self.labelled_idx or not self.unlabelled_idx:
            raise ValueError(f"TwoStreamSampler: needs labelled and unlabelled samples, got "
                             f"{len(self.labelled_idx)} labelled and {len(self.unlabelled_idx)} unlabelled")
        self.labelled_per_batch = k
        self.batches_per_rank = math.ceil(self.num_samples / self.batch_size)

    def _stream(self, idx: list[int], n: int, g: torch.Generator) -> list[int]:
        out: list[int] = []
        while len(out) < n:
            order = torch.randperm(len(idx), generator=g).tolist() if self.shuffle else range(len(idx))
            out.extend(idx[j] for j in order)
        return out[:n]

    def _order(self) -> list[int]:
        n_batches = self.batches_per_rank * self.num_replicas
        k, b = self.labelled_per_batch, self.batch_size
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        lab = self._stream(self.labelled_idx, n_batches * k, g)
        unl = self._stream(self.unlabelled_idx, n_batches * (b - k), g)
        mine: list[int] = []
        for j in range(self.rank, n_batches, self.num_replicas):
            mine += lab[j * k:(j + 1) * k] + unl[j * (b - k):(j + 1) * (b - k)]
        return mine

    def __len__(self) -> int:
        return self.batches_per_rank * self.batch_size


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
