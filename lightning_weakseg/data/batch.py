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
``orig_size``  long (2,) ``[H0, W0]``   long (B,2)     the source file's size
``content``    long (4,)                long (B,4)     ``[top, left, h, w]`` of the base view that holds
                                                       the resized image (the rest is padding)
``native_mask`` long (H0,W0)            list of B long (H0_i,W0_i)            + ``has_native_mask``
``native_image`` float (C,H0,W0)        list of B float (C,H0_i,W0_i)  prediction only (data/predict.py)
``valid``      bool (H,W)               bool (B,H,W)   pixels that hold the image (absent: all)
``volume``     str                      list[str]      slices of volumes (data/volumes.py): the volume's name
``slice``      int                      long (B,)      the slice's index in its volume
``spacing``    float (3,)               float (B,3)    voxel size (mm; 1 = none) in the order (slice axis, H, W)
============== ======================== ==========================================================

* Only ``image`` is required. A batch built by another collate (e.g. PyTorch's default) may omit the
  ``has_*`` flags: :func:`complete_flags` then marks every sample as carrying each label key present
  (the module calls it on every batch, in one place).
* Padding (``resize="longest"`` or ``"pad"``): pixels of the base view outside ``content`` are image
  zeros, and 255 (unknown) in every label map; :func:`content_mask` gives them as a bool map so that
  losses and metrics leave them out.

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

__all__ = ["IGNORE_INDEX", "MASK_KEYS", "DENSE_KEYS", "LIST_KEYS", "LABEL_KEYS", "COUNT_KEYS", "GEOMETRY_KEYS",
           "VOLUME_KEYS", "validate_sample", "collate", "validate_batch", "complete_flags", "content_mask"]

IGNORE_INDEX = 255
MASK_KEYS = ("mask", "noisy_mask", "scribble", "pseudo")
DENSE_KEYS = MASK_KEYS + ("instances",)
LIST_KEYS = ("boxes", "points")
LABEL_KEYS = MASK_KEYS + ("instances", "tags", "boxes", "points")
COUNT_KEYS = ("dropped_boxes", "dropped_points")
GEOMETRY_KEYS = ("orig_size", "content")
VOLUME_KEYS = ("volume", "slice", "spacing")


_WIDE_UNSIGNED = (torch.uint16, torch.uint32, torch.uint64)  # torch has no comparisons for these on CPU


def _as_tensor(x, name=None, field: str | None = None) -> torch.Tensor:
    """A tensor view of ``x``; anything that is not a numeric array (strings, ragged lists, objects) is a
    :class:`WeakSegDataError` naming ``name`` and ``field``."""
    if isinstance(x, torch.Tensor):
        t = x
    else:
        try:
            t = torch.as_tensor(np.asarray(x))
        except (TypeError, ValueError, RuntimeError) as e:
            raise WeakSegDataError(f"expected a numeric array, got {type(x).__name__} ({e})", name, field) from None
    if t.is_complex():
        raise WeakSegDataError(f"expected real numbers, got dtype {t.dtype}", name, field)
    return t.to(torch.int64) if t.dtype in _WIDE_UNSIGNED else t


def _check_dense(m: torch.Tensor, key: str, h: int, w: int, num_classes: int, name) -> None:
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
        return
    bad = ((m < 0) | (m >= num_classes)) & (m != IGNORE_INDEX)
    if bad.any():
        vals = torch.unique(m[bad])[:5].tolist()
        raise WeakSegDataError(
            f"values {vals} are neither a class id in [0, {num_classes}) nor the ignore index {IGNORE_INDEX}",
            name, key)


def _check_tags(t: torch.Tensor, num_classes: int, name) -> None:
    if t.shape != (num_classes,):
        raise WeakSegDataError(f"expected shape ({num_classes},), got {tuple(t.shape)}", name, "tags")
    t = t.double()
    if not torch.isfinite(t).all() or ((t != 0) & (t != 1)).any():
        raise WeakSegDataError("expected a multi-hot vector of 0/1", name, "tags")


def _check_rows(t: torch.Tensor, layout: str, num_classes: int, name, field: str) -> torch.Tensor | None:
    """Shared checks of box / point tables: shape (N, len(layout)), finite, integer class ids in [0, K).
    Returns the table in float64, or None for an empty table (no objects / no clicks)."""
    if t.numel() == 0:
        return None
    t = t.double()
    width = len(layout.split(","))
    if t.ndim != 2 or t.shape[1] != width:
        raise WeakSegDataError(f"expected shape (N,{width}) [{layout}], got {tuple(t.shape)}", name, field)
    if not torch.isfinite(t).all():
        raise WeakSegDataError("NaN or infinite coordinates", name, field)
    cls = t[:, 0]
    if ((cls < 0) | (cls >= num_classes) | (cls != cls.round())).any():
        raise WeakSegDataError(f"class ids must be integers in [0, {num_classes}), got {cls.tolist()}", name, field)
    return t


def _check_boxes(b: torch.Tensor, h: int, w: int, num_classes: int, name) -> None:
    b = _check_rows(b, "class,x0,y0,x1,y1", num_classes, name, "boxes")
    if b is None:
        return  # an empty list of boxes: the image holds no object
    x0, y0, x1, y1 = b[:, 1], b[:, 2], b[:, 3], b[:, 4]
    if ((x1 <= x0) | (y1 <= y0)).any():
        i = int(torch.nonzero((x1 <= x0) | (y1 <= y0))[0])
        raise WeakSegDataError(f"box {i} {b[i, 1:].tolist()} is degenerate (needs x1 > x0 and y1 > y0)", name, "boxes")
    outside = (x0 < 0) | (y0 < 0) | (x1 > w) | (y1 > h)
    if outside.any():
        i = int(torch.nonzero(outside)[0])
        raise WeakSegDataError(
            f"box {i} {b[i, 1:].tolist()} lies outside the {w}x{h} image (pixel-edge xyxy)", name, "boxes")


def _check_points(p: torch.Tensor, h: int, w: int, num_classes: int, name) -> None:
    p = _check_rows(p, "class,y,x", num_classes, name, "points")
    if p is None:
        return  # no clicks on this image
    outside = (p[:, 1] < 0) | (p[:, 1] > h - 1) | (p[:, 2] < 0) | (p[:, 2] > w - 1)
    if outside.any():
        i = int(torch.nonzero(outside)[0])
        raise WeakSegDataError(
            f"point {i} (y={p[i, 1].item()}, x={p[i, 2].item()}) lies outside the {w}x{h} image", name, "points")


def _check_finite_image(image: torch.Tensor, name) -> None:
    # float32 is what the model sees: a float64 value beyond its range would become inf there
    if image.is_floating_point() and not torch.isfinite(image.float()).all():
        n_bad = int((~torch.isfinite(image.float())).sum())
        raise WeakSegDataError(f"{n_bad} pixel values are NaN, infinite or beyond float32's range", name, "image")


def validate_sample(
    sample: Mapping[str, Any],
    num_classes: int,
    in_channels: int | None = None,
    name: Any = None,
    require_label: bool = True,
) -> None:
    """Check one sample against the contract; raise :class:`WeakSegDataError` naming sample and field.

    ``image`` is checked as (C,H,W). Nothing is modified: a bad value is an error, never clipped.
    An empty ``boxes``/``points`` array (any shape with 0 elements) means "none on this image".
    """
    name = name if name is not None else sample.get("id", sample.get("index"))
    if "image" not in sample or sample["image"] is None:
        raise WeakSegDataError("the sample has no image", name, "image")
    image = _as_tensor(sample["image"], name, "image")
    if image.ndim != 3:
        raise WeakSegDataError(f"expected an image of shape (C,H,W), got shape {tuple(image.shape)}", name, "image")
    if not (image.is_floating_point() or image.dtype == torch.uint8):
        raise WeakSegDataError(f"expected a float or uint8 image, got dtype {image.dtype}", name, "image")
    c, h, w = image.shape
    if c == 0 or h == 0 or w == 0:
        raise WeakSegDataError(f"the image is empty (shape {tuple(image.shape)})", name, "image")
    _check_finite_image(image, name)
    if in_channels is not None and c != in_channels:
        raise WeakSegDataError(f"expected {in_channels} channel(s), got {c}", name, "image")

    for key in DENSE_KEYS:
        if sample.get(key) is not None:
            _check_dense(_as_tensor(sample[key], name, key), key, h, w, num_classes, name)
    if sample.get("tags") is not None:
        _check_tags(_as_tensor(sample["tags"], name, "tags"), num_classes, name)
    if sample.get("boxes") is not None:
        _check_boxes(_as_tensor(sample["boxes"], name, "boxes"), h, w, num_classes, name)
    if sample.get("points") is not None:
        _check_points(_as_tensor(sample["points"], name, "points"), h, w, num_classes, name)

    if require_label and not any(sample.get(k) is not None for k in LABEL_KEYS):
        raise WeakSegDataError(
            f"the sample carries no label of any kind (expected one of {', '.join(LABEL_KEYS)})", name, "labels")


def _sample_name(s: Mapping[str, Any], i: int):
    return s.get("id", s.get("index", i))


def collate(samples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Stack samples into a batch; variable-length boxes/points stay lists; ``has_*`` flags per sample.

    Shapes are checked here (a :class:`WeakSegDataError` names the sample and field); values are the business of
    :func:`validate_sample` / :func:`validate_batch`."""
    if len(samples) == 0:
        raise ValueError("collate got an empty list of samples")
    names = [_sample_name(s, i) for i, s in enumerate(samples)]
    imgs = []
    for s, n in zip(samples, names):
        if s.get("image") is None:
            raise WeakSegDataError("the sample has no image", n, "image")
        im = _as_tensor(s["image"], n, "image")
        if im.ndim != 3 or not (im.is_floating_point() or im.dtype == torch.uint8):
            raise WeakSegDataError(f"expected a float or uint8 image (C,H,W), got {im.dtype} {tuple(im.shape)}",
                                   n, "image")
        imgs.append(im)
    sizes = {tuple(im.shape) for im in imgs}
    if len(sizes) > 1:
        raise WeakSegDataError(
            f"images of one batch must share a shape, got {sorted(sizes)} (samples {names}); resize in the dataset",
            names, "image")
    images = torch.stack([im.float() for im in imgs])
    finite = torch.isfinite(images).flatten(1).all(1)
    if not finite.all():
        bad = [names[i] for i in torch.nonzero(~finite).flatten().tolist()]
        raise WeakSegDataError("NaN, infinite or beyond float32's range pixel values", bad[0] if len(bad) == 1 else
                               bad, "image")
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
                m = _as_tensor(s[key], names[i], key)
                if tuple(m.shape) != (H, W):
                    raise WeakSegDataError(f"expected shape {(H, W)} like the image, got {tuple(m.shape)}",
                                           names[i], key)
                if m.is_floating_point() and (~torch.isfinite(m) | (m != m.round())).any():
                    raise WeakSegDataError("expected integer labels, got non-integer values", names[i], key)
                out[i] = m.long()
        batch[key] = out
        batch[f"has_{key}"] = torch.tensor(present)
    tag_present = [s.get("tags") is not None for s in samples]
    if any(tag_present):
        tag_list = [_as_tensor(s["tags"], names[i], "tags").float().flatten() if tag_present[i] else None
                    for i, s in enumerate(samples)]
        lengths = [t.numel() for t in tag_list if t is not None]
        k = max(set(lengths), key=lengths.count)  # the common length: blame the odd ones out
        odd = [names[i] for i, t in enumerate(tag_list) if t is not None and t.numel() != k]
        if odd:
            raise WeakSegDataError(f"tag vectors of different lengths in one batch (most have {k})",
                                   odd[0] if len(odd) == 1 else odd, "tags")
        tags = torch.zeros(B, k)
        for i, t in enumerate(tag_list):
            if t is not None:
                tags[i] = t
        batch["tags"] = tags
        batch["has_tags"] = torch.tensor(tag_present)
    for key, width in (("boxes", 5), ("points", 3)):
        present = [s.get(key) is not None for s in samples]
        if not any(present):
            continue
        rows = []
        for i, s in enumerate(samples):
            t = _as_tensor(s[key], names[i], key).float() if present[i] else torch.zeros(0, width)
            if t.numel() == 0:
                t = torch.zeros(0, width)
            elif t.ndim != 2 or t.shape[1] != width:  # never reshape: (5,2) is not (2,5)
                raise WeakSegDataError(f"expected shape (N,{width}), got {tuple(t.shape)}", names[i], key)
            rows.append(t)
        batch[key] = rows
        batch[f"has_{key}"] = torch.tensor(present)
    if any(s.get("native_mask") is not None for s in samples):
        present = [s.get("native_mask") is not None for s in samples]
        batch["native_mask"] = [_as_tensor(s["native_mask"], names[i], "native_mask").long() if present[i]
                                else torch.zeros(0, 0, dtype=torch.long) for i, s in enumerate(samples)]
        batch["has_native_mask"] = torch.tensor(present)
    if any(s.get("valid") is not None for s in samples):
        batch["valid"] = torch.stack([_as_tensor(s["valid"], names[i], "valid").bool()
                                      if s.get("valid") is not None else torch.ones(H, W, dtype=torch.bool)
                                      for i, s in enumerate(samples)])
    for key, width in (("orig_size", 2), ("content", 4)):
        if any(key in s for s in samples):
            if not all(key in s for s in samples):
                raise WeakSegDataError(f"some samples of the batch carry '{key}' and some do not", names, key)
            batch[key] = torch.stack([_as_tensor(s[key], names[i], key).long().reshape(width)
                                      for i, s in enumerate(samples)])
    if any(s.get("pad") for s in samples):  # evaluation filler under DDP (data/sampling.py): not scored
        batch["pad"] = torch.tensor([bool(s.get("pad", False)) for s in samples])
    if any(key in s for s in samples for key in VOLUME_KEYS):  # slices of volumes: assembled for per-volume scores
        for key in VOLUME_KEYS:
            if not all(key in s for s in samples):
                raise WeakSegDataError(f"some samples of the batch carry '{key}' and some do not", names, key)
        batch["volume"] = [str(s["volume"]) for s in samples]
        batch["slice"] = torch.tensor([int(s["slice"]) for s in samples])
        batch["spacing"] = torch.stack([_as_tensor(s["spacing"], names[i], "spacing").float().reshape(3)
                                        for i, s in enumerate(samples)])
    for key in COUNT_KEYS:
        if any(key in s for s in samples):
            batch[key] = torch.tensor([int(s.get(key, 0)) for s in samples])
    try:
        batch["index"] = torch.tensor([int(s.get("index", i)) for i, s in enumerate(samples)])
    except (TypeError, ValueError) as e:
        raise WeakSegDataError(f"expected integer sample indices ({e})", names, "index") from None
    batch["id"] = [str(n) for n in names]
    return batch


def validate_batch(batch: Mapping[str, Any], num_classes: int) -> None:
    """Check a collated batch at the module boundary: shapes, dtypes, flags, value ranges, box and point
    geometry, finite pixels. Errors name the sample (its ``id``) and the field: a batch that passes cannot
    fail deep inside a loss with an IndexError or feed it NaN."""
    if "image" not in batch:
        raise WeakSegDataError("the batch has no 'image'", None, "image")
    x = batch["image"]
    if not isinstance(x, torch.Tensor) or x.ndim not in (4, 5) or not x.is_floating_point():
        raise WeakSegDataError(
            f"expected a float tensor (B,C,H,W), got {type(x).__name__} "
            f"{tuple(getattr(x, 'shape', ()))} {getattr(x, 'dtype', '')}", None, "image")
    B = x.shape[0]
    spatial = tuple(x.shape[2:])
    ids = batch.get("id")
    ids = list(ids) if isinstance(ids, (list, tuple)) and len(ids) == B else list(range(B))
    finite = torch.isfinite(x).flatten(1).all(1)
    if not finite.all():
        raise WeakSegDataError("NaN or infinite pixel values", ids[int(torch.nonzero(~finite)[0])], "image")
    for key in LABEL_KEYS:
        if key in batch:
            flag = batch.get(f"has_{key}")
            if not isinstance(flag, torch.Tensor) or tuple(flag.shape) != (B,) or flag.dtype != torch.bool:
                raise WeakSegDataError(f"'{key}' needs a bool flag 'has_{key}' of shape ({B},)", None, f"has_{key}")
    for key in DENSE_KEYS:
        if key in batch:
            m = batch[key]
            if not isinstance(m, torch.Tensor) or tuple(m.shape) != (B, *spatial):
                raise WeakSegDataError(f"expected a tensor of shape {(B, *spatial)}, got "
                                       f"{tuple(getattr(m, 'shape', ())) or type(m).__name__}", None, key)
            if m.is_floating_point() or m.is_complex() or m.dtype == torch.bool:
                raise WeakSegDataError(f"expected an integer (long) label map, got dtype {m.dtype}", None, key)
            m = m.long()
            bad = ((m < 0) | (m >= num_classes)) & (m != IGNORE_INDEX) if key != "instances" else m < 0
            if bad.any():
                i = int(torch.nonzero(bad.flatten(1).any(1))[0])
                raise WeakSegDataError(
                    f"values {torch.unique(m[bad])[:5].tolist()} are not class ids in [0, {num_classes}) or "
                    f"{IGNORE_INDEX}" if key != "instances" else "instance ids must be >= 0", ids[i], key)
    if "tags" in batch:
        t = batch["tags"]
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != (B, num_classes) or not t.is_floating_point():
            raise WeakSegDataError(f"expected a float tensor of shape ({B}, {num_classes}), got "
                                   f"{tuple(getattr(t, 'shape', ())) or type(t).__name__} "
                                   f"{getattr(t, 'dtype', '')}", None, "tags")
        td = t.double()
        bad = (~torch.isfinite(td) | ((td != 0) & (td != 1))).any(1)
        if bad.any():
            raise WeakSegDataError("expected a multi-hot vector of 0/1", ids[int(torch.nonzero(bad)[0])], "tags")
    for key, check, width in (("boxes", _check_boxes, 5), ("points", _check_points, 3)):
        if key in batch:
            rows = batch[key]
            if not isinstance(rows, (list, tuple)) or len(rows) != B:
                raise WeakSegDataError(f"expected a list of {B} tensors, got {type(rows).__name__} of length "
                                       f"{len(rows) if hasattr(rows, '__len__') else '?'}", None, key)
            for i, r in enumerate(rows):
                if not isinstance(r, torch.Tensor) or r.ndim != 2 or r.shape[1] != width or not r.is_floating_point():
                    raise WeakSegDataError(f"expected a float tensor (N,{width}), got {type(r).__name__} "
                                           f"{tuple(getattr(r, 'shape', ()))} {getattr(r, 'dtype', '')}", ids[i], key)
                check(r, spatial[-2], spatial[-1], num_classes, ids[i])


def complete_flags(batch: dict) -> dict:
    """Fill in what a batch from any collate may lack, in place, and return it.

    A label key present without its ``has_<key>`` flag means "every sample of the batch carries it" (a plain
    user ``Dataset`` with PyTorch's default collate); integer label maps become ``long``; ``boxes`` / ``points``
    stacked into one (B,N,w) tensor (equal counts under the default collate) become the contract's list.
    Nothing is relabelled: values are checked afterwards by :func:`validate_batch`."""
    x = batch.get("image")
    if not isinstance(x, torch.Tensor) or x.ndim < 1:
        return batch
    B = x.shape[0]
    for key, width in (("boxes", 5), ("points", 3)):
        v = batch.get(key)
        if isinstance(v, torch.Tensor):
            if v.ndim != 3 or v.shape[0] != B or v.shape[2] != width:
                raise WeakSegDataError(f"expected a list of B tensors (N_i,{width}), got one tensor of shape "
                                       f"{tuple(v.shape)}", None, key)
            batch[key] = [r.float() for r in v.unbind(0)]
    for key in LABEL_KEYS + ("native_mask",):
        if key in batch and batch[key] is not None and f"has_{key}" not in batch:
            batch[f"has_{key}"] = torch.ones(B, dtype=torch.bool, device=x.device)
    for key in DENSE_KEYS:
        m = batch.get(key)
        if isinstance(m, torch.Tensor) and m.dtype in (torch.uint8, torch.int8, torch.int16, torch.int32):
            batch[key] = m.long()
    if isinstance(batch.get("tags"), torch.Tensor) and not batch["tags"].is_floating_point():
        batch["tags"] = batch["tags"].float()
    return batch


def content_mask(batch: Mapping[str, Any]) -> torch.Tensor | None:
    """bool (B,H,W): True on the pixels of the base view that hold the image, False on padding; ``None`` when no
    pixel of the batch is padding (losses then take their plain, unmasked path)."""
    if batch.get("valid") is not None:
        m = batch["valid"].bool()
    else:
        content = batch.get("content")
        if content is None:
            return None
        x = batch["image"]
        H, W = x.shape[-2:]
        c = content.to(x.device)
        ys = torch.arange(H, device=x.device)[None, :, None]
        xs = torch.arange(W, device=x.device)[None, None, :]
        top, left, h, w = (c[:, i, None, None] for i in range(4))
        m = (ys >= top) & (ys < top + h) & (xs >= left) & (xs < left + w)
    return None if bool(m.all()) else m
