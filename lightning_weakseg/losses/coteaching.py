"""Co-teaching building blocks (Han et al., NeurIPS 2018; Yu et al., ICML 2019): the keep-ratio schedule, the
peer exchange and the segmentation losses. The small-loss selection itself, exact and global across
``torch.distributed`` ranks, is in :mod:`lightning_weakseg.losses.selection` (re-exported here).
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

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
    "EXPERIMENTAL_SELECTION",
    "experimental_options",
]


def _is_bool(v) -> bool:
    return isinstance(v, bool)


def _is_fraction(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and 0.0 <= float(v) <= 1.0


# name -> (default, check, what the check expects). Each default is the recommended behaviour; the other values
# reproduce variants that are not recommended (docs/regimes/noisy.md, "Experimental options", has the measurements).
EXPERIMENTAL_SELECTION: dict[str, tuple[Any, Callable[[Any], bool], str]] = {
    # "ce": rank images by their mean cross-entropy, the paper's rule (collapses to all-background masks)
    "sample_rank": ("dice", lambda v: v in ("dice", "ce"), "'dice' or 'ce'"),
    # False: one pixel ranking over all classes, the paper's rule (drops the minority foreground first)
    "class_balanced": (True, _is_bool, "a bool"),
    # True: co-teaching+ (Yu et al. 2019), candidates are the items where the two networks' arg-max differ (per
    # sample: the images with any such pixel, their mean CE over those pixels)
    "coteach_plus": (False, _is_bool, "a bool"),
    # co-teaching+ only: a candidate group (a class for pixel selection, the batch for sample selection) whose
    # disagreement items are fewer than this fraction of its labelled items, over all ranks, keeps all its labelled
    # items; 0 is the paper's rule
    "plus_min_disagreement": (0.1, _is_fraction, "a fraction in [0, 1]"),
}


def experimental_options(options: Mapping[str, Any] | None, known: Mapping[str, tuple[Any, Callable, str]],
                         owner: str) -> dict[str, Any]:
    """``options`` validated against ``known`` (name → (default, check, expectation)), defaults filled in.

    Example:
        >>> experimental_options({"sample_rank": "ce"}, EXPERIMENTAL_SELECTION, "f")["sample_rank"]
        'ce'
    """
    options = dict(options or {})
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise ValueError(f"{owner}: unknown experimental options {unknown}; known: {sorted(known)}")
    out = {}
    for name, (default, check, expected) in known.items():
        value = options.get(name, default)
        if not check(value):
            raise ValueError(f"{owner}: experimental option {name!r}: expected {expected}, got {value!r}")
        out[name] = value
    return out


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
                      keep_ratio: float | Sequence[float], *, selection: str = "sample", ignore_index: int = 255,
                      group=None, method: str = "radix", experimental: Mapping[str, Any] | None = None
                      ) -> dict[str, Tensor]:
    r"""Co-teaching losses of two segmentation networks on a noisy mask (Han et al. 2018).

    Per-pixel cross-entropy :math:`\ell_{n,i} = -\log p^{(n)}_{i,y_i}` on the labelled pixels Λ
    (``target != ignore_index`` and ``has``); :func:`coteaching_pair_loss` keeps R of the candidate items for
    each network and trains its peer on them.

    - ``selection="sample"``: items are images; each network ranks them by its per-image soft Dice loss against
      the noisy mask (:func:`~lightning_weakseg.losses.soft_dice_loss`), the kept images train on their mean CE
      over Λ. Mean CE is dominated by the background, so ranking by it keeps the masks that lost their object;
      a mask that misses or doubles an object the network sees has a large Dice loss.
    - ``selection="pixel"``: items are pixels, ranked by their CE, R of the candidates of *each noisy-label
      class* kept: one ranking over all pixels drops the minority foreground first. ``keep_ratio`` may be a
      sequence of K ratios, one per class (the fraction of wrong labels differs between classes).

    ``experimental``: variants that are not recommended, checked against :data:`EXPERIMENTAL_SELECTION` (which
    says what each does): ``sample_rank="ce"`` and ``class_balanced=False`` (the paper's rules), ``coteach_plus``
    with ``plus_min_disagreement`` (co-teaching+, Yu et al. 2019).

    Args:
        logits_a, logits_b: (B, K, H, W). target: (B, H, W) long. has: (B,) bool or None (all labelled).
        keep_ratio: R(T), or one per class (pixel selection). group, method: see :func:`small_loss_selection`.

    Returns:
        dict with ``loss_a``, ``loss_b`` (scalars), ``select_a``, ``select_b`` ((B, H, W) or (B,) bool)
        and ``candidates`` (the valid mask the selection ran on).

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> la, lb = torch.randn(4, 2, 8, 8, generator=g), torch.randn(4, 2, 8, 8, generator=g)
        >>> target = torch.randint(0, 2, (4, 8, 8), generator=g)
        >>> out = coteaching_losses(la, lb, target, None, 0.5)                    # 2 of the 4 images
        >>> out["select_a"].tolist(), out["loss_a"].shape
        ([False, True, True, False], torch.Size([]))
        >>> [int((coteaching_losses(la, lb, target, None, (1.0, 0.5), selection="pixel")["select_a"]
        ...       & (target == c)).sum()) for c in (0, 1)], [int((target == c).sum()) for c in (0, 1)]
        ([127, 65], [127, 129])
    """
    opts = experimental_options(experimental, EXPERIMENTAL_SELECTION, "coteaching_losses")
    b, k = _check_inputs(logits_a, logits_b, target, selection)
    ratios = _class_keep_ratios(keep_ratio, k, selection, opts["class_balanced"])
    labelled = target != ignore_index
    if has is not None:
        labelled = labelled & has.view(b, 1, 1)
    safe = torch.where(labelled, target, torch.zeros_like(target)).long()
    ce_a = F.cross_entropy(logits_a.float(), safe, reduction="none")
    ce_b = F.cross_entropy(logits_b.float(), safe, reduction="none")
    disagree = logits_a.detach().argmax(1) != logits_b.detach().argmax(1) if opts["coteach_plus"] else None
    min_disagreement = float(opts["plus_min_disagreement"])
    if selection == "pixel":
        groups = [(labelled & (safe == c), ratios[c]) for c in range(k)] if opts["class_balanced"] \
            else [(labelled, ratios[0])]
        return _pixel_exchange(ce_a, ce_b, groups, disagree, min_disagreement, group, method)
    region = labelled if disagree is None else \
        _plus_candidates(labelled, labelled & disagree, min_disagreement, group, per_image=True)
    scores = (None, None) if opts["sample_rank"] == "ce" else \
        _dice_scores(logits_a, logits_b, target, labelled, ignore_index)
    return _sample_exchange(ce_a, ce_b, region, ratios[0], scores, group, method)


def _check_inputs(logits_a: Tensor, logits_b: Tensor, target: Tensor, selection: str) -> tuple[int, int]:
    if selection not in ("pixel", "sample"):
        raise ValueError(f"coteaching_losses: expected selection 'pixel' or 'sample', got {selection!r}")
    if logits_a.shape != logits_b.shape or logits_a.dim() != 4:
        raise ValueError(f"coteaching_losses: expected two (B, K, H, W) logits of equal shape, got "
                         f"{tuple(logits_a.shape)} and {tuple(logits_b.shape)}")
    b, k, h, w = logits_a.shape
    if tuple(target.shape) != (b, h, w):
        raise ValueError(f"coteaching_losses: expected target of shape {(b, h, w)}, got {tuple(target.shape)}")
    return b, k


def _class_keep_ratios(keep_ratio, k: int, selection: str, balanced: bool) -> list[float]:
    """One keep ratio per class: the given sequence (class-balanced pixel selection only), or R repeated."""
    if not isinstance(keep_ratio, (list, tuple)):
        return [float(keep_ratio)] * k
    if selection != "pixel" or not balanced:
        raise ValueError(f"coteaching_losses: one keep ratio per class ({list(keep_ratio)}) needs class-balanced "
                         "pixel selection (selection='pixel')")
    if len(keep_ratio) != k:
        raise ValueError(f"coteaching_losses: expected one keep ratio per class ({k}), got {len(keep_ratio)}: "
                         f"{list(keep_ratio)}")
    return [float(r) for r in keep_ratio]


def _plus_candidates(labelled: Tensor, disagreeing: Tensor, min_disagreement: float, group,
                     per_image: bool = False) -> Tensor:
    """Co-teaching+ candidates: ``disagreeing``, or all of ``labelled`` when the disagreement items (pixels, or
    images with any, ``per_image``) are fewer than ``min_disagreement`` of the labelled ones over all ranks."""
    if min_disagreement <= 0.0:
        return disagreeing
    dis, lab = (disagreeing.flatten(1).any(1), labelled.flatten(1).any(1)) if per_image else (disagreeing, labelled)
    counts, _ = _global_sum(torch.stack([dis.sum(), lab.sum()]).long(), group)  # every rank decides alike
    return torch.where(counts[0] < min_disagreement * counts[1], labelled, disagreeing)  # no host sync


def _pixel_exchange(ce_a: Tensor, ce_b: Tensor, groups: list[tuple[Tensor, float]], disagree: Tensor | None,
                    min_disagreement: float, group, method: str) -> dict[str, Tensor]:
    """Each network keeps ``ratio`` of the candidate pixels of every group (class); its peer trains on them."""
    select_a = select_b = candidates = torch.zeros_like(ce_a, dtype=torch.bool)
    for labelled, ratio in groups:  # K collectives under DDP, the same K on every rank
        cand = labelled if disagree is None else _plus_candidates(labelled, labelled & disagree, min_disagreement,
                                                                  group)
        select_a = select_a | small_loss_selection(ce_a.detach(), ratio, cand, group, method=method)
        select_b = select_b | small_loss_selection(ce_b.detach(), ratio, cand, group, method=method)
        candidates = candidates | cand
    return {"loss_a": masked_mean(ce_a, select_b, group), "loss_b": masked_mean(ce_b, select_a, group),
            "select_a": select_a, "select_b": select_b, "candidates": candidates}


def _dice_scores(logits_a: Tensor, logits_b: Tensor, target: Tensor, labelled: Tensor,
                 ignore_index: int) -> tuple[Tensor, Tensor]:
    """Each network's per-image soft Dice loss against the noisy mask, over all labelled pixels."""
    noisy = torch.where(labelled, target, torch.full_like(target, ignore_index))
    return (soft_dice_loss(torch.softmax(logits_a.detach().float(), 1), noisy, ignore_index),
            soft_dice_loss(torch.softmax(logits_b.detach().float(), 1), noisy, ignore_index))


def _sample_exchange(ce_a: Tensor, ce_b: Tensor, region: Tensor, ratio: float,
                     scores: tuple[Tensor | None, Tensor | None], group, method: str) -> dict[str, Tensor]:
    """Per-image mean CE over ``region``; images with any region pixel are the candidates of the exchange."""
    area = region.flatten(1).sum(1)
    weights = region.to(ce_a.dtype) / area.clamp_min(1).view(-1, 1, 1).to(ce_a.dtype)
    per_a, per_b = (ce_a * weights).flatten(1).sum(1), (ce_b * weights).flatten(1).sum(1)
    out = coteaching_pair_loss(per_a, per_b, ratio, area > 0, group, method=method,
                               scores_a=scores[0], scores_b=scores[1])
    out["candidates"] = area > 0
    return out


def peer_relabel_losses(logits_a: Tensor, logits_b: Tensor, select_a: Tensor, select_b: Tensor, labelled: Tensor,
                        group=None, relabel_to: str = "any") -> tuple[Tensor, Tensor]:
    r"""Peer relabelling of the rejected pixels: each network learns its peer's arg-max where the PEER's
    small-loss selection dropped the noisy label.

    .. math::
        L^{rel}_a = \frac{1}{|\Lambda|} \sum_{i \in \Lambda \setminus S_b} -\log p^{(a)}_{i,\hat y^{(b)}_i},\qquad
        \hat y^{(b)}_i = \arg\max_k z^{(b)}_{i,k}\ \text{(no gradient)}

    (and symmetrically for b), Λ the labelled pixels, normalised over all ranks (:func:`masked_mean`); per pixel it
    weighs as much as a selected pixel does in the co-teaching term. Selection can only *drop* a wrong label; this
    term gives the dropped pixels the peer's answer instead, in the spirit of label correction with two networks
    (Co-Correcting, Liu et al. 2021). ``relabel_to="foreground"`` relabels only rejected pixels whose peer arg-max
    is a foreground class (≠ 0), so that no class can be taught away. Not recommended: the peers teach back their
    own errors (``CoTeachingMixin``'s ``experimental={"relabel_rejected": True}``; docs/regimes/noisy.md).

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
