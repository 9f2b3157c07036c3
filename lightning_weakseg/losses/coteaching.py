"""Co-teaching building blocks (Han et al., NeurIPS 2018; Yu et al., ICML 2019): the keep-ratio schedule, the
peer exchange and the segmentation losses. The small-loss selection itself, exact and global across
``torch.distributed`` ranks, is in :mod:`lightning_weakseg.losses.selection` (re-exported here).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .dice import soft_dice_loss
from .selection import _global_sum, masked_mean, small_loss_selection

__all__ = [
    "coteaching_keep_ratio",
    "small_loss_selection",
    "masked_mean",
    "coteaching_pair_loss",
    "coteaching_losses",
    "peer_relabel_losses",
]



def coteaching_keep_ratio(epoch: int | float, forget_rate: float | Sequence[float], num_gradual: int = 10,
                          exponent: float = 1.0) -> float | tuple[float, ...]:
    r"""Keep ratio of co-teaching: :math:`R(T) = 1 - \min(T^c / T_k \cdot \tau, \tau)`.

    ``T`` = ``epoch`` (0-based, so the first epoch keeps everything), ``τ`` = ``forget_rate``,
    ``T_k`` = ``num_gradual``, ``c`` = ``exponent`` (the paper: c = 1, T_k = 10, τ ≈ noise rate).
    ``num_gradual = 0`` forgets ``τ`` from the first epoch. A sequence of forget rates (one per class, for
    class-balanced selection) gives the tuple of their keep ratios on the same schedule.

    Example:
        >>> [round(coteaching_keep_ratio(t, 0.5, num_gradual=4), 3) for t in range(6)]
        [1.0, 0.875, 0.75, 0.625, 0.5, 0.5]
        >>> coteaching_keep_ratio(1, [0.0, 0.4], num_gradual=2)
        (1.0, 0.8)
    """
    if isinstance(forget_rate, (list, tuple)):
        if len(forget_rate) == 0:
            raise ValueError("coteaching_keep_ratio: expected at least one forget rate, got an empty sequence")
        return tuple(coteaching_keep_ratio(epoch, float(t), num_gradual, exponent) for t in forget_rate)
    if not 0.0 <= float(forget_rate) <= 1.0:
        raise ValueError(f"coteaching_keep_ratio: expected forget_rate in [0, 1], got {forget_rate}")
    if epoch < 0 or num_gradual < 0 or exponent <= 0:
        raise ValueError("coteaching_keep_ratio: expected epoch >= 0, num_gradual >= 0, exponent > 0; got "
                         f"epoch={epoch}, num_gradual={num_gradual}, exponent={exponent}")
    if num_gradual == 0:
        return 1.0 - float(forget_rate)
    return 1.0 - min(float(epoch) ** exponent / num_gradual * forget_rate, float(forget_rate))


def coteaching_pair_loss(losses_a: Tensor, losses_b: Tensor, keep_ratio: float, valid: Tensor | None = None,
                         group=None, *, method: str = "radix", scores_a: Tensor | None = None,
                         scores_b: Tensor | None = None) -> dict[str, Tensor]:
    r"""Co-teaching exchange: each network selects its small-loss items, its peer learns from them.

    .. math::
        S_a = \mathrm{sel}(\ell_a, R),\ S_b = \mathrm{sel}(\ell_b, R),\quad
        L_a = \mathrm{mean}_{i \in S_b}\, \ell_{a,i},\quad L_b = \mathrm{mean}_{i \in S_a}\, \ell_{b,i}

    (means over all ranks, see :func:`masked_mean`).

    Args:
        losses_a, losses_b: per-item losses (same shape) of networks A and B, with gradients.
        keep_ratio: R(T); valid: items that may be selected (e.g. labelled pixels, or disagreement only
            for co-teaching+).
        scores_a, scores_b: what each network ranks its items by, when not its loss (e.g. a per-image Dice
            loss while the CE trains); same shape as the losses.

    Returns:
        dict with ``loss_a`` (trains A), ``loss_b`` (trains B), ``select_a``, ``select_b`` (bool masks).

    Example:
        >>> la, lb = torch.tensor([0.1, 0.9, 0.5, 0.7]), torch.tensor([0.8, 0.2, 0.6, 0.4])
        >>> out = coteaching_pair_loss(la, lb, 0.5)
        >>> out["select_a"].tolist(), round(float(out["loss_a"]), 3)   # A learns on B's picks (1, 3)
        ([True, False, True, False], 0.8)
    """
    if losses_a.shape != losses_b.shape:
        raise ValueError(f"coteaching_pair_loss: expected losses of equal shape, got {tuple(losses_a.shape)} "
                         f"and {tuple(losses_b.shape)}")
    rank_a = losses_a if scores_a is None else scores_a
    rank_b = losses_b if scores_b is None else scores_b
    if rank_a.shape != losses_a.shape or rank_b.shape != losses_b.shape:
        raise ValueError(f"coteaching_pair_loss: expected scores of the losses' shape {tuple(losses_a.shape)}, got "
                         f"{tuple(rank_a.shape)} and {tuple(rank_b.shape)}")
    select_a = small_loss_selection(rank_a.detach(), keep_ratio, valid, group, method=method)
    select_b = small_loss_selection(rank_b.detach(), keep_ratio, valid, group, method=method)
    return {"loss_a": masked_mean(losses_a, select_b, group), "loss_b": masked_mean(losses_b, select_a, group),
            "select_a": select_a, "select_b": select_b}


def coteaching_losses(logits_a: Tensor, logits_b: Tensor, target: Tensor, has: Tensor | None,
                      keep_ratio: float | Sequence[float],
                      *, selection: str = "pixel", disagreement: bool = False, ignore_index: int = 255,
                      group=None, method: str = "radix", balance: bool = False,
                      min_disagreement: float = 0.0, sample_rank: str = "ce") -> dict[str, Tensor]:
    r"""Co-teaching (or co-teaching+) losses of two segmentation networks on a noisy mask.

    Per-pixel cross-entropy :math:`\ell_{n,i} = -\log p^{(n)}_{i,y_i}` on the labelled pixels
    (``target != ignore_index`` and ``has``). ``selection="pixel"``: items are pixels.
    ``selection="sample"``: items are images, with loss = mean CE over the image's labelled pixels.
    ``sample_rank`` (sample selection): what the images are ranked by — ``"ce"`` (that loss, the paper's rule)
    or ``"dice"`` (each network's per-image soft Dice loss against the noisy mask, :func:`soft_dice_loss`; the
    selected images still train on their mean CE). Mean CE is dominated by the background, so the smallest
    losses belong to masks with little or no foreground — also the wrong ones whose object was dropped — and
    small-loss selection by CE drifts to all-background (Kvasir, half the masks corrupted: 0.045 Dice against
    naive's 0.282); a mask that misses an object the network sees, or doubles it, has a large Dice loss.
    ``disagreement=True`` (co-teaching+, Yu et al. 2019): only pixels where the two networks' argmax
    differ count (per sample: the loss is the mean over its disagreement pixels, images without any are
    not candidates). Then :func:`coteaching_pair_loss` keeps R of the candidates for each network and
    trains its peer on them.

    ``min_disagreement`` (co-teaching+ only): a candidate group (a class with ``balance``, else all labelled
    pixels; images for sample selection) whose disagreement items are fewer than this fraction of its
    labelled items, counted over all ranks, falls back to plain co-teaching (all its labelled items are
    candidates). In segmentation the two networks soon agree on almost every pixel of the rare class; with
    disagreement-only candidates that class then gets no gradient and both networks drift to "background"
    everywhere (an absorbing state: agreement on the wrong class is never corrected). 0 = the paper's rule.

    ``balance=True`` (pixel selection only) keeps R of the candidates *of each noisy-label class* instead of R
    of all candidates. Without it the small-loss rule favours the majority class: in a polyp or organ image the
    few, harder foreground pixels have the largest losses and are the first dropped, so the kept set drifts
    towards all-background as the forget rate grows. With ``balance``, ``keep_ratio`` may also be a sequence of K
    ratios, one per noisy-label class (class c keeps ``keep_ratio[c]`` of its candidates): the fraction of wrong
    labels differs between classes — e.g. 1 % of ACDC's noisy background against 25–33 % of its noisy
    structures at noise rate 0.5 (``benchmarks/noise_stats.py``) — and one τ for all drops correct background
    while it keeps wrong foreground.

    Args:
        logits_a, logits_b: (B, K, H, W). target: (B, H, W) long. has: (B,) bool or None (all labelled).

    Returns:
        dict with ``loss_a``, ``loss_b`` (scalars), ``select_a``, ``select_b`` ((B, H, W) or (B,) bool)
        and ``candidates`` (the valid mask the selection ran on).
    """
    if selection not in ("pixel", "sample"):
        raise ValueError(f"coteaching_losses: expected selection 'pixel' or 'sample', got {selection!r}")
    if sample_rank not in ("ce", "dice"):
        raise ValueError(f"coteaching_losses: expected sample_rank 'ce' or 'dice', got {sample_rank!r}")
    if sample_rank != "ce" and selection != "sample":
        raise ValueError("coteaching_losses: sample_rank='dice' needs selection='sample'")
    if logits_a.shape != logits_b.shape or logits_a.dim() != 4:
        raise ValueError(f"coteaching_losses: expected two (B, K, H, W) logits of equal shape, got "
                         f"{tuple(logits_a.shape)} and {tuple(logits_b.shape)}")
    b, k, h, w = logits_a.shape
    if tuple(target.shape) != (b, h, w):
        raise ValueError(f"coteaching_losses: expected target of shape {(b, h, w)}, got {tuple(target.shape)}")
    labelled = target != ignore_index
    if has is not None:
        labelled = labelled & has.view(b, 1, 1)
    safe = torch.where(labelled, target, torch.zeros_like(target)).long()
    ce_a = F.cross_entropy(logits_a.float(), safe, reduction="none")
    ce_b = F.cross_entropy(logits_b.float(), safe, reduction="none")
    if not 0.0 <= float(min_disagreement) <= 1.0:
        raise ValueError(f"coteaching_losses: expected min_disagreement in [0, 1], got {min_disagreement}")
    per_class = isinstance(keep_ratio, (list, tuple))
    if per_class and len(keep_ratio) != k:
        raise ValueError(f"coteaching_losses: expected one keep ratio per class ({k}), got {len(keep_ratio)}: "
                         f"{list(keep_ratio)}")
    ratios = [float(r) for r in keep_ratio] if per_class else [float(keep_ratio)] * k
    region = labelled
    if disagreement:
        region = region & (logits_a.detach().argmax(1) != logits_b.detach().argmax(1))
    fallback = disagreement and float(min_disagreement) > 0.0

    def _too_few(dis: Tensor, lab: Tensor) -> Tensor:  # counts over all ranks: every rank decides alike
        counts, _ = _global_sum(torch.stack([dis.sum(), lab.sum()]).long(), group)
        return counts[0] < float(min_disagreement) * counts[1]  # a 0-dim bool tensor: no host sync

    if selection == "pixel" and balance:
        select_a, select_b = torch.zeros_like(region), torch.zeros_like(region)
        for c in range(k):  # a loop over classes (K collectives under DDP, the same K on every rank)
            rc = region & (safe == c)
            if fallback:
                lab_c = labelled & (safe == c)
                rc = torch.where(_too_few(rc, lab_c), lab_c, rc)
                region = region | rc
            select_a |= small_loss_selection(ce_a.detach(), ratios[c], rc, group, method=method)
            select_b |= small_loss_selection(ce_b.detach(), ratios[c], rc, group, method=method)
        return {"loss_a": masked_mean(ce_a, select_b, group), "loss_b": masked_mean(ce_b, select_a, group),
                "select_a": select_a, "select_b": select_b, "candidates": region}
    if balance:
        raise ValueError("coteaching_losses: balance=True needs selection='pixel'")
    if per_class:
        raise ValueError("coteaching_losses: one keep ratio per class needs balance=True (class-balanced pixel "
                         "selection)")
    if fallback:
        dis_items, lab_items = (region, labelled) if selection == "pixel" else \
            (region.flatten(1).any(1), labelled.flatten(1).any(1))
        region = torch.where(_too_few(dis_items, lab_items), labelled, region)
    if selection == "pixel":
        out = coteaching_pair_loss(ce_a, ce_b, keep_ratio, region, group, method=method)
        out["candidates"] = region
        return out
    area = region.flatten(1).sum(1)
    weights = region.to(ce_a.dtype) / area.clamp_min(1).view(b, 1, 1).to(ce_a.dtype)
    per_a, per_b = (ce_a * weights).flatten(1).sum(1), (ce_b * weights).flatten(1).sum(1)
    scores_a = scores_b = None
    if sample_rank == "dice":  # over all labelled pixels of the image (co-teaching+ only narrows the candidates)
        noisy = torch.where(labelled, target, torch.full_like(target, ignore_index))
        scores_a = soft_dice_loss(torch.softmax(logits_a.detach().float(), 1), noisy, ignore_index)
        scores_b = soft_dice_loss(torch.softmax(logits_b.detach().float(), 1), noisy, ignore_index)
    out = coteaching_pair_loss(per_a, per_b, keep_ratio, area > 0, group, method=method,
                               scores_a=scores_a, scores_b=scores_b)
    out["candidates"] = area > 0
    return out


def peer_relabel_losses(logits_a: Tensor, logits_b: Tensor, select_a: Tensor, select_b: Tensor, labelled: Tensor,
                        group=None, relabel_to: str = "any") -> tuple[Tensor, Tensor]:
    r"""Peer relabelling of the rejected pixels: each network learns its peer's arg-max where the PEER's
    small-loss selection dropped the noisy label.

    .. math::
        L^{rel}_a = \frac{1}{|\Lambda|} \sum_{i \in \Lambda \setminus S_b} -\log p^{(a)}_{i,\hat y^{(b)}_i},\qquad
        \hat y^{(b)}_i = \arg\max_k z^{(b)}_{i,k}\ \text{(no gradient)}

    (and symmetrically for b), Λ the labelled pixels, normalised over all ranks (:func:`masked_mean`). Selection
    can only *drop* a wrong label — the pixels where noise lives (object borders, vanished objects) then get no
    supervision at all, which bounds any selection method below clean training; this term gives them the peer's
    answer instead, in the spirit of label correction with two networks (Co-Correcting, Liu et al. 2021).
    Per pixel it weighs as much as a selected pixel does in the co-teaching term.

    With ``relabel_to="foreground"`` only rejected pixels whose peer arg-max is a foreground class (≠ 0) are
    relabelled; where the peer says background the pixel stays unsupervised, as in plain co-teaching. Noise that
    hides an object (a vanished or eroded structure, labelled background) is then corrected, while the failure of
    the unrestricted rule — both networks agree on background for a rare class early on, and the term teaches
    that agreement until the class is gone — cannot happen (dilated labels, wrongly foreground, are dropped by the
    selection as before).

    Args:
        logits_a, logits_b: (B, K, H, W). select_a, select_b: (B, H, W) bool selections of
            :func:`coteaching_losses`. labelled: (B, H, W) bool.
        relabel_to: ``"any"`` (every class) or ``"foreground"`` (classes ≥ 1).

    Returns:
        (loss for network a, loss for network b), scalars.
    """
    if select_a.shape != labelled.shape or select_b.shape != labelled.shape:
        raise ValueError("peer_relabel_losses: expected per-pixel selections shaped like the labelled mask "
                         f"{tuple(labelled.shape)}, got {tuple(select_a.shape)} and {tuple(select_b.shape)}")
    if relabel_to not in ("any", "foreground"):
        raise ValueError(f"relabel_to: expected 'any' or 'foreground', got {relabel_to!r}")
    hat_a, hat_b = logits_a.detach().argmax(1), logits_b.detach().argmax(1)
    ce_a = F.cross_entropy(logits_a.float(), hat_b, reduction="none")
    ce_b = F.cross_entropy(logits_b.float(), hat_a, reduction="none")
    rej_b, rej_a = labelled & ~select_b, labelled & ~select_a
    if relabel_to == "foreground":
        rej_b, rej_a = rej_b & (hat_b != 0), rej_a & (hat_a != 0)
    return (masked_mean(ce_a * rej_b.to(ce_a.dtype), labelled, group),
            masked_mean(ce_b * rej_a.to(ce_b.dtype), labelled, group))
