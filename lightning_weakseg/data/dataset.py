"""The sample pipeline shared by every data set: load → base view → weak labels → augment → validate."""
from __future__ import annotations

import copy
import warnings
from typing import Any, Sequence

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from .batch import IGNORE_INDEX, LABEL_KEYS, MASK_KEYS, validate_sample
from .transforms import apply, compose, train_augmentation
from .weakify import weakify as derive_weak_labels

DERIVABLE = ("tags", "boxes", "points", "scribble", "noisy_mask")


class WeakSegDataset(Dataset):
    """Base class. Subclasses implement ``__len__``, ``sample_id(i)`` and ``load_raw(i)`` returning a dict with
    ``image`` float32 (H,W,C) in [0,1] and any of ``mask``, ``instances``, ``scribble`` (H,W) int arrays,
    ``boxes`` (N,5) float; this class does the rest.

    Args:
        num_classes: classes including background.
        in_channels: channels the model expects; a mismatch is an error naming the file.
        image_size: the base view: every sample is resized to ``image_size`` (int or (H,W)) first.
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
                 indices: Sequence[int] | None = None):
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
        self.pseudo_labels: dict[int, np.ndarray] = {}
        self._weak_cache: dict[int, dict] = {}
        self._pipeline = None

    # ---- to implement ----
    def load_raw(self, i: int) -> dict:  # pragma: no cover - abstract
        raise NotImplementedError

    def sample_id(self, i: int) -> str:
        return str(i)

    def raw_length(self) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

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
        h0, w0 = raw["image"].shape[:2]
        H, W = self.image_hw
        if (h0, w0) == (H, W):
            return raw
        sy, sx = H / h0, W / w0
        out = dict(raw)
        out["image"] = cv2.resize(raw["image"], (W, H), interpolation=cv2.INTER_AREA if sx < 1 else cv2.INTER_LINEAR)
        if out["image"].ndim == 2:
            out["image"] = out["image"][..., None]
        for k in ("mask", "instances", "scribble"):
            if raw.get(k) is not None:
                out[k] = cv2.resize(raw[k].astype(np.int32 if k == "instances" else np.uint8), (W, H),
                                    interpolation=cv2.INTER_NEAREST)
        if raw.get("boxes") is not None and len(raw["boxes"]):
            b = np.asarray(raw["boxes"], np.float32).copy()
            b[:, [1, 3]] *= sx
            b[:, [2, 4]] *= sy
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

    def _base(self, raw_i: int) -> dict:
        """The un-augmented sample in the base view with every requested label (weak labels cached)."""
        name = self.sample_id(raw_i)
        raw = self.load_raw(raw_i)
        self.check_raw(raw, name)
        raw = self._resize(raw, name)
        keys = self.keys_for(raw_i)
        sample = {"image": raw["image"], "id": name}
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
        for k, m in maps.items():
            out[k] = torch.from_numpy(np.asarray(m).astype(np.int64))
        if "tags" in s:
            out["tags"] = torch.from_numpy(np.asarray(s["tags"], np.float32))
        if boxes is not None:
            out["boxes"] = torch.from_numpy(np.asarray(boxes, np.float32).reshape(-1, 5))
            out["dropped_boxes"] = dropped_b
        if points is not None:
            out["points"] = torch.from_numpy(np.asarray(points, np.float32).reshape(-1, 3))
            out["dropped_points"] = dropped_p
        validate_sample(out, self.num_classes, self.in_channels, s["id"])
        return out
