"""Synthetic organ set: class presence varies image-level tags without changing the default images."""
from __future__ import annotations

import cv2
import numpy as np
import pytest

from lightning_weakseg.data.synthetic import SyntheticDataset
from lightning_weakseg.data.weakify import tags_from_mask


def test_default_presence_is_every_class_and_unchanged_images():
    full = SyntheticDataset("organ", n=6, image_size=48, seed=3)
    same = SyntheticDataset("organ", n=6, image_size=48, seed=3, class_presence=1.0)
    for i in range(6):
        a, b = full.load_raw(i), same.load_raw(i)
        assert np.array_equal(a["image"], b["image"]) and np.array_equal(a["mask"], b["mask"])
        assert tags_from_mask(a["mask"], 4).tolist() == [1, 1, 1, 1]


def test_presence_makes_tags_vary_and_absent_structures_leave_mask_and_image():
    full = SyntheticDataset("organ", n=40, image_size=48, seed=1)
    part = SyntheticDataset("organ", n=40, image_size=48, seed=1, class_presence=0.5)
    tags = np.stack([tags_from_mask(part.load_raw(i)["mask"], 4) for i in range(40)])
    for c in (1, 2, 3):
        assert 0 < tags[:, c].sum() < 40, f"class {c} present in every or no image"
    assert not (tags[:, 2] > tags[:, 1]).any()  # no lesion without its organ
    checked = 0
    for i in range(40):
        f, p = full.load_raw(i), part.load_raw(i)
        gone = f["mask"] != p["mask"]  # structures left out of this image (a lesion turns into organ)
        if not gone.any():
            assert np.array_equal(f["image"], p["image"])
            continue
        near = cv2.dilate(gone.astype(np.uint8), np.ones((11, 11), np.uint8)).astype(bool)
        # the same random stream: away from the removed structures the images are identical, on them not
        assert np.array_equal(f["image"][~near], p["image"][~near])
        assert np.abs(f["image"][gone] - p["image"][gone]).mean() > 0.05
        checked += 1
    assert checked > 5
    with pytest.raises(ValueError, match="class_presence"):
        SyntheticDataset("organ", class_presence=1.5)
