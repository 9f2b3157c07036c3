"""Box-supervision constraints (Kervadec et al., MIDL 2020): tightness prior, emptiness, box size.

Conventions shared by every function here
-----------------------------------------
* ``probs`` is either (B,H,W) — the foreground probability of ONE class, with ``boxes`` a list of B
  tensors (N_i,4) ``[x0, y0, x1, y1]`` — or (B,K,H,W) softmax probabilities (channel 0 = background) with
  ``boxes`` a list of B tensors (N_i,5) ``[class, x0, y0, x1, y1]`` (the batch format of the library).
* Pixel-edge coordinates: an integer box covers columns x0..x1-1 and rows y0..y1-1; x1 = W is allowed.
* **Rounding** of non-integer coordinates (e.g. Kvasir's annotator boxes) is done here, outward:
  ``x0, y0 = floor(.)`` and ``x1, y1 = ceil(.)``, then clamped to the image. Outward rounding never cuts
  object pixels out of a box (so emptiness does not push real foreground to background) and the tightness
  prior is a sum constraint, robust to one extra line. A box that is empty after rounding and clamping
  (x1 <= x0 or y1 <= y0) contributes nothing. Values are NOT validated here (that would cost a device
  sync every step): boxes outside the image, NaN or class ids >= K are rejected once, at the data
  boundary (``lightning_weakseg.data.validate_sample``).
* Everything is batched: boxes are padded into (B, Nmax) tensors with a validity mask, sums over boxes
  and bands come from an integral image (float64 cumulative sums, O(HW) per class), bands and boxes are
  enumerated with ``arange`` grids. No dense mask per box or band, no Python loop over boxes or bands.
* ``reduction``: ``"none"`` the per-image values (B,), ``"mean"`` their mean, ``"sum"`` (default) their sum
  (the convention of :mod:`lightning_weakseg.losses`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._reduction import check_reduction, reduce
from .log_barrier import log_barrier, quadratic_penalty

__all__ = [
    "tightness_prior", "emptiness_constraint", "emptiness_ce", "box_size_constraint", "box_coverage",
    "TightnessPrior", "EmptinessConstraint", "EmptinessCE", "BoxSizeConstraint",
]


def _penalty(z: Tensor, t, penalty: str) -> Tensor:
    if penalty == "log_barrier":
        return log_barrier(z, t)
    if penalty == "quadratic":
        return quadratic_penalty(z)
    raise ValueError(f"penalty: expected 'log_barrier' or 'quadratic', got {penalty!r}")


def _prepare(probs: Tensor, boxes, name: str):
    """Canonical form: p (B,C,H,W), coords long (B,N,4) xyxy rounded+clamped, cls (B,N), valid (B,N), fg."""
    if not isinstance(probs, Tensor) or not probs.is_floating_point() or probs.ndim not in (3, 4):
        got = tuple(probs.shape) if isinstance(probs, Tensor) else type(probs).__name__
        raise ValueError(f"{name}: expected probs as a float tensor (B,H,W) or (B,K,H,W), got {got}")
    ncol = 4 if probs.ndim == 3 else 5
    B, H, W = probs.shape[0], probs.shape[-2], probs.shape[-1]
    if isinstance(boxes, Tensor) and boxes.ndim == 3:
        boxes = list(boxes)
    if not isinstance(boxes, (list, tuple)) or len(boxes) != B:
        got = len(boxes) if isinstance(boxes, (list, tuple)) else type(boxes).__name__
        raise ValueError(f"{name}: expected boxes as a list of B={B} tensors, got {got}")
    for i, b in enumerate(boxes):
        if not isinstance(b, Tensor) or b.ndim != 2 or b.shape[1] != ncol:
            got = tuple(b.shape) if isinstance(b, Tensor) else type(b).__name__
            hint = "[x0,y0,x1,y1] for (B,H,W) probs" if ncol == 4 else "[class,x0,y0,x1,y1] for (B,K,H,W) probs"
            raise ValueError(f"{name}: expected boxes[{i}] of shape (N,{ncol}) {hint}, got {got}")
    p = probs.unsqueeze(1) if probs.ndim == 3 else probs
    dev = probs.device
    lengths = torch.tensor([len(b) for b in boxes], device=dev)
    n_max = max((len(b) for b in boxes), default=0)
    padded = torch.zeros(B, n_max, ncol, device=dev, dtype=torch.float64)
    if n_max:
        padded = torch.nn.utils.rnn.pad_sequence(
            [b.to(device=dev, dtype=torch.float64) for b in boxes], batch_first=True)
    valid = torch.arange(n_max, device=dev)[None, :] < lengths[:, None]
    xyxy = padded[..., ncol - 4:]
    cls = padded[..., 0].long() if ncol == 5 else torch.zeros(B, n_max, dtype=torch.long, device=dev)
    x0 = xyxy[..., 0].floor().clamp(0, W)
    y0 = xyxy[..., 1].floor().clamp(0, H)
    x1 = xyxy[..., 2].ceil().clamp(0, W)
    y1 = xyxy[..., 3].ceil().clamp(0, H)
    coords = torch.stack([x0, y0, x1, y1], -1).nan_to_num(0.0).long()
    valid = valid & (coords[..., 2] > coords[..., 0]) & (coords[..., 3] > coords[..., 1])
    cls = torch.where(valid, cls, torch.zeros_like(cls))
    fg = slice(0, 1) if probs.ndim == 3 else slice(1, None)
    return p, coords, cls, valid, fg


def _integral(p: Tensor) -> Tensor:
    """S[b,c,y,x] = sum of p[b,c,:y,:x]; (B,C,H+1,W+1), float64 so that corner differences stay exact."""
    dtype = torch.float32 if p.device.type == "mps" else torch.float64
    return F.pad(p.to(dtype).cumsum(-1).cumsum(-2), (1, 0, 1, 0))


def _rect_sum(S: Tensor, cls: Tensor, x0: Tensor, y0: Tensor, x1: Tensor, y1: Tensor) -> Tensor:
    """Sums of p over [y0,y1) x [x0,x1) of channel cls; all index tensors (B, ...) of one shape."""
    B, C, Hp, Wp = S.shape
    flat = S.reshape(B, C * Hp * Wp)
    base = cls * (Hp * Wp)

    def at(y, x):
        return torch.gather(flat, 1, (base + y * Wp + x).reshape(B, -1)).reshape(cls.shape)

    return at(y1, x1) - at(y0, x1) - at(y1, x0) + at(y0, x0)


def box_coverage(probs: Tensor, boxes) -> Tensor:
    """Per-class count of boxes covering each pixel, (B,C,H,W) (C = 1 for (B,H,W) probs), float.

    Built from a 2D difference array (four corner increments per box + two cumulative sums), so the cost
    is O(HW + N) with no dense mask per box. ``coverage > 0`` is "inside some box of that class".

    Example:
        >>> cov = box_coverage(torch.zeros(1, 4, 4), [torch.tensor([[0., 0., 2., 2.], [1., 1., 3., 3.]])])
        >>> cov[0, 0]
        tensor([[1., 1., 0., 0.],
                [1., 2., 1., 0.],
                [0., 1., 1., 0.],
                [0., 0., 0., 0.]])
    """
    p, coords, cls, valid, _ = _prepare(probs, boxes, "box_coverage")
    B, C, H, W = p.shape
    x0, y0, x1, y1 = coords.unbind(-1)
    wp = W + 1
    base = cls * ((H + 1) * wp)
    idx = torch.cat([base + y0 * wp + x0, base + y0 * wp + x1, base + y1 * wp + x0, base + y1 * wp + x1], 1)
    one = valid.to(torch.float32)
    val = torch.cat([one, -one, -one, one], 1)
    diff = torch.zeros(B, C * (H + 1) * wp, device=p.device, dtype=torch.float32)
    diff.scatter_add_(1, idx, val)
    return diff.reshape(B, C, H + 1, wp).cumsum(-1).cumsum(-2)[..., :H, :W]


def tightness_prior(probs: Tensor, boxes, t: float | Tensor, band_width: int = 5,
                    penalty: str = "log_barrier", reduction: str = "sum") -> Tensor:
    r"""Tightness prior of boxes: every line crossing a box holds foreground, enforced per band of lines.

    For a box [x0,x1) x [y0,y1) and band width w, the columns are grouped w at a time from x0 (the last
    group may be narrower, r = (x1-x0) mod w lines); each column band spans the box's rows. Likewise rows are
    grouped w at a time from y0, each row band spanning the box's columns. For a band of ``width`` lines:

    .. math::  \sum_{(i,j)\in\text{band}} p_{ij} \ge \text{width}, \qquad
               \mathcal{L} = \sum_{\text{images}}\sum_{\text{boxes}}\sum_{\text{bands}}
               \psi_t\Big(\text{width} - \sum_{\text{band}} p\Big)

    with :math:`\psi_t` = :func:`log_barrier` (or :func:`quadratic_penalty`). A sum, not a mean.

    Args:
        probs: (B,H,W) foreground probability with boxes (N_i,4) ``[x0,y0,x1,y1]``; or (B,K,H,W) softmax
            with boxes (N_i,5) ``[class,x0,y0,x1,y1]`` (each box constrains its own class's channel).
        boxes: list of B tensors (see the module docstring for rounding).
        t: barrier parameter (ignored by ``penalty="quadratic"``).
        band_width: w >= 1 lines per band.
        penalty: ``"log_barrier"`` or ``"quadratic"``.
        reduction: ``"none"`` (per image, (B,)), ``"mean"`` or ``"sum"`` of those over the images
            (:mod:`lightning_weakseg.losses`).

    Example:
        >>> p = torch.zeros(1, 4, 4); p[0, :, 1] = 1.0; p[0, 1, :] = 1.0   # a cross fills every line
        >>> box = [torch.tensor([[0., 0., 4., 4.]])]
        >>> float(tightness_prior(p, box, t=5.0, band_width=2, penalty="quadratic"))
        0.0
    """
    check_reduction(reduction)
    if not isinstance(band_width, int) or band_width < 1:
        raise ValueError(f"tightness_prior: expected an integer band_width >= 1, got {band_width!r}")
    p, coords, cls, valid, _ = _prepare(probs, boxes, "tightness_prior")
    B, C, H, W = p.shape
    S = _integral(p)
    x0, y0, x1, y1 = (c[..., None] for c in coords.unbind(-1))          # (B,N,1)
    cls_, valid_ = cls[..., None], valid[..., None]
    w = band_width
    # Column bands: start x0 + k*w, end min(start + w, x1), spanning rows [y0, y1).
    xs = x0 + w * torch.arange(-(-W // w), device=p.device)            # (B,N,Kx)
    col_ok = valid_ & (xs < x1)
    xs = xs.clamp(max=W)
    xe = torch.minimum(xs + w, x1).clamp(min=0)
    xe = torch.maximum(xe, xs)
    cls_x = cls_.expand_as(xs)
    col_sum = _rect_sum(S, cls_x, xs, y0.expand_as(xs), xe, y1.expand_as(xs))
    col_z = (xe - xs).to(S.dtype) - col_sum
    # Row bands: start y0 + k*w, end min(start + w, y1), spanning columns [x0, x1).
    ys = y0 + w * torch.arange(-(-H // w), device=p.device)            # (B,N,Ky)
    row_ok = valid_ & (ys < y1)
    ys = ys.clamp(max=H)
    ye = torch.maximum(torch.minimum(ys + w, y1), ys)
    cls_y = cls_.expand_as(ys)
    row_sum = _rect_sum(S, cls_y, x0.expand_as(ys), ys, x1.expand_as(ys), ye)
    row_z = (ye - ys).to(S.dtype) - row_sum
    z = torch.cat([col_z, row_z], -1).to(probs.dtype)
    ok = torch.cat([col_ok, row_ok], -1)
    terms = torch.where(ok, _penalty(z, t, penalty), z.new_zeros(()))
    return reduce(terms.sum((1, 2)) if terms.numel() else probs.new_zeros(B), reduction)


def emptiness_constraint(probs: Tensor, boxes, t: float | Tensor, penalty: str = "log_barrier",
                         reduction: str = "sum", valid: Tensor | None = None) -> Tensor:
    r"""Emptiness as a constraint: no foreground of class c outside all boxes of class c.

    .. math::  \mathcal{L} = \sum_{\text{images}} \sum_{c \ge 1} \psi_t\Big(\sum_{i \notin \cup\,\text{boxes}_c} p_{ic}\Big)

    (with (B,H,W) probs the single channel plays the role of c). Box annotations are assumed complete:
    a class with no box in an image must be absent from the whole image (an image without any box is all
    background). Because z >= 0 always, :math:`\psi_t` stays on its linear branch here:
    :math:`t\cdot\sum p` plus a constant, which grows with t and image size — see :func:`emptiness_ce`
    for the bounded alternative.

    Example:
        >>> p = torch.zeros(1, 3, 3); p[0, 0, 2] = 0.5                     # 0.5 outside the box
        >>> float(emptiness_constraint(p, [torch.tensor([[0., 0., 2., 2.]])], t=1.0, penalty="quadratic"))
        0.25
    """
    check_reduction(reduction)
    p, *_, fg = _prepare(probs, boxes, "emptiness_constraint")
    inside = box_coverage(probs, boxes) > 0
    if valid is not None:  # padding is neither inside nor outside a box
        inside = inside | ~valid.bool()[:, None]
    outside_sum = p.masked_fill(inside, 0.0)[:, fg].sum((-1, -2))        # (B, C_fg)
    return reduce(_penalty(outside_sum, t, penalty).sum(1), reduction)


def emptiness_ce(logits: Tensor, boxes, reduction: str = "sum", valid: Tensor | None = None) -> Tensor:
    r"""Emptiness as cross-entropy: outside the boxes of class c, class c is not allowed.

    Each pixel i gets the candidate set :math:`A_i = \{0\} \cup \{c : i \in \text{some box of class } c\}`
    and the loss :math:`-\log \sum_{k \in A_i} p_{ik}` (partial-label CE). Outside every box this is plain
    background CE :math:`-\log p_{i0}`; in the binary case it is exactly 0 inside the boxes. Per image the
    loss is averaged over the constrained pixels (those whose candidate set is not all classes).

    Args:
        logits: (B,K,H,W) raw scores, K >= 2, channel 0 background.
        boxes: list of B tensors (N_i,5) ``[class,x0,y0,x1,y1]``.
        reduction: ``"none"`` (per image, (B,)), ``"mean"`` or ``"sum"`` of those over the images.
        valid: optional (B,H,W) bool: only these pixels are constrained (padding of a letterboxed image is not).

    Example:
        >>> logits = torch.zeros(1, 2, 2, 2)                                # p = 0.5 everywhere
        >>> round(float(emptiness_ce(logits, [torch.tensor([[1., 0., 0., 1., 2.]])])), 4)  # log 2
        0.6931
    """
    check_reduction(reduction)
    if not isinstance(logits, Tensor) or logits.ndim != 4 or logits.shape[1] < 2:
        got = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
        raise ValueError(f"emptiness_ce: expected logits (B,K,H,W) with K >= 2, got {got}")
    allowed = box_coverage(logits, boxes) > 0
    allowed[:, 0] = True
    log_allowed = torch.logsumexp(logits.masked_fill(~allowed, float("-inf")), 1)
    loss = torch.logsumexp(logits, 1) - log_allowed                      # (B,H,W), >= 0
    constrained = (~allowed).any(1)
    if valid is not None:  # (B,H,W) bool: pixels outside it (padding) are not constrained
        constrained = constrained & valid.bool()
    per_image = (loss * constrained).sum((-1, -2)) / constrained.sum((-1, -2)).clamp(min=1)
    return reduce(per_image, reduction)


def box_size_constraint(probs: Tensor, boxes, t: float | Tensor, a: float = 0.5, b: float = 0.9,
                        penalty: str = "log_barrier", reduction: str = "sum") -> Tensor:
    r"""Box size: :math:`a|box| \le \sum_{box} p_c \le b|box|` for every box (two constraints each).

    .. math::  \mathcal{L} = \sum_{\text{boxes}} \psi_t\big(a|box| - \textstyle\sum_{box} p\big)
               + \psi_t\big(\textstyle\sum_{box} p - b|box|\big)

    |box| is the pixel area after outward rounding. Defaults a = 0.5, b = 0.9 (paper, prostate).

    Example:
        >>> p = torch.full((1, 2, 2), 0.25)                                 # sum 1 in a 4-pixel box
        >>> float(box_size_constraint(p, [torch.tensor([[0., 0., 2., 2.]])], t=1.0, penalty="quadratic"))
        1.0
    """
    check_reduction(reduction)
    if not 0.0 <= a <= b:
        raise ValueError(f"box_size_constraint: expected 0 <= a <= b, got a={a}, b={b}")
    p, coords, cls, valid, _ = _prepare(probs, boxes, "box_size_constraint")
    S = _integral(p)
    x0, y0, x1, y1 = coords.unbind(-1)
    s = _rect_sum(S, cls, x0, y0, x1, y1)
    area = ((x1 - x0) * (y1 - y0)).to(S.dtype)
    z = torch.stack([a * area - s, s - b * area], -1).to(probs.dtype)   # (B,N,2)
    terms = torch.where(valid[..., None], _penalty(z, t, penalty), z.new_zeros(()))
    return reduce(terms.sum((1, 2)), reduction)


class TightnessPrior(nn.Module):
    """Module form of :func:`tightness_prior`; ``t`` is an attribute a schedule may update."""

    def __init__(self, t: float = 5.0, band_width: int = 5, penalty: str = "log_barrier",
                 reduction: str = "sum") -> None:
        super().__init__()
        self.t, self.band_width, self.penalty, self.reduction = t, band_width, penalty, check_reduction(reduction)

    def forward(self, probs: Tensor, boxes) -> Tensor:
        return tightness_prior(probs, boxes, self.t, self.band_width, self.penalty, self.reduction)


class EmptinessConstraint(nn.Module):
    """Module form of :func:`emptiness_constraint`."""

    def __init__(self, t: float = 5.0, penalty: str = "log_barrier", reduction: str = "sum") -> None:
        super().__init__()
        self.t, self.penalty, self.reduction = t, penalty, check_reduction(reduction)

    def forward(self, probs: Tensor, boxes) -> Tensor:
        return emptiness_constraint(probs, boxes, self.t, self.penalty, self.reduction)


class EmptinessCE(nn.Module):
    """Module form of :func:`emptiness_ce`."""

    def __init__(self, reduction: str = "sum") -> None:
        super().__init__()
        self.reduction = check_reduction(reduction)

    def forward(self, logits: Tensor, boxes) -> Tensor:
        return emptiness_ce(logits, boxes, self.reduction)


class BoxSizeConstraint(nn.Module):
    """Module form of :func:`box_size_constraint`."""

    def __init__(self, t: float = 5.0, a: float = 0.5, b: float = 0.9, penalty: str = "log_barrier",
                 reduction: str = "sum") -> None:
        super().__init__()
        self.t, self.a, self.b, self.penalty, self.reduction = t, a, b, penalty, check_reduction(reduction)

    def forward(self, probs: Tensor, boxes) -> Tensor:
        return box_size_constraint(probs, boxes, self.t, self.a, self.b, self.penalty, self.reduction)
