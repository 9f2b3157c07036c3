"""The sample pipeline shared by every data set: load → base view → weak labels → augment → validate."""
from __future__ import annotations

import copy
import warnings
from typing import Any, Sequence

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from ..errors import WeakSegDataError
from .batch import IGNORE_INDEX, LABEL_KEYS, MASK_KEYS, validate_sample
from .geometry import RESIZE_MODES, fit
from .transforms import apply, compose, train_augmentation
from .weakify import weakify as derive_weak_labels

__all__ = ["WeakSegDataset", "DERIVABLE"]

DERIVABLE = ("tags", "boxes", "points", "scribble", "noisy_mask")


def _chw(a: np.ndarray) -> torch.Tensor:
    """H × W or H × W × C array → C × H × W float32 tensor."""
    a = np.asarray(a, np.float32)
    return torch.from_numpy(np.ascontiguousarray(np.moveaxis(a if a.ndim == 3 else a[..., None], 2, 0)))


class WeakSegDataset(Dataset):
    """Base class. Subclasses implement ``__len__``, ``sample_id(i)`` and ``load_raw(i)`` returning a dict with
    ``image`` float32 (H,W,C) in [0,1] and any of ``mask``, ``instances``, ``scribble`` (H,W) int arrays,
    ``boxes`` (N,5) float; this class does the rest.

    Args:
        num_classes: classes including background.
        in_channels: channels the model expects; a mismatch is an error naming the file.
        image_size: the base view: every sample is brought to ``image_size`` (int or (H,W)) first, by ``resize``.
        resize: ``"longest"`` (keep the aspect, pad; default), ``"pad"`` (pad only) or ``"stretch"``; see
            :mod:`~lightning_weakseg.data.geometry`.
        native_eval: samples also carry ``native_mask``, the mask at the file's resolution (evaluation).
        labels: label keys every sample carries (``mask``, ``noisy_mask``, ``scribble``, ``boxes``,
            ``points``, ``tags``, ``instances``). Labels the raw data lacks are derived from its mask by
            :mod:`~lightning_weakseg.data.weakify`, seeded per sample.
        label_plan: optional per-index tuple of keys (mixed supervision); overrides ``labels`` per sample.
        weakify: keyword arguments of :func:`~lightning_weakseg.data.weakify.weakify`.
        augment: ``"default"``, ``"light"``, ``"none"`` or a list of albumentations transforms.
        indices: optional subset of raw indices this dataset exposes (a split).
    """

    def __init__(self, num_classes: int, in_channels: int, image_size: int | Sequence[int] = 64,
                 labels: Sequence[str] = ("mask",), label_plan: Sequence[Sequence[str]] | None = None,
                 weakify: dict | None = None, augment: str | list = "none", seed: int = 0,
                 indices: Sequence[int] | None = None, resize: str = "longest", native_eval: bool = False):
        unknown = set(labels) - set(LABEL_KEYS)
        if unknown:
            raise ValueError(f"unknown label keys {sorted(unknown)}; expected a subset of {LABEL_KEYS}")
        self.num_classes, self.in_channels, self.seed = num_classes, in_channels, seed
        size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        self.image_hw = size
        self.image_size = size[0]
        self.labels = tuple(labels)
        self.label_plan = label_plan
        self.weakify_kwargs = dict(weakify or {})
        self.augment = augment
        self.indices = None if indices is None else list(indices)
        if resize not in RESIZE_MODES:
            raise ValueError(f"resize must be one of {RESIZE_MODES}, got {resize!r}")
        self.resize = resize
        self.native_eval = native_eval
        self.pseudo_labels: dict[int, np.ndarray] = {}
        self._weak_cache: dict[int, dict] = {}
        self._warned_erased: set[int] = set()
        self._pipeline = None

    # ---- to implement ----
    def load_raw(self, i: int) -> dict:  # pragma: no cover - abstract
        raise NotImplementedError

    def sample_id(self, i: int) -> str:
        return str(i)

    def raw_length(self) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    def sample_meta(self, i: int) -> dict[str, Any]:
        """Keys a sample of raw index ``i`` carries beside its image and labels (volumes: its volume, slice and
        spacing); none by default."""
        return {}

    # ---- views ----
    def subset(self, indices: Sequence[int], **overrides) -> "WeakSegDataset":
        """A view of these raw indices (a split), sharing caches, with some attributes overridden."""
        view = copy.copy(self)
        view.indices = list(indices)
        view._pipeline = None
        for k, v in overrides.items():
            if not hasattr(view, k):
                raise AttributeError(k)
            setattr(view, k, v)
        return view

    def __len__(self) -> int:
        return len(self.indices) if self.indices is not None else self.raw_length()

    def raw_index(self, i: int) -> int:
        return self.indices[i] if self.indices is not None else i

    def set_pseudo_labels(self, labels: dict[int, np.ndarray]) -> None:
        """Pseudo-label maps (uint8 (H,W) in the base view, 255 = unknown) by raw index; samples that have one
        carry ``pseudo`` (augmented with the image). The dict is shared with every view of this dataset."""
        self.pseudo_labels.clear()
        self.pseudo_labels.update({int(k): np.asarray(v, np.uint8) for k, v in labels.items()})

    def keys_for(self, raw_i: int) -> tuple:
        if self.label_plan is not None:
            return tuple(self.label_plan[raw_i])
        return self.labels

    # ---- the pipeline ----
    def _resize(self, raw: dict, name) -> dict:
        """The raw sample in the base view (see :mod:`~lightning_weakseg.data.geometry`): image, label maps and
        boxes scaled and padded alike; ``_fit`` / ``_orig_size`` record the geometry, ``valid`` marks the
        pixels that hold the image, ``_erased`` counts weak labels the downscaling erased."""
        h0, w0 = raw["image"].shape[:2]
        H, W = self.image_hw
        g = fit(h0, w0, H, W, self.resize)
        out = dict(raw)
        out["_orig_size"], out["_fit"], out["_erased"] = (h0, w0), g, {}
        if (g.h, g.w) == (h0, w0) and (g.h, g.w) == (H, W):
            return out
        pad = (g.top, H - g.top - g.h, g.left, W - g.left - g.w)

        def place(a: np.ndarray, fill, interp) -> np.ndarray:
            if (g.h, g.w) != a.shape[:2]:
                a = cv2.resize(a, (g.w, g.h), interpolation=interp)
                if raw["image"].ndim == 3 and a.ndim == 2 and interp != cv2.INTER_NEAREST:
                    a = a[..., None]
            if any(pad):
                a = cv2.copyMakeBorder(a, *pad, cv2.BORDER_CONSTANT, value=fill)
                if raw["image"].ndim == 3 and a.ndim == 2 and interp != cv2.INTER_NEAREST:
                    a = a[..., None]
            return a

        out["image"] = place(raw["image"], 0, cv2.INTER_AREA if g.sx < 1 else cv2.INTER_LINEAR)
        for k in ("mask", "instances", "scribble"):
            if raw.get(k) is not None:
                m = place(raw[k].astype(np.int32 if k == "instances" else np.uint8),
                          0 if k == "instances" else IGNORE_INDEX, cv2.INTER_NEAREST)
                out[k] = m
        if raw.get("scribble") is not None:
            before = np.unique(raw["scribble"])
            after = set(np.unique(out["scribble"]).tolist())
            lost = [int(c) for c in before if c != IGNORE_INDEX and int(c) not in after]
            if lost:
                out["_erased"]["scribble"] = lost
        if any(pad):
            out["valid"] = place(np.ones((h0, w0), np.uint8), 0, cv2.INTER_NEAREST)
        if raw.get("boxes") is not None and len(raw["boxes"]):
            b = np.asarray(raw["boxes"], np.float32).copy()
            b[:, [1, 3]] = b[:, [1, 3]] * g.sx + g.left
            b[:, [2, 4]] = b[:, [2, 4]] * g.sy + g.top
            small = ((b[:, 3] - b[:, 1]) < 1) | ((b[:, 4] - b[:, 2]) < 1)
            if small.any():
                out["_erased"]["boxes"] = int(small.sum())
            out["boxes"] = b
        return out

    def check_raw(self, raw: dict, name: str) -> None:
        """Validate a ``load_raw`` result in the user's geometry (before any resize), so that errors name the
        file's own coordinates."""
        img = raw["image"]
        if img.ndim != 3:
            from ..errors import WeakSegDataError
            raise WeakSegDataError(f"expected an (H,W,C) image, got shape {img.shape}", name, "image")
        validate_sample({**{k: v for k, v in raw.items() if k != "image"}, "image": np.moveaxis(img, 2, 0)},
                        self.num_classes, self.in_channels, name, require_label=False)

    def unlabelled_sample(self, raw: dict, name: str, raw_i: int, keep_native: bool = False) -> dict[str, Any]:
        """A sample with no labels, for prediction: the base view (``image``, CHW float), ``id``, ``index``, the
        geometry back to the raw image's size (``orig_size`` [H0, W0], ``content`` [top, left, h, w]) and, with
        ``keep_native``, the raw image itself (``native_image``, C × H0 × W0)."""
        h0, w0 = raw["image"].shape[:2]
        view = self._resize({"image": raw["image"]}, name)
        g = view["_fit"]
        out = {"image": _chw(view["image"]), "id": name, "index": raw_i,
               "orig_size": torch.tensor([h0, w0], dtype=torch.long),
               "content": torch.tensor([g.top, g.left, g.h, g.w], dtype=torch.long)}
        if keep_native:
            out["native_image"] = _chw(raw["image"])
        return out

    def _base(self, raw_i: int) -> dict:
        """The un-augmented sample in the base view with every requested label (weak labels cached)."""
        name = self.sample_id(raw_i)
        raw = self.load_raw(raw_i)
        self.check_raw(raw, name)
        native_mask = raw.get("mask")
        raw = self._resize(raw, name)
        keys = self.keys_for(raw_i)
        sample = {"image": raw["image"], "id": name}
        if "_fit" in raw:
            g = raw["_fit"]
            sample["orig_size"] = np.asarray(raw["_orig_size"], np.int64)
            sample["content"] = np.asarray([g.top, g.left, g.h, g.w], np.int64)
        if raw.get("valid") is not None:
            sample["valid"] = raw["valid"]
        erased = {k: v for k, v in raw.get("_erased", {}).items() if k in keys}
        if erased and raw_i not in self._warned_erased:
            self._warned_erased.add(raw_i)
            warnings.warn(f"sample {name}: resizing to {self.image_hw} erased weak labels: "
                          + "; ".join(f"{k}: classes {v}" if k == "scribble" else f"{k}: {v} box(es) under one pixel"
                                      for k, v in erased.items()), stacklevel=3)
        if self.native_eval and native_mask is not None:
            sample["native_mask"] = native_mask
        need = [k for k in keys if k in DERIVABLE and raw.get(k) is None]
        if need:
            if raw.get("mask") is None:
                from ..errors import WeakSegDataError
                raise WeakSegDataError(f"labels {need} are neither in the data nor derivable (no mask)", name, need[0])
            cached = self._weak_cache.get(raw_i)
            if cached is None or any(k not in cached for k in need):
                rng = np.random.default_rng([self.seed, raw_i, 11])
                cached = derive_weak_labels(raw["mask"], self.num_classes, need, rng,
                                            instances=raw.get("instances"), **self.weakify_kwargs)
                self._weak_cache[raw_i] = cached
            sample.update({k: cached[k] for k in need})
        for k in keys:
            if k not in sample:
                if raw.get(k) is None:
                    from ..errors import WeakSegDataError
                    raise WeakSegDataError(f"the data has no '{k}' for this sample", name, k)
                sample[k] = raw[k]
        if raw_i in self.pseudo_labels:
            p = self.pseudo_labels[raw_i]
            if p.shape != tuple(self.image_hw):
                from ..errors import WeakSegDataError
                raise WeakSegDataError(f"pseudo label of shape {p.shape}, expected {self.image_hw}", name, "pseudo")
            sample["pseudo"] = p
        return sample

    def __getitem__(self, i: int) -> dict[str, Any]:
        # one intra-op thread for the many small tensor checks: DataLoader workers do the same; in the main
        # process (num_workers=0) on a busy machine, waking a second thread per tiny op costs 10-20x
        n = torch.get_num_threads()
        if n == 1:
            return self._getitem(i)
        torch.set_num_threads(1)
        try:
            return self._getitem(i)
        finally:
            torch.set_num_threads(n)

    def _getitem(self, i: int) -> dict[str, Any]:
        raw_i = self.raw_index(int(i))
        s = self._base(raw_i)
        maps = {k: s[k] for k in MASK_KEYS + ("instances",) if k in s}
        if "valid" in s:
            maps["valid"] = s["valid"].astype(np.uint8)
        image = s["image"]
        boxes, points = s.get("boxes"), s.get("points")
        dropped_b = dropped_p = 0
        if self.augment != "none":
            if self._pipeline is None:
                ops = train_augmentation(self.augment) if isinstance(self.augment, str) else list(self.augment)
                self._pipeline = compose(ops)
            image, maps, boxes, points, dropped_b, dropped_p = apply(self._pipeline, image, maps, boxes, points)
            if dropped_b or dropped_p:
                warnings.warn(f"sample {s['id']}: augmentation pushed {dropped_b} box(es) and {dropped_p} point(s) "
                              "out of the image; they were dropped (counted in dropped_boxes/dropped_points)",
                              stacklevel=2)
        out = {"image": torch.from_numpy(np.ascontiguousarray(np.moveaxis(np.asarray(image, np.float32), 2, 0))),
               "index": raw_i, "id": s["id"]}
        valid = maps.pop("valid", None)
        for k, m in maps.items():
            out[k] = torch.from_numpy(np.asarray(m).astype(np.int64))
        if valid is not None:
            out["valid"] = torch.from_numpy(np.asarray(valid) == 1)
        for k in ("orig_size", "content", "native_mask"):
            if k in s:
                out[k] = torch.from_numpy(np.asarray(s[k]).astype(np.int64))
        if "tags" in s:
            out["tags"] = torch.from_numpy(np.asarray(s["tags"], np.float32))
        if boxes is not None:
            out["boxes"] = torch.from_numpy(np.asarray(boxes, np.float32).reshape(-1, 5))
            out["dropped_boxes"] = dropped_b
        if points is not None:
            out["points"] = torch.from_numpy(np.asarray(points, np.float32).reshape(-1, 3))
            out["dropped_points"] = dropped_p
        # a sample planned without any label (label_fractions "none") is an unlabelled training image
        validate_sample(out, self.num_classes, self.in_channels, s["id"], require_label=bool(self.keys_for(raw_i)))
        return out
