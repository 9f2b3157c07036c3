"""Instance output for nuclei-like objects: post-processing of a foreground map into instances and the usual
instance metrics (object-level F1 with IoU > 0.5 matching, Aggregated Jaccard Index, pixel Dice).

All metrics are computed from one contingency matrix C[g, s] = |G_g ∩ S_s| built with a single
``np.bincount`` over ``gt_id * n_pred + pred_id`` — no per-object loops.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

__all__ = ["instances_from_mask", "instances_from_points", "contingency", "object_f1", "aji", "pixel_dice",
           "instance_metrics"]


def _np(x) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def instances_from_mask(mask, min_size: int = 0, connectivity: int = 1) -> np.ndarray:
    """Connected components of a binary foreground map: int32 (H, W), 0 background, 1..N instances
    (components smaller than ``min_size`` pixels are dropped, ids stay consecutive)."""
    m = _np(mask).astype(bool)
    lab, n = ndi.label(m, structure=ndi.generate_binary_structure(2, connectivity))
    if min_size > 1 and n:
        sizes = np.bincount(lab.ravel(), minlength=n + 1)
        keep = sizes >= min_size
        keep[0] = False
        remap = np.zeros(n + 1, np.int32)
        remap[keep] = np.arange(1, keep.sum() + 1)
        lab = remap[lab]
    return lab.astype(np.int32)


def instances_from_points(mask, points, prob=None, min_size: int = 0, keep_unseeded: bool = True,
                          compactness: float = 0.0) -> np.ndarray:
    """Split a binary foreground map into instances by a marker watershed seeded at the points.

    The relief is −(distance to background) (or 1 − ``prob`` when a foreground probability is given), so
    touching nuclei are cut along their neck. Points on background are dropped. Foreground components that hold
    no point become extra instances when ``keep_unseeded`` (a partial set of clicks), else background.

    Args:
        mask: (H, W) bool foreground.
        points: (M, 2) ``[y, x]`` pixel indices.
        prob: optional (H, W) foreground probability for the relief.
    Returns:
        int32 (H, W), 0 background, 1..N instances.
    """
    from skimage.segmentation import watershed

    m = _np(mask).astype(bool)
    pts = np.rint(_np(points)).astype(np.int64).reshape(-1, 2)
    pts = pts[(pts[:, 0] >= 0) & (pts[:, 0] < m.shape[0]) & (pts[:, 1] >= 0) & (pts[:, 1] < m.shape[1])]
    pts = pts[m[pts[:, 0], pts[:, 1]]]
    markers = np.zeros(m.shape, np.int32)
    markers[pts[:, 0], pts[:, 1]] = np.arange(1, len(pts) + 1)
    relief = -ndi.distance_transform_edt(m) if prob is None else 1.0 - _np(prob).astype(np.float64)
    out = watershed(relief, markers, mask=m, compactness=compactness).astype(np.int32) if len(pts) else \
        np.zeros(m.shape, np.int32)
    if keep_unseeded:
        rest = instances_from_mask(m & (out == 0))
        out = np.where(rest > 0, rest + out.max(), out).astype(np.int32)
    # consecutive ids (duplicate points leave gaps)
    _, inv = np.unique(out, return_inverse=True)
    out = inv.reshape(m.shape).astype(np.int32)
    if min_size > 1:
        sizes = np.bincount(out.ravel())
        small = sizes < min_size
        small[0] = False
        out[small[out]] = 0
        _, inv = np.unique(out, return_inverse=True)
        out = inv.reshape(m.shape).astype(np.int32)
    return out


def contingency(gt, pred):
    """Intersections C (Ng+1, Ns+1) of relabelled instances (row/column 0 = background) and the areas of the
    gt and predicted instances (Ng+1,), (Ns+1,). Ids need not be consecutive."""
    g, s = _np(gt), _np(pred)
    if g.shape != s.shape:
        raise ValueError(f"expected gt and pred of the same shape, got {g.shape} and {s.shape}")
    _, g = np.unique(g, return_inverse=True)
    _, s = np.unique(s, return_inverse=True)
    g, s = g.ravel(), s.ravel()
    # np.unique puts 0 first when present; shift so that index 0 is always background
    if not (_np(gt) == 0).any():
        g = g + 1
    if not (_np(pred) == 0).any():
        s = s + 1
    ng, ns = int(g.max()) + 1, int(s.max()) + 1
    c = np.bincount(g * ns + s, minlength=ng * ns).reshape(ng, ns)
    return c, c.sum(1), c.sum(0)


def _iou(c, ag, as_):
    inter = c[1:, 1:].astype(np.float64)
    union = ag[1:, None] + as_[None, 1:] - inter
    return inter / np.maximum(union, 1), inter, union


def object_f1(gt, pred, iou_threshold: float = 0.5) -> dict:
    """Object-level detection F1: a predicted instance is a true positive when its IoU with a gt instance
    exceeds ``iou_threshold`` (≥ 0.5 makes the matching one-to-one). Returns dict(f1, precision, recall, tp,
    fp, fn); with no gt and no prediction, f1 = 1."""
    c, ag, as_ = contingency(gt, pred)
    iou, _, _ = _iou(c, ag, as_)
    ng, ns = iou.shape
    if iou_threshold < 0.5:
        raise ValueError(f"iou_threshold must be >= 0.5 for a one-to-one matching, got {iou_threshold}")
    tp = int((iou > iou_threshold).sum())
    fp, fn = ns - tp, ng - tp
    prec = tp / ns if ns else float(ng == 0)
    rec = tp / ng if ng else float(ns == 0)
    f1 = 2 * tp / (2 * tp + fp + fn) if (tp + fp + fn) else 1.0
    return dict(f1=f1, precision=prec, recall=rec, tp=tp, fp=fp, fn=fn)


def aji(gt, pred) -> float:
    """Aggregated Jaccard Index (Kumar et al., IEEE TMI 2017).

    For each gt instance G_i take S_j* = the predicted instance with the largest IoU (none if it overlaps no
    prediction); AJI = Σ_i |G_i ∩ S_j*| / (Σ_i |G_i ∪ S_j*| + Σ_{S never chosen} |S|). A prediction may be
    chosen by several gt instances (as in the original definition). No gt and no prediction gives 1.
    """
    c, ag, as_ = contingency(gt, pred)
    ng, ns = c.shape[0] - 1, c.shape[1] - 1
    if ng == 0:
        return 1.0 if ns == 0 else 0.0
    if ns == 0:
        return 0.0
    iou, inter, union = _iou(c, ag, as_)
    best = iou.argmax(1)
    hit = inter[np.arange(ng), best] > 0
    num = inter[np.arange(ng), best][hit].sum()
    den = union[np.arange(ng), best][hit].sum() + ag[1:][~hit].sum()
    used = np.zeros(ns, bool)
    used[best[hit]] = True
    den += as_[1:][~used].sum()
    return float(num / den) if den else 1.0


def pixel_dice(gt, pred) -> float:
    """Dice of the foregrounds (id > 0) of two maps; 1 when both are empty."""
    g, s = _np(gt) > 0, _np(pred) > 0
    den = g.sum() + s.sum()
    return float(2 * (g & s).sum() / den) if den else 1.0


def instance_metrics(gt, pred, iou_threshold: float = 0.5) -> dict:
    """dict(dice, aji, f1, precision, recall) of one image's instance maps."""
    out = object_f1(gt, pred, iou_threshold)
    return dict(dice=pixel_dice(gt, pred), aji=aji(gt, pred), f1=out["f1"], precision=out["precision"],
                recall=out["recall"])
