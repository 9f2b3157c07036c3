"""The batch contract — documented and validated here, and only here.

A **sample** (what a dataset returns) and a **batch** (what :func:`collate` builds) are dicts:

============== ======================== ==========================================================
key            sample                   batch
============== ======================== ==========================================================
``image``      float (C,H,W) in [0, 1]  float (B,C,H,W)                       — always present
``mask``       long (H,W)               long (B,H,W), 255 where unknown       + ``has_mask`` (B,)
``noisy_mask`` long (H,W)               long (B,H,W)                          + ``has_noisy_mask``
``scribble``   long (H,W)               long (B,H,W)                          + ``has_scribble``
``pseudo``     long (H,W)               long (B,H,W)                          + ``has_pseudo``
``instances``  long (H,W), 0 = bg       long (B,H,W), 0 where unknown         + ``has_instances``
``tags``       float (K,) multi-hot     float (B,K), column 0 = background    + ``has_tags``
``boxes``      float (N,5)              list of B float (N_i,5)               + ``has_boxes``
``points``     float (M,3)              list of B float (M_i,3)               + ``has_points``
``index``      int                      long (B,)
``id``         str                      list[str]
============== ======================== ==========================================================

* Dense label maps use ``IGNORE_INDEX`` (255) for unknown pixels; their values are class ids in
  ``[0, num_classes)``. Full, noisy, scribble and pseudo masks are all masks, told apart by key.
* ``boxes`` rows are ``[class, x0, y0, x1, y1]`` in pixel-edge coordinates (albumentations ``pascal_voc``):
  an integer box covers columns ``x0..x1-1`` and rows ``y0..y1-1``; ``0 <= x0 < x1 <= W``.
* ``points`` rows are ``[class, y, x]`` pixel indices, ``0 <= y < H``, ``0 <= x < W``.
* ``tags`` has one column per class including background (column 0).
* ``has_<key>`` tells which samples of a mixed batch carry that label; a key that no sample carries is
  absent from the batch. ``dropped_boxes`` / ``dropped_points`` (long (B,)) count labels that an
  augmentation pushed out of the image (they are removed and counted, never clipped silently).
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
import torch

from ..errors import WeakSegDataError

IGNORE_INDEX = 255
MASK_KEYS = ("mask", "noisy_mask", "scribble", "pseudo")
DENSE_KEYS = MASK_KEYS + ("instances",)
LIST_KEYS = ("boxes", "points")
LABEL_KEYS = MASK_KEYS + ("instances", "tags", "boxes", "points")
COUNT_KEYS = ("dropped_boxes", "dropped_points")


def _as_tensor(x) -> torch.Tensor:
    return x if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))


def validate_sample(
    sample: Mapping[str, Any],
    num_classes: int,
    in_channels: int | None = None,
    name: Any = None,
    require_label: bool = True,
) -> None:
    """Check one sample against the contract; raise :class:`WeakSegDataError` naming sample and field.

    ``image`` is checked as (C,H,W). Nothing is modified: a bad value is an error, never clipped.
    """
    name = name if name is not None else sample.get("id", sample.get("index"))
    if "image" not in sample:
        raise WeakSegDataError("the sample has no image", name, "image")
    image = _as_tensor(sample["image"])
    if image.ndim != 3:
        raise WeakSegDataError(f"expected an image of shape (C,H,W), got shape {tuple(image.shape)}", name, "image")
    if not (image.is_floating_point() or image.dtype == torch.uint8):
        raise WeakSegDataError(f"expected a float or uint8 image, got dtype {image.dtype}", name, "image")
    if image.is_floating_point() and not torch.isfinite(image).all():
        n_bad = int((~torch.isfinite(image)).sum())
        raise WeakSegDataError(f"{n_bad} pixel values are NaN or infinite", name, "image")
    c, h, w = image.shape
    if in_channels is not None and c != in_channels:
        raise WeakSegDataError(f"expected {in_channels} channel(s), got {c}", name, "image")
    if h == 0 or w == 0:
        raise WeakSegDataError("the image is empty", name, "image")

    for key in DENSE_KEYS:
        if key not in sample or sample[key] is None:
            continue
        m = _as_tensor(sample[key])
        if m.ndim != 2:
            raise WeakSegDataError(f"expected shape (H,W), got {tuple(m.shape)}", name, key)
        if tuple(m.shape) != (h, w):
            raise WeakSegDataError(f"size {tuple(m.shape)} differs from the image's {(h, w)}", name, key)
        if m.is_floating_point():
            if not torch.isfinite(m).all() or (m != m.round()).any():
                raise WeakSegDataError("expected integer labels, got non-integer values", name, key)
        if key == "instances":
            if (m < 0).any():
                raise WeakSegDataError("instance ids must be >= 0", name, key)
            continue
        bad = ((m < 0) | (m >= num_classes)) & (m != IGNORE_INDEX)
        if bad.any():
            vals = torch.unique(m[bad])[:5].tolist()
            raise WeakSegDataError(
                f"values {vals} are neither a class id in [0, {num_classes}) nor the ignore index {IGNORE_INDEX}",
                name, key)

    if sample.get("tags") is not None:
        t = _as_tensor(sample["tags"]).float()
        if t.shape != (num_classes,):
            raise WeakSegDataError(f"expected shape ({num_classes},), got {tuple(t.shape)}", name, "tags")
        if not torch.isfinite(t).all() or ((t != 0) & (t != 1)).any():
            raise WeakSegDataError("expected a multi-hot vector of 0/1", name, "tags")

    if sample.get("boxes") is not None:
        b = _as_tensor(sample["boxes"]).double()
        if b.ndim != 2 or b.shape[1] != 5:
            raise WeakSegDataError(f"expected shape (N,5) [class,x0,y0,x1,y1], got {tuple(b.shape)}", name, "boxes")
        if not torch.isfinite(b).all():
            raise WeakSegDataError("NaN or infinite coordinates", name, "boxes")
        cls = b[:, 0]
        if ((cls < 0) | (cls >= num_classes) | (cls != cls.round())).any():
            raise WeakSegDataError(f"class ids must be integers in [0, {num_classes}), got {cls.tolist()}", name, "boxes")
        x0, y0, x1, y1 = b[:, 1], b[:, 2], b[:, 3], b[:, 4]
        if ((x1 <= x0) | (y1 <= y0)).any():
            i = int(torch.nonzero((x1 <= x0) | (y1 <= y0))[0])
            raise WeakSegDataError(f"box {i} {b[i, 1:].tolist()} is degenerate (needs x1 > x0 and y1 > y0)", name, "boxes")
        outside = (x0 < 0) | (y0 < 0) | (x1 > w) | (y1 > h)
        if outside.any():
            i = int(torch.nonzero(outside)[0])
            raise WeakSegDataError(
                f"box {i} {b[i, 1:].tolist()} lies outside the {w}x{h} image (pixel-edge xyxy)", name, "boxes")

    if sample.get("points") is not None:
        p = _as_tensor(sample["points"]).double()
        if p.ndim != 2 or p.shape[1] != 3:
            raise WeakSegDataError(f"expected shape (M,3) [class,y,x], got {tuple(p.shape)}", name, "points")
        if not torch.isfinite(p).all():
            raise WeakSegDataError("NaN or infinite coordinates", name, "points")
        cls = p[:, 0]
        if ((cls < 0) | (cls >= num_classes) | (cls != cls.round())).any():
            raise WeakSegDataError(f"class ids must be integers in [0, {num_classes})", name, "points")
        outside = (p[:, 1] < 0) | (p[:, 1] > h - 1) | (p[:, 2] < 0) | (p[:, 2] > w - 1)
        if outside.any():
            i = int(torch.nonzero(outside)[0])
            raise WeakSegDataError(
                f"point {i} (y={p[i, 1].item()}, x={p[i, 2].item()}) lies outside the {w}x{h} image", name, "points")

    if require_label and not any(sample.get(k) is not None for k in LABEL_KEYS):
        raise WeakSegDataError(
            f"the sample carries no label of any kind (expected one of {', '.join(LABEL_KEYS)})", name, "labels")


def collate(samples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Stack samples into a batch; variable-length boxes/points stay lists; ``has_*`` flags per sample."""
    if len(samples) == 0:
        raise ValueError("collate got an empty list of samples")
    sizes = {tuple(s["image"].shape) for s in samples}
    if len(sizes) > 1:
        names = [s.get("id", s.get("index")) for s in samples]
        raise WeakSegDataError(
            f"images of one batch must share a shape, got {sorted(sizes)} (samples {names}); resize in the dataset",
            None, "image")
    images = torch.stack([_as_tensor(s["image"]).float() for s in samples])
    if not torch.isfinite(images).all():
        raise WeakSegDataError("NaN or infinite pixel values in the batch", None, "image")
    B, _, H, W = images.shape
    batch: dict[str, Any] = {"image": images}
    for key in DENSE_KEYS:
        present = [s.get(key) is not None for s in samples]
        if not any(present):
            continue
        fill = 0 if key == "instances" else IGNORE_INDEX
        out = torch.full((B, H, W), fill, dtype=torch.long)
        for i, s in enumerate(samples):
            if present[i]:
                out[i] = _as_tensor(s[key]).long()
        batch[key] = out
        batch[f"has_{key}"] = torch.tensor(present)
    tag_present = [s.get("tags") is not None for s in samples]
    if any(tag_present):
        k = next(_as_tensor(s["tags"]).numel() for s in samples if s.get("tags") is not None)
        tags = torch.zeros(B, k)
        for i, s in enumerate(samples):
            if tag_present[i]:
                tags[i] = _as_tensor(s["tags"]).float()
        batch["tags"] = tags
        batch["has_tags"] = torch.tensor(tag_present)
    for key, width in (("boxes", 5), ("points", 3)):
        present = [s.get(key) is not None for s in samples]
        if not any(present):
            continue
        batch[key] = [
            _as_tensor(s[key]).float().reshape(-1, width) if present[i] else torch.zeros(0, width)
            for i, s in enumerate(samples)
        ]
        batch[f"has_{key}"] = torch.tensor(present)
    for key in COUNT_KEYS:
        if any(key in s for s in samples):
            batch[key] = torch.tensor([int(s.get(key, 0)) for s in samples])
    batch["index"] = torch.tensor([int(s.get("index", i)) for i, s in enumerate(samples)])
    batch["id"] = [str(s.get("id", s.get("index", i))) for i, s in enumerate(samples)]
    return batch


def validate_batch(batch: Mapping[str, Any], num_classes: int) -> None:
    """Cheap structural check of a collated batch (shapes, flags, value ranges) at the module boundary."""
    if "image" not in batch:
        raise WeakSegDataError("the batch has no 'image'", None, "image")
    x = batch["image"]
    if not isinstance(x, torch.Tensor) or x.ndim not in (4, 5) or not x.is_floating_point():
        raise WeakSegDataError(
            f"expected a float tensor (B,C,H,W), got {type(x).__name__} "
            f"{tuple(getattr(x, 'shape', ()))} {getattr(x, 'dtype', '')}", None, "image")
    B = x.shape[0]
    spatial = tuple(x.shape[2:])
    for key in DENSE_KEYS:
        if key in batch:
            m = batch[key]
            if tuple(m.shape) != (B, *spatial):
                raise WeakSegDataError(f"expected shape {(B, *spatial)}, got {tuple(m.shape)}", None, key)
            if key != "instances":
                bad = ((m < 0) | (m >= num_classes)) & (m != IGNORE_INDEX)
                if bad.any():
                    ids = batch.get("id")
                    i = int(torch.nonzero(bad.flatten(1).any(1))[0])
                    raise WeakSegDataError(
                        f"values {torch.unique(m[bad])[:5].tolist()} are not class ids in [0, {num_classes}) or "
                        f"{IGNORE_INDEX}", ids[i] if ids else i, key)
    for key in LABEL_KEYS:
        if key in batch:
            flag = batch.get(f"has_{key}")
            if flag is None or tuple(flag.shape) != (B,) or flag.dtype != torch.bool:
                raise WeakSegDataError(f"'{key}' needs a bool flag 'has_{key}' of shape ({B},)", None, f"has_{key}")
    for key in LIST_KEYS:
        if key in batch and len(batch[key]) != B:
            raise WeakSegDataError(f"expected a list of {B} tensors, got {len(batch[key])}", None, key)
