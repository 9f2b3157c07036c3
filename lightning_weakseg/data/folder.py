"""Folder data sets: images plus any of masks, instance maps, scribbles and a boxes JSON, matched by file stem.

The layout is given by arguments, never by a data-set name::

    root/images/<id>.png|jpg|...        root/masks/<id>.png        (class ids, 255 = unknown)
    root/instances/<id>.png (uint16)    root/scribbles/<id>.png    (class ids, 255 = unlabelled)
    root/boxes.json: {"<id>": [[x0, y0, x1, y1], ...]} or [[class, x0, y0, x1, y1], ...]

``<id>`` is the file stem; boxes.json keys may also be file names (``"a.jpg"``). Every image needs an entry when
boxes are read (``[]``: no object), and :mod:`~lightning_weakseg.data.check` reports entries that name no image.
Masks stored 0/255 need ``mask_map={255: 1}`` (255 is "unknown" otherwise; the data check says so).

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

__all__ = ["FolderDataset", "IMAGE_EXTS", "truncation", "decode", "read_image", "read_label_map"]

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")


def _read_bytes(path: Path, field: str) -> np.ndarray:
    try:
        data = np.fromfile(str(path), np.uint8)
    except OSError as e:
        raise WeakSegDataError(f"cannot read this file: {e}", str(path), field) from None
    return data


def truncation(data: np.ndarray, suffix: str) -> str | None:
    """Why a JPEG or PNG byte string is incomplete (libjpeg only warns and fills the rest grey), or None.

    A complete JPEG ends with the EOI marker FF D9 (possibly followed by padding zeros), a PNG with its IEND
    chunk; other formats (and files that are not what their suffix says) are left to the decoder."""
    suffix = suffix.lower()
    head = data[:8].tobytes()
    if suffix in (".jpg", ".jpeg") and head.startswith(b"\xff\xd8"):
        tail = data[-64:].tobytes().rstrip(b"\x00")
        if not tail.endswith(b"\xff\xd9"):
            return "truncated JPEG (no end-of-image marker): the decoder would fill the missing part grey"
    elif suffix == ".png" and head.startswith(b"\x89PNG"):
        if b"IEND" not in data[-16:].tobytes():
            return "truncated PNG (no IEND chunk)"
    return None


def decode(path: Path, field: str, flags: int = cv2.IMREAD_UNCHANGED) -> np.ndarray:
    """Decode an image file completely; a missing, unreadable or truncated file is a :class:`WeakSegDataError`."""
    data = _read_bytes(path, field)
    why = truncation(data, path.suffix) if data.size else "empty file"
    if why:
        raise WeakSegDataError(why, str(path), field)
    img = cv2.imdecode(data, flags)
    if img is None:
        raise WeakSegDataError("cannot decode this file as an image (unknown format or corrupt data)", str(path),
                               field)
    return img


def read_image(path: Path, color_mode: str = "auto") -> np.ndarray:
    """Read an image file as float32 (H,W,C) in [0,1] (RGB order); a truncated file is an error."""
    data = decode(path, "image")
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
    data = decode(path, field)
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
        files = all_files = sorted(p for p in img_root.iterdir() if p.suffix.lower() in IMAGE_EXTS)
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
        self._box_keys = None
        self.image_dir_name = image_dir
        self.boxes_required = False  # set where boxes are trained on through a view that does not ask for them
        self.all_files = all_files
        self.boxes_path = None if boxes_json is None else self.root / boxes_json
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

    def label_path(self, i: int, key: str) -> Path:
        """The file of label ``key`` (``mask``, ``instances``, ``scribble``) for image ``i``."""
        return self._find(self.dirs[key], self.ids[i], key)

    def read_label(self, i: int, key: str, hw: tuple[int, int] | None = None) -> np.ndarray:
        """Label map ``key`` of image ``i`` as int64 (H,W), ``mask_map`` applied to masks; its size must be
        ``hw`` (the image's) when given."""
        p = self.label_path(i, key)
        m = read_label_map(p, key)
        if key == "mask" and self.mask_map:
            lut = m.copy()
            for a, b in self.mask_map.items():
                lut[m == a] = b
            m = lut
        if hw is not None and m.shape != tuple(hw):
            raise WeakSegDataError(f"size {m.shape} differs from the image's {tuple(hw)}", str(p), key)
        return m

    def load_raw(self, i: int) -> dict:
        raw = {"image": read_image(self.files[i], self.color_mode)}
        hw = raw["image"].shape[:2]
        for key, d in self.dirs.items():
            if d is not None:
                raw[key] = self.read_label(i, key, hw)
        if raw.get("mask") is None and raw.get("instances") is not None:
            raw["mask"] = (raw["instances"] > 0).astype(np.int64)
        if self.boxes is not None:
            # an image without an entry is an error only where boxes are trained on (a tiled view reads them too)
            needed = "boxes" in self.keys_for(i) or self.boxes_required
            if needed or self.ids[i] in self._box_index():
                raw["boxes"], _ = self.box_rows(i, *hw)
        return raw

    # ---- boxes.json ----
    def _box_index(self) -> dict[str, str]:
        """boxes.json key → image stem. A key is an image's stem or its file name (``"a.jpg"``); keys that name
        no image are reported by :meth:`unknown_box_keys`."""
        if self._box_keys is None:
            by_name = {p.name: p.stem for p in self.all_files}
            stems = {p.stem for p in self.all_files}
            index = {}
            for key in self.boxes:
                if key in stems:
                    index.setdefault(key, key)
                elif key in by_name:
                    index.setdefault(by_name[key], key)
            self._box_keys = index
        return self._box_keys

    def unknown_box_keys(self) -> list[str]:
        """Entries of boxes.json that name no image of the image folder (by stem or file name)."""
        if self.boxes is None:
            return []
        known = set(self._box_index().values())
        return [k for k in self.boxes if k not in known]

    def box_rows(self, i: int, h: int, w: int) -> tuple[np.ndarray, int]:
        """The boxes of image ``i`` (``h × w``) from boxes.json as (N,5) ``[class, x0, y0, x1, y1]`` float32, and
        how many were clipped: a box that overshoots the image by less than one pixel (sub-pixel export error)
        is clipped to it; more is an error. A missing entry, a ``null`` coordinate or a malformed row is a
        :class:`WeakSegDataError` naming the image and the boxes file."""
        stem = self.ids[i]
        key = self._box_index().get(stem)
        where, src = stem, f"{self.boxes_path.name}: "
        if key is None:
            raise WeakSegDataError(src + "this image has no entry in the boxes file; write [] for an image without "
                                   "objects (boxes.json keys are the images' file stems or file names)", where,
                                   "boxes")
        rows = self.boxes[key]
        if not isinstance(rows, list):
            raise WeakSegDataError(src + f"expected a list of boxes, got {type(rows).__name__} {rows!r:.60}", where,
                                   "boxes")
        for j, r in enumerate(rows):
            if not isinstance(r, (list, tuple)) or len(r) not in (4, 5):
                raise WeakSegDataError(src + f"box {j}: expected 4 numbers [x0, y0, x1, y1] or 5 [class, x0, y0, x1, y1], "
                                       f"got {r!r:.60}", where, "boxes")
            if any(v is None for v in r):
                raise WeakSegDataError(src + f"box {j}: missing coordinate (null) in {r!r:.60}", where, "boxes")
            if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in r):
                raise WeakSegDataError(src + f"box {j}: expected numbers, got {r!r:.60}", where, "boxes")
        if not rows:
            return np.zeros((0, 5), np.float32), 0
        lengths = {len(r) for r in rows}
        if len(lengths) > 1:
            raise WeakSegDataError(src + "boxes of one image mix 4- and 5-number rows", where, "boxes")
        b = np.asarray(rows, np.float64)
        if b.shape[1] == 4:
            b = np.concatenate([np.full((len(b), 1), self.box_class), b], 1)
        if not np.isfinite(b).all():
            raise WeakSegDataError(src + "NaN or infinite coordinates", where, "boxes")
        lo = np.array([0, 0, 0, 0], np.float64)
        hi = np.array([w, h, w, h], np.float64)
        xy = b[:, 1:]
        over = np.maximum(lo - xy, xy - hi).max(1)          # how far a box leaves the image, in pixels
        bad = over >= 1
        if bad.any():
            j = int(np.flatnonzero(bad)[0])
            raise WeakSegDataError(src + f"box {j} {b[j, 1:].tolist()} lies {over[j]:.2f} px outside the {w}x{h} image "
                                   "(pixel-edge xyxy; up to one pixel of overshoot is clipped)", where, "boxes")
        clipped = int((over > 0).sum())
        if clipped:
            b[:, 1:] = np.clip(xy, lo, hi)
        return b.astype(np.float32), clipped
