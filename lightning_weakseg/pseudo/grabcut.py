"""Offline pseudo-masks from boxes: filled boxes (box-as-mask) and GrabCut (Rother et al. 2004, OpenCV).

Both are the classic baselines of box supervision: the maps are trained on as ordinary masks
(``dataset.set_pseudo_labels`` + ``mask_key="pseudo"``). Coordinates follow the library's rounding
(``x0, y0 = floor``, ``x1, y1 = ceil``, clamped to the image), as :mod:`lightning_weakseg.losses.boxes`.
"""
from __future__ import annotations

import math
from typing import Iterable

import cv2
import numpy as np

__all__ = ["box_masks", "grabcut_mask", "grabcut_masks", "pseudo_labels_from_boxes"]


def _rows(boxes, H: int, W: int) -> list[tuple[int, int, int, int, int]]:
    """(class, x0, y0, x1, y1) integer rows, rounded outward and clamped; largest area first."""
    b = np.asarray(boxes, dtype=np.float64)
    if b.size == 0:
        return []
    b = b.reshape(1, -1) if b.ndim == 1 else b
    if b.ndim != 2 or b.shape[1] not in (4, 5):
        raise ValueError(f"expected boxes (N,4) [x0,y0,x1,y1] or (N,5) [class,x0,y0,x1,y1], got {b.shape}")
    if not np.isfinite(b).all():
        raise ValueError("boxes contain NaN or infinite coordinates")
    out = []
    for r in b:
        c = int(r[0]) if b.shape[1] == 5 else 1
        x0, y0, x1, y1 = r[-4:]
        x0, y0 = min(max(math.floor(x0), 0), W), min(max(math.floor(y0), 0), H)
        x1, y1 = min(max(math.ceil(x1), 0), W), min(max(math.ceil(y1), 0), H)
        if x1 > x0 and y1 > y0:
            out.append((c, x0, y0, x1, y1))
    return sorted(out, key=lambda r: -(r[3] - r[1]) * (r[4] - r[2]))


def box_masks(boxes, shape: tuple[int, int]) -> np.ndarray:
    """Box-as-mask: uint8 (H,W), 0 background, each box filled with its class (smaller boxes drawn last).

    Example:
        >>> box_masks(np.array([[1, 0, 0, 2, 1]]), (2, 3))
        array([[1, 1, 0],
               [0, 0, 0]], dtype=uint8)
    """
    H, W = shape
    out = np.zeros((H, W), np.uint8)
    for c, x0, y0, x1, y1 in _rows(boxes, H, W):
        out[y0:y1, x0:x1] = c
    return out


def _as_uint8_rgb(image: np.ndarray) -> np.ndarray:
    img = np.asarray(image)
    if img.ndim == 3 and img.shape[0] in (1, 3) and img.shape[-1] not in (1, 3):
        img = np.moveaxis(img, 0, -1)                                   # (C,H,W) -> (H,W,C)
    if img.ndim == 2:
        img = img[..., None]
    if img.ndim != 3 or img.shape[-1] not in (1, 3):
        raise ValueError(f"expected an image (H,W), (H,W,1|3) or (1|3,H,W), got shape {np.shape(image)}")
    if img.dtype != np.uint8:
        img = np.clip(np.round(img.astype(np.float64) * 255.0), 0, 255).astype(np.uint8)
    if img.shape[-1] == 1:
        img = np.repeat(img, 3, axis=-1)
    return np.ascontiguousarray(img)


def grabcut_mask(image: np.ndarray, boxes, iterations: int = 5, seed: int = 0) -> tuple[np.ndarray, int]:
    """GrabCut inside each box; returns (label map uint8 (H,W), number of boxes that fell back to filled).

    For each box (largest first, so that smaller boxes win where boxes overlap): pixels outside the box are
    sure background, inside probable foreground; ``cv2.grabCut`` (mask initialisation) refines. A box whose
    GrabCut fails (no background sample, e.g. a box covering the image) or returns no foreground falls back
    to the filled box. Pixels outside every box are background (0).
    """
    img = _as_uint8_rgb(image)
    H, W = img.shape[:2]
    out = np.zeros((H, W), np.uint8)
    fallbacks = 0
    for c, x0, y0, x1, y1 in _rows(boxes, H, W):
        gc = np.full((H, W), cv2.GC_BGD, np.uint8)
        gc[y0:y1, x0:x1] = cv2.GC_PR_FGD
        fg = None
        if (gc == cv2.GC_BGD).sum() >= 16:
            cv2.setRNGSeed(seed)
            bgd, fgd = np.zeros((1, 65), np.float64), np.zeros((1, 65), np.float64)
            try:
                cv2.grabCut(img, gc, None, bgd, fgd, iterations, cv2.GC_INIT_WITH_MASK)
                fg = (gc == cv2.GC_FGD) | (gc == cv2.GC_PR_FGD)
                fg[:y0], fg[y1:], fg[:, :x0], fg[:, x1:] = False, False, False, False
                if not fg.any():
                    fg = None
            except cv2.error:
                fg = None
        if fg is None:
            fallbacks += 1
            out[y0:y1, x0:x1] = c
        else:
            region = out[y0:y1, x0:x1]
            region[fg[y0:y1, x0:x1]] = c
            region[~fg[y0:y1, x0:x1] & (region == c)] = 0
    return out, fallbacks


def grabcut_masks(images: Iterable[np.ndarray], boxes: Iterable, iterations: int = 5,
                  seed: int = 0) -> list[np.ndarray]:
    """:func:`grabcut_mask` over paired sequences of images and their boxes; a list of uint8 (H,W) maps."""
    return [grabcut_mask(img, b, iterations, seed)[0] for img, b in zip(images, boxes)]


def pseudo_labels_from_boxes(loader, method: str = "grabcut", iterations: int = 5) -> dict[int, np.ndarray]:
    """Pseudo-masks for every sample of a loader of collated batches with ``boxes`` (e.g.
    ``dm.train_eval_dataloader()``), keyed by ``batch["index"]`` for ``set_pseudo_labels``.

    ``method``: ``"grabcut"`` or ``"box"`` (box-as-mask). Samples without boxes are skipped.
    """
    if method not in ("grabcut", "box"):
        raise ValueError(f"method: expected 'grabcut' or 'box', got {method!r}")
    labels: dict[int, np.ndarray] = {}
    for batch in loader:
        if "boxes" not in batch:
            continue
        imgs = batch["image"].permute(0, 2, 3, 1).cpu().numpy()
        for i, (img, bx) in enumerate(zip(imgs, batch["boxes"])):
            if not bool(batch["has_boxes"][i]):
                continue
            bx = bx.cpu().numpy()
            H, W = img.shape[:2]
            m = box_masks(bx, (H, W)) if method == "box" else grabcut_mask(img, bx, iterations)[0]
            labels[int(batch["index"][i])] = m
    return labels
