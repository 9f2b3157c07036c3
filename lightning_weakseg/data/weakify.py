"""The weak-label simulator: from a full (instance) mask derive, seeded, the labels annotators give.

All functions take NumPy arrays in the base view (H,W) and a ``numpy.random.Generator``; they run once per
sample in the data layer (never in a training step). Objects are the connected components of each class, or
the instances when an instance map is given (then an instance's class is the majority class of its pixels).
"""
from __future__ import annotations

import cv2
import numpy as np
from scipy import ndimage as ndi
from skimage.morphology import skeletonize

from .batch import IGNORE_INDEX

__all__ = ["objects", "tags_from_mask", "boxes_from_mask", "points_from_mask", "scribbles_from_mask", "noisy_mask",
           "weakify"]


def objects(mask: np.ndarray, instances: np.ndarray | None = None):
    """Yield ``(class, bool map)`` for each foreground object (classes >= 1)."""
    if instances is not None and instances.max() > 0:
        for k in np.unique(instances[instances > 0]):
            obj = instances == k
            vals = mask[obj]
            vals = vals[(vals > 0) & (vals != IGNORE_INDEX)]
            if vals.size:
                yield int(np.bincount(vals).argmax()), obj
        return
    for c in np.unique(mask):
        if c == 0 or c == IGNORE_INDEX:
            continue
        n, comp = cv2.connectedComponents((mask == c).astype(np.uint8), connectivity=8)
        for k in range(1, n):
            yield int(c), comp == k


def tags_from_mask(mask: np.ndarray, num_classes: int) -> np.ndarray:
    """Multi-hot (K,) presence vector; column 0 is background."""
    present = np.bincount(mask[mask != IGNORE_INDEX].ravel(), minlength=num_classes)[:num_classes] > 0
    return present.astype(np.float32)


def boxes_from_mask(mask, instances=None, jitter: float = 0.0, rng=None) -> np.ndarray:
    """Tight boxes ``[class, x0, y0, x1, y1]`` (pixel edges) per object; ``jitter`` moves each edge by up to
    ``jitter`` × the box side (uniform), kept inside the image."""
    h, w = mask.shape
    rows = []
    for c, obj in objects(mask, instances):
        ys, xs = np.nonzero(obj)
        box = np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], np.float64)
        if jitter > 0:
            side = np.array([box[2] - box[0], box[3] - box[1]] * 2)
            box = box + rng.uniform(-jitter, jitter, 4) * side
            box = np.round(np.clip(box, 0, [w, h, w, h]))
            box[2], box[3] = max(box[2], box[0] + 1), max(box[3], box[1] + 1)
            box[0], box[1] = min(box[0], w - 1), min(box[1], h - 1)
        rows.append([c, *box])
    return np.asarray(rows, np.float32).reshape(-1, 5)


def points_from_mask(mask, instances=None, mode: str = "centroid", fraction: float = 1.0, rng=None) -> np.ndarray:
    """One click ``[class, y, x]`` per object: ``"centroid"`` (the object pixel nearest its centroid) or
    ``"click"`` (a random interior pixel, favouring the inside as a human would). ``fraction`` < 1 labels only
    that share of the objects (chosen at random)."""
    if mode not in ("centroid", "click"):
        raise ValueError(f"mode must be 'centroid' or 'click', got {mode!r}")
    rows = []
    for c, obj in objects(mask, instances):
        ys, xs = np.nonzero(obj)
        if mode == "centroid":
            j = np.argmin((ys - ys.mean()) ** 2 + (xs - xs.mean()) ** 2)
        else:
            depth = ndi.distance_transform_edt(np.pad(obj, 1))[1:-1, 1:-1][ys, xs] ** 2
            j = rng.choice(len(ys), p=depth / depth.sum())
        rows.append([c, ys[j], xs[j]])
    pts = np.asarray(rows, np.float32).reshape(-1, 3)
    if fraction < 1 and len(pts):
        keep = rng.random(len(pts)) < fraction
        pts = pts[keep]
    return pts


def _stroke(region: np.ndarray, rng, keep: float) -> np.ndarray:
    """A skeleton-based stroke through a region: a piece of its medial axis around a random skeleton pixel."""
    skel = skeletonize(region)
    ys, xs = np.nonzero(skel)
    if len(ys) == 0:
        ys, xs = np.nonzero(region)
        if len(ys) == 0:
            return skel
        j = len(ys) // 2
        out = np.zeros_like(region)
        out[ys[j], xs[j]] = True
        return out
    j = rng.integers(len(ys))
    extent = max(np.ptp(ys), np.ptp(xs), 1)
    near = (ys - ys[j]) ** 2 + (xs - xs[j]) ** 2 <= (keep * extent) ** 2
    out = np.zeros_like(region)
    out[ys[near], xs[near]] = True
    return out


def scribbles_from_mask(mask, num_classes: int, rng, keep: float = 0.6, width: int = 3, instances=None,
                        background: bool = True) -> np.ndarray:
    """Scribble map like ACDC's: strokes along the medial axis of each object (and of the background) after an
    erosion, ``IGNORE_INDEX`` elsewhere. Strokes never leave their region."""
    out = np.full(mask.shape, IGNORE_INDEX, np.uint8)
    kernel = np.ones((width, width), np.uint8)
    regions = list(objects(mask, instances))
    if background:
        regions.append((0, mask == 0))
    for c, region in regions:
        eroded = cv2.erode(region.astype(np.uint8), np.ones((5, 5), np.uint8)).astype(bool)
        if eroded.sum() < 4:
            eroded = region
        stroke = _stroke(eroded, rng, keep if c else keep / 2)
        stroke = cv2.dilate(stroke.astype(np.uint8), kernel).astype(bool) & region
        out[stroke] = c
    return out


def noisy_mask(mask, rate: float, rng, instances=None, drop: float = 0.4, shift: float = 0.04,
               fraction: float = 1.0) -> np.ndarray:
    """A mask as a hurried annotator draws it, with the amount set by ``rate`` in [0, 1]:

    each object's boundary moves by a signed-distance offset (erosion or dilation up to ``0.8 × rate`` × its
    equivalent radius) plus a smooth random field (boundary jitter); an object is dropped with probability
    ``drop`` × ``rate``; finally the whole mask shifts by up to ``shift`` × ``rate`` × the image size.
    ``rate=0`` returns the mask unchanged.

    ``fraction`` in [0, 1] is the share of masks that are corrupted at all (one draw per mask: a mask is
    returned clean with probability 1 − ``fraction``). That is the noise model of the noisy-label segmentation
    literature ("50 % noise": half of the training masks are wrong, the others clean), under which per-sample
    selection has clean samples to find; the default 1.0 corrupts every mask, by ``rate``, and draws nothing
    more from ``rng`` (the same masks as before the option existed)."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"noise fraction must lie in [0, 1], got {fraction}")
    if rate <= 0 or (fraction < 1.0 and rng.random() >= fraction):
        return mask.copy()
    h, w = mask.shape
    out = np.where(mask == IGNORE_INDEX, IGNORE_INDEX, 0).astype(np.uint8)
    for c, obj in objects(mask, instances):
        if rng.random() < drop * rate:
            continue
        r_eq = np.sqrt(obj.sum() / np.pi)
        pad = int(np.ceil(rate * r_eq * 1.5)) + 2
        ys, xs = np.nonzero(obj)
        y0, y1 = max(ys.min() - pad, 0), min(ys.max() + pad + 1, h)
        x0, x1 = max(xs.min() - pad, 0), min(xs.max() + pad + 1, w)
        crop = obj[y0:y1, x0:x1]
        signed = ndi.distance_transform_edt(crop) - ndi.distance_transform_edt(~crop)
        field = cv2.GaussianBlur(rng.standard_normal(crop.shape).astype(np.float32), (0, 0), max(r_eq / 3, 1.0))
        field /= np.abs(field).max() + 1e-6
        offset = rate * r_eq * rng.uniform(-0.8, 0.8)
        new = signed + offset + 0.5 * rate * r_eq * field > 0
        region = out[y0:y1, x0:x1]
        region[new] = c
    limit = shift * rate * max(h, w)
    dy, dx = np.round(rng.uniform(-limit, limit, 2)).astype(int)
    if dy or dx:
        m = np.float32([[1, 0, dx], [0, 1, dy]])
        out = cv2.warpAffine(out, m, (w, h), flags=cv2.INTER_NEAREST, borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    return out


def weakify(mask: np.ndarray, num_classes: int, keys, rng: np.random.Generator, instances=None,
            box_jitter: float = 0.0, point_mode: str = "centroid", point_fraction: float = 1.0,
            scribble_keep: float = 0.6, noise_rate: float = 0.3, noise_fraction: float = 1.0) -> dict:
    """Derive the requested weak labels (any of ``tags, boxes, points, scribble, noisy_mask``) from a mask."""
    out = {}
    for key in keys:
        if key == "tags":
            out[key] = tags_from_mask(mask, num_classes)
        elif key == "boxes":
            out[key] = boxes_from_mask(mask, instances, box_jitter, rng)
        elif key == "points":
            out[key] = points_from_mask(mask, instances, point_mode, point_fraction, rng)
        elif key == "scribble":
            out[key] = scribbles_from_mask(mask, num_classes, rng, scribble_keep, instances=instances)
        elif key == "noisy_mask":
            out[key] = noisy_mask(mask, noise_rate, rng, instances, fraction=noise_fraction)
        else:
            raise ValueError(f"weakify cannot derive {key!r}")
    return out
