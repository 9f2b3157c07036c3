"""Small-loss selection, exact and global across ``torch.distributed`` ranks (the core of co-teaching).

Global order. Items (pixels or samples) are ordered by ``(loss, global position)``, the global position
being the item's flat index in the rank-major concatenation of every rank's ``losses`` tensor along dim 0
(rank 0's tensor first). The selection keeps the first ``k = ⌊R · N + ½⌋`` valid items of that strict total
order, ``N`` the number of valid items over all ranks. A 2-process run therefore selects exactly what one
process selects on the concatenated batch, ties included.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import Tensor
from torch.profiler import record_function

__all__ = ["small_loss_selection", "masked_mean"]


def _ordered_keys(losses: Tensor) -> Tensor:
    """Map float losses to int64 keys in [0, 2**32) with the same order (NaN and +inf last, -0.0 == 0.0)."""
    x = torch.nan_to_num(losses.detach().float(), nan=math.inf) + 0.0  # + 0.0 turns -0.0 into +0.0
    u = x.contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    return torch.where(u >= 2 ** 31, (2 ** 32 - 1) - u, u + 2 ** 31)


def _world(group) -> tuple[bool, int, int]:
    if not (dist.is_available() and dist.is_initialized()):
        return False, 1, 0
    size = dist.get_world_size(group)
    return size > 1, size, dist.get_rank(group)


def _num_to_keep(keep_ratio: float, n_valid: Tensor) -> Tensor:
    # round half up, in float64 so that every rank and a single process compute the same integer
    return torch.floor(n_valid.double() * float(keep_ratio) + 0.5).long()


def small_loss_selection(losses: Tensor, keep_ratio: float, valid: Tensor | None = None, group=None, *,
                         method: str = "radix") -> Tensor:
    r"""Boolean mask of the ``round(R · N)`` smallest valid losses, selected over all ranks.

    .. math::  S = \{\, i \text{ valid} : \mathrm{rank}_{(\ell, \mathrm{pos})}(i) < \lfloor R N + 1/2 \rfloor \,\}

    with items ordered by loss, ties by global position (see the module docstring), ``N`` the number of
    valid items over all ranks of ``group``. ``group=None`` means the default process group when
    ``torch.distributed`` is initialised with more than one rank, else this process alone. Every rank
    must call it the same number of times (it runs collectives even when it holds no valid item).

    Methods (identical results): ``"radix"`` finds the exact threshold with four all-reduces of a 256-bin
    histogram of the losses' bits plus one all-reduce of the tie counts (communication independent of
    the batch size); ``"gather"`` all-gathers the losses (float32 + a uint8 mask per item) and takes the
    k-th smallest on every rank. One process uses the k-th-smallest path with no communication.

    Args:
        losses: float tensor of any shape, e.g. (B,) per sample or (B, H, W) per pixel (detached inside).
        keep_ratio: R in [0, 1].
        valid: bool tensor of the same shape; invalid items are never selected and not counted.

    Returns:
        bool tensor shaped like ``losses``.

    Example:
        >>> small_loss_selection(torch.tensor([0.3, 0.1, 0.2, 0.1]), 0.5)
        tensor([False,  True, False,  True])
    """
    if not isinstance(losses, Tensor) or not losses.is_floating_point():
        raise ValueError(f"small_loss_selection: expected a floating tensor of losses, got "
                         f"{losses.dtype if isinstance(losses, Tensor) else type(losses).__name__}")
    ratio = float(keep_ratio)
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"small_loss_selection: expected keep_ratio in [0, 1], got {keep_ratio}")
    if valid is None:
        valid = torch.ones_like(losses, dtype=torch.bool)
    elif valid.shape != losses.shape or valid.dtype != torch.bool:
        raise ValueError(f"small_loss_selection: expected a bool valid mask of shape {tuple(losses.shape)}, "
                         f"got {valid.dtype} {tuple(valid.shape)}")
    if method not in ("radix", "gather"):
        raise ValueError(f"small_loss_selection: expected method 'radix' or 'gather', got {method!r}")
    distributed, world, rank = _world(group)
    flat_valid = valid.reshape(-1)
    with record_function("small_loss_selection"):  # a named range for torch.profiler (benchmarks/speed.py)
        if not distributed or method == "gather":
            # NaN sorts last (as +inf); + 0.0 turns -0.0 into +0.0 so that the two compare and tie as equal
            values = torch.nan_to_num(losses.detach().float(), nan=math.inf).reshape(-1) + 0.0
            keep = _select_gather(values, flat_valid, ratio, group, world if distributed else 1, rank)
        else:
            keep = _select_radix(_ordered_keys(losses).reshape(-1), flat_valid, ratio, group, world, rank)
    return keep.reshape(losses.shape)


def _select_gather(values: Tensor, valid: Tensor, ratio: float, group, world: int, rank: int) -> Tensor:
    # k-th smallest valid value over the gathered items, then the first ties by global position
    n = values.numel()
    offset = 0
    if world > 1:
        sizes = [torch.zeros(1, dtype=torch.int64, device=values.device) for _ in range(world)]
        dist.all_gather(sizes, torch.tensor([n], dtype=torch.int64, device=values.device), group=group)
        sizes = [int(s) for s in sizes]
        offset, max_n = sum(sizes[:rank]), max(sizes)
        pad_v = torch.zeros(max_n, dtype=values.dtype, device=values.device)
        pad_m = torch.zeros(max_n, dtype=torch.uint8, device=values.device)
        pad_v[:n], pad_m[:n] = values, valid.to(torch.uint8)
        parts_v, parts_m = [torch.empty_like(pad_v) for _ in range(world)], [torch.empty_like(pad_m) for _ in range(world)]
        dist.all_gather(parts_v, pad_v, group=group)
        dist.all_gather(parts_m, pad_m, group=group)
        values = torch.cat([p[:s] for p, s in zip(parts_v, sizes)])
        valid = torch.cat([p[:s] for p, s in zip(parts_m, sizes)]).bool()
    chosen = values[valid]
    k = int(_num_to_keep(ratio, torch.tensor(chosen.numel())))
    if k == 0:
        return torch.zeros(n, dtype=torch.bool, device=values.device)
    threshold = torch.kthvalue(chosen, k).values
    below = valid & (values < threshold)
    ties = valid & (values == threshold)
    k_ties = k - below.sum()
    keep = below | (ties & (torch.cumsum(ties, 0) <= k_ties))
    return keep[offset:offset + n]


def _select_radix(keys: Tensor, valid: Tensor, ratio: float, group, world: int, rank: int) -> Tensor:
    # Radix select on the 32-bit keys, one byte per pass, all on device: the global histogram of the
    # candidates' next byte tells which bucket holds the k-th smallest key.
    cand = valid.clone()
    prefix = torch.zeros((), dtype=torch.int64, device=keys.device)
    k_rem = None
    for shift in (24, 16, 8, 0):
        digit = (keys >> shift) & 255
        hist = torch.zeros(256, dtype=torch.int64, device=keys.device)
        hist.index_add_(0, digit, cand.long())
        dist.all_reduce(hist, group=group)
        if k_rem is None:
            k_rem = _num_to_keep(ratio, hist.sum())
        cum = hist.cumsum(0)
        bucket = torch.searchsorted(cum, k_rem.reshape(1)).clamp_max(255).squeeze(0)
        k_rem = k_rem - (cum[bucket] - hist[bucket])
        cand = cand & (digit == bucket)
        prefix = (prefix << 8) | bucket
    below = valid & (keys < prefix)
    ties = valid & (keys == prefix)
    counts = torch.zeros(world, dtype=torch.int64, device=keys.device)
    counts[rank] = ties.sum()
    dist.all_reduce(counts, group=group)
    order = torch.cumsum(ties.long(), 0) - 1 + counts[:rank].sum()
    return below | (ties & (order < k_rem))


def _global_sum(x: Tensor, group) -> tuple[Tensor, int]:
    distributed, world, _ = _world(group)
    x = x.detach().clone()
    if distributed:
        dist.all_reduce(x, group=group)
    return x, world


def masked_mean(values: Tensor, mask: Tensor, group=None) -> Tensor:
    r"""Mean of ``values`` over ``mask``, normalised by the count over all ranks divided by the world size.

    .. math::  \frac{\sum_{i \in \text{mask}} v_i}{\max(1, |\text{mask}|_{\text{global}}) / W}

    so that DDP's gradient averaging over ``W`` ranks gives exactly the gradient of the global mean
    (one process on the concatenated batch). Empty mask → 0 with a zero gradient.
    """
    count, world = _global_sum(mask.sum(), group)
    return (values * mask.to(values.dtype)).sum() * world / count.clamp_min(1).to(values.dtype)
