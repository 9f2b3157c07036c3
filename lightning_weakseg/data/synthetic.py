"""Seeded synthetic medical-looking images with exact masks: the default data of the demo and the tests.

Two kinds:

* ``"nuclei"`` — RGB fluorescence/H&E-like tiles: many small irregular blobs (instances kept) with varying
  brightness, textured background, blur and noise. Classes: 0 background, 1 nucleus.
* ``"organ"`` — grayscale MRI/CT-like slices: a large irregular organ (1), a darker lesion inside it (2) and a
  small bright round structure (3) on a textured background whose bright patches overlap the organ's intensity,
  so the task is about shape and edges, not thresholding. Classes 0..3.

Sample ``i`` depends only on ``(seed, i)``: any worker, any rank, any epoch generates the same image.
"""
from __future__ import annotations

import cv2
import numpy as np

from .dataset import WeakSegDataset

__all__ = ["SyntheticDataset", "KINDS", "make_nuclei", "make_organ"]

KINDS = {"nuclei": dict(num_classes=2, in_channels=3), "organ": dict(num_classes=4, in_channels=1)}


def _smooth_noise(rng: np.random.Generator, size: int, sigma: float) -> np.ndarray:
    field = cv2.GaussianBlur(rng.standard_normal((size, size)).astype(np.float32), (0, 0), sigma)
    return field / (field.std() + 1e-6)


def _blob(rng: np.random.Generator, cy: float, cx: float, radius: float, size: int, wobble: float = 0.18,
          aspect: float = 1.0) -> np.ndarray:
    """An irregular star-shaped polygon filled into a (size,size) bool map."""
    theta = np.linspace(0, 2 * np.pi, 48, endpoint=False)
    r = np.ones_like(theta)
    for k in (2, 3, 4):
        r += wobble / k * rng.uniform(-1, 1) * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
    rot = rng.uniform(0, np.pi)
    x = radius * r * np.cos(theta) * aspect
    y = radius * r * np.sin(theta) / aspect
    xs = cx + x * np.cos(rot) - y * np.sin(rot)
    ys = cy + x * np.sin(rot) + y * np.cos(rot)
    out = np.zeros((size, size), np.uint8)
    cv2.fillPoly(out, [np.round(np.stack([xs, ys], 1) * 16).astype(np.int32)], 1, lineType=cv2.LINE_8, shift=4)
    return out.astype(bool)


def make_nuclei(rng: np.random.Generator, size: int):
    scale = size / 64.0
    n = int(rng.integers(6, 14) * scale ** 2)
    instances = np.zeros((size, size), np.int32)
    brightness = np.zeros((size, size), np.float32)
    for k in range(1, n + 1):
        r = rng.uniform(2.5, 5.0) * scale
        cy, cx = rng.uniform(0, size, 2)
        blob = _blob(rng, cy, cx, r, size, wobble=0.25, aspect=rng.uniform(0.75, 1.3))
        blob &= instances == 0  # keep earlier nuclei whole; touching is fine
        if blob.sum() < 4:
            continue
        instances[blob] = k
        brightness[blob] = rng.uniform(0.45, 1.0)
    # relabel consecutively
    ids = np.unique(instances)
    instances = np.searchsorted(ids, instances).astype(np.int32)
    fg = instances > 0
    texture = _smooth_noise(rng, size, 1.2 * scale)
    background = 0.12 + 0.05 * _smooth_noise(rng, size, 6 * scale) + 0.03 * texture
    nucleus = brightness * (0.75 + 0.12 * texture)
    gray = np.where(fg, nucleus, background)
    gray = cv2.GaussianBlur(gray.astype(np.float32), (0, 0), 0.8 * scale)
    gray += rng.normal(0, 0.04, gray.shape)
    tint = rng.uniform(0.6, 1.0, 3)  # stain colour varies per image
    image = np.clip(gray[..., None] * tint[None, None, :], 0, 1).astype(np.float32)
    return image, fg.astype(np.uint8), instances


def make_organ(rng: np.random.Generator, size: int, present: tuple[bool, bool, bool] = (True, True, True)):
    """``present``: whether the organ (1), the lesion (2) and the round structure (3) are drawn; the shapes are
    sampled either way (the same random stream), absent ones are left out of mask and image. No organ, no
    lesion."""
    s = size
    mask = np.zeros((s, s), np.uint8)
    organ = _blob(rng, s * rng.uniform(0.4, 0.6), s * rng.uniform(0.35, 0.6), s * rng.uniform(0.2, 0.28), s,
                  wobble=0.35, aspect=rng.uniform(0.8, 1.25))
    mask[organ] = 1
    ys, xs = np.nonzero(organ)
    j = rng.integers(len(ys))
    lesion = _blob(rng, ys[j], xs[j], s * rng.uniform(0.05, 0.09), s, wobble=0.4) & organ
    mask[lesion] = 2
    for _ in range(20):  # a bright round structure outside the organ
        cy, cx = rng.uniform(0.15, 0.85, 2) * s
        struct = _blob(rng, cy, cx, s * rng.uniform(0.06, 0.09), s, wobble=0.1)
        if not (struct & (mask > 0)).any():
            mask[struct] = 3
            break
    keep_organ = present[0]
    for c, on in zip((1, 2, 3), (keep_organ, present[1] and keep_organ, present[2])):
        if not on:
            mask[mask == c] = 0 if c != 2 or not keep_organ else 1
    organ = organ & keep_organ
    texture = _smooth_noise(rng, s, s / 48)
    patches = _smooth_noise(rng, s, s / 10)
    body = _blob(rng, s / 2, s / 2, s * 0.46, s, wobble=0.1)
    background = np.where(body, 0.35 + 0.12 * patches, 0.05)  # patches reach organ intensity
    level = {1: 0.55, 2: 0.3, 3: 0.8}
    img = background + 0.05 * texture
    for c, v in level.items():
        img = np.where(mask == c, v + 0.04 * texture, img)
    # a darker rim makes the organ boundary visible, as fat planes do in MRI
    rim = cv2.dilate(organ.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool) & ~organ
    img = np.where(rim, img - 0.12, img)
    img = cv2.GaussianBlur(img.astype(np.float32), (0, 0), 0.7 * s / 64)
    img += rng.normal(0, 0.05, img.shape)
    image = np.clip(img, 0, 1).astype(np.float32)[..., None]
    return image, mask, None


class SyntheticDataset(WeakSegDataset):
    """``SyntheticDataset("organ", n=200, image_size=64)`` — see the module docstring.

    ``class_presence`` (organ only): each of the three structures is drawn with this probability, so that
    image-level tags vary between images (with the default 1.0 every image holds every class).

    ``in_channels`` may differ from the kind's natural channel count: grayscale is replicated, RGB averaged.
    Other keyword arguments go to :class:`~lightning_weakseg.data.dataset.WeakSegDataset`.
    """

    def __init__(self, kind: str = "organ", n: int = 200, image_size: int = 64, seed: int = 0,
                 in_channels: int | None = None, class_presence: float = 1.0, **kwargs):
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {sorted(KINDS)}, got {kind!r}")
        if not 0.0 <= class_presence <= 1.0:
            raise ValueError(f"class_presence must be in [0, 1], got {class_presence}")
        self.kind, self.n, self.seed = kind, int(n), int(seed)
        self.class_presence = float(class_presence)
        in_channels = in_channels or KINDS[kind]["in_channels"]
        kwargs.setdefault("num_classes", KINDS[kind]["num_classes"])
        super().__init__(in_channels=in_channels, image_size=image_size, seed=seed, **kwargs)

    def raw_length(self) -> int:
        return self.n

    def sample_id(self, i: int) -> str:
        return f"{self.kind}_{self.seed}_{i:05d}"

    def load_raw(self, i: int) -> dict:
        rng = np.random.default_rng([self.seed, int(i), 7])
        if self.kind == "nuclei":
            image, mask, instances = make_nuclei(rng, self.image_size)
        else:
            # presence draws come from their own stream: class_presence=1 gives the very same images as before
            present = tuple(np.random.default_rng([self.seed, int(i), 11]).random(3) < self.class_presence)
            image, mask, instances = make_organ(rng, self.image_size, present)
        if image.shape[2] != self.in_channels:
            image = (np.repeat(image, self.in_channels, 2) if image.shape[2] == 1
                     else image.mean(2, keepdims=True).repeat(self.in_channels, 2))
        return {"image": image, "mask": mask, "instances": instances}
