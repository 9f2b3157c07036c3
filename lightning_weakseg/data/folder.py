"""Folder data sets: images plus any of masks, instance maps, scribbles and a boxes JSON, matched by file stem.

The layout is given by arguments, never by a data-set name::

    root/images/<id>.png|jpg|...        root/masks/<id>.png        (class ids, 255 = unknown)
    root/instances/<id>.png (uint16)    root/scribbles/<id>.png    (class ids, 255 = unlabelled)
    root/boxes.json: {"<id>": [[x0, y0, x1, y1], ...]} or [[class, x0, y0, x1, y1], ...]

This reads ACDC, DSB2018 and Kvasir in ``../shared/data`` as well as a user's folders of the same shape.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np

from ..errors import WeakSegDataError
from .dataset import WeakSegDataset

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")


def read_image(path: Path, color_mode: str = "auto") -> np.ndarray:
    """Read an image file as float32 (H,W,C) in [0,1] (RGB order)."""
    data = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if data is None:
        raise WeakSegDataError("cannot read this file as an image (missing, truncated or unknown format)",
                               str(path), "image")
    if data.dtype == np.uint8:
        img = data.astype(np.float32) / 255.0
    elif data.dtype == np.uint16:
        img = data.astype(np.float32) / 65535.0
    elif data.dtype in (np.float32, np.float64):
        img = data.astype(np.float32)
    else:
        raise WeakSegDataError(f"unsupported pixel type {data.dtype}", str(path), "image")
    if img.ndim == 2:
        img = img[..., None]
    elif img.shape[2] == 4:
        img = cv2.cvtColor(img, cv2.COLOR_BGRA2RGB)
    elif img.shape[2] == 3:
        img = cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
    if color_mode == "rgb" and img.shape[2] == 1:
        img = np.repeat(img, 3, 2)
    elif color_mode == "gray" and img.shape[2] == 3:
        img = cv2.cvtColor(img, cv2.COLOR_RGB2GRAY)[..., None]
    elif color_mode not in ("auto", "rgb", "gray"):
        raise ValueError(f"color_mode must be 'auto', 'rgb' or 'gray', got {color_mode!r}")
    return img


def read_label_map(path: Path, field: str, dtype=np.int64) -> np.ndarray:
    data = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if data is None:
        raise WeakSegDataError("cannot read this file as a label map", str(path), field)
    if data.ndim != 2:
        raise WeakSegDataError(f"expected a single-channel label map, got shape {data.shape}", str(path), field)
    return data.astype(dtype)


class FolderDataset(WeakSegDataset):
    """Images in ``root/image_dir`` and labels in sibling folders; see the module docstring.

    Args:
        root: the data folder.
        image_dir / mask_dir / instance_dir / scribble_dir: sub-folders (``None`` = not available).
        boxes_json: file name (relative to root) of the boxes JSON, or ``None``.
        box_class: class id given to 4-number boxes.
        mask_map: optional value remapping of mask files, e.g. ``{255: 1}`` for 0/255 binary masks.
        ids: optional subset of file stems.
        color_mode: ``"auto"`` (keep, must match ``in_channels``), ``"rgb"`` or ``"gray"``.
        Other arguments: see :class:`~lightning_weakseg.data.dataset.WeakSegDataset`.
    """

    def __init__(self, root: str | Path, image_dir: str = "images", mask_dir: str | None = "masks",
                 instance_dir: str | None = None, scribble_dir: str | None = None, boxes_json: str | None = None,
                 box_class: int = 1, mask_map: dict | None = None, ids: Sequence[str] | None = None,
                 color_mode: str = "auto", **kwargs):
        super().__init__(**kwargs)
        self.root = Path(root)
        img_root = self.root / image_dir
        if not img_root.is_dir():
            raise WeakSegDataError(f"image folder {img_root} does not exist", None, "image_dir")
        files = sorted(p for p in img_root.iterdir() if p.suffix.lower() in IMAGE_EXTS)
        if ids is not None:
            wanted = set(ids)
            files = [p for p in files if p.stem in wanted]
        if not files:
            raise WeakSegDataError(f"no image files ({', '.join(IMAGE_EXTS)}) in {img_root}", None, "image_dir")
        self.files = files
        self.ids = [p.stem for p in files]
        self.dirs = {"mask": mask_dir, "instances": instance_dir, "scribble": scribble_dir}
        for key, d in self.dirs.items():
            if d is not None and not (self.root / d).is_dir():
                raise WeakSegDataError(f"folder {self.root / d} does not exist", None, f"{key}_dir")
        self.mask_map = {int(k): int(v) for k, v in (mask_map or {}).items()}
        self.color_mode = color_mode
        self.box_class = box_class
        self.boxes = None
        if boxes_json is not None:
            path = self.root / boxes_json
            try:
                self.boxes = json.loads(path.read_text())
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
                raise WeakSegDataError(f"cannot read boxes: {e}", str(path), "boxes") from e
            if not isinstance(self.boxes, dict):
                raise WeakSegDataError(f"expected a JSON object {{image id: [[x0, y0, x1, y1], ...]}}, got a "
                                       f"{type(self.boxes).__name__}", str(path), "boxes")

    def raw_length(self) -> int:
        return len(self.files)

    def sample_id(self, i: int) -> str:
        return self.ids[i]

    def groups(self, regex: str | None) -> list[str]:
        import re
        if regex is None:
            return list(self.ids)
        pat = re.compile(regex)
        out = []
        for s in self.ids:
            m = pat.search(s)
            out.append(m.group(1) if m and m.groups() else (m.group(0) if m else s))
        return out

    def _find(self, folder: str, stem: str, field: str) -> Path:
        d = self.root / folder
        for ext in IMAGE_EXTS:
            p = d / f"{stem}{ext}"
            if p.exists():
                return p
        raise WeakSegDataError(f"no file for this image in {d}", stem, field)

    def load_raw(self, i: int) -> dict:
        path = self.files[i]
        stem = path.stem
        raw = {"image": read_image(path, self.color_mode)}
        for key, d in self.dirs.items():
            if d is None:
                continue
            p = self._find(d, stem, key)
            m = read_label_map(p, key)
            if key == "mask" and self.mask_map:
                lut = m.copy()
                for a, b in self.mask_map.items():
                    lut[m == a] = b
                m = lut
            if m.shape != raw["image"].shape[:2]:
                raise WeakSegDataError(f"size {m.shape} differs from the image's {raw['image'].shape[:2]}",
                                       str(p), key)
            raw[key] = m
        if raw.get("mask") is None and raw.get("instances") is not None:
            raw["mask"] = (raw["instances"] > 0).astype(np.int64)
        if self.boxes is not None:
            rows = self.boxes.get(stem, [])
            if not isinstance(rows, list):
                raise WeakSegDataError(f"expected a list of boxes, got {type(rows).__name__} {rows!r:.60}", stem,
                                       "boxes")
            try:
                b = np.asarray(rows, np.float64) if rows else np.zeros((0, 5))
            except (ValueError, TypeError) as e:
                raise WeakSegDataError(f"boxes must be lists of 4 or 5 numbers: {e}", stem, "boxes") from e
            if b.ndim != 2:  # a flat list or deeper nesting is not a list of boxes; never reshape it into one
                raise WeakSegDataError(f"boxes must be lists of 4 or 5 numbers, got an array of shape {b.shape}",
                                       stem, "boxes")
            if b.shape[1] == 4:
                b = np.concatenate([np.full((len(b), 1), self.box_class), b], 1)
            elif b.shape[1] != 5:
                raise WeakSegDataError(f"boxes must have 4 or 5 numbers each, got {b.shape[1]}", stem, "boxes")
            raw["boxes"] = b.astype(np.float32)
        return raw
