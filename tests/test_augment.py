"""Augmentation moves boxes and points with the image and the masks, and counts what it drops."""
import albumentations as A
import numpy as np

from lightning_weakseg.data import SyntheticDataset
from lightning_weakseg.data.transforms import apply, compose
from lightning_weakseg.data.weakify import boxes_from_mask


def test_boxes_and_points_follow_the_mask_through_flips_and_rot90():
    ds = SyntheticDataset("organ", n=3, image_size=64, labels=("mask", "boxes", "points"), augment=[
        A.HorizontalFlip(p=1), A.VerticalFlip(p=1), A.Transpose(p=1)])
    for i in range(3):
        s = ds[i]
        mask = s["mask"].numpy()
        expected = sorted(boxes_from_mask(mask).tolist())
        assert sorted(s["boxes"].tolist()) == expected  # still tight around the moved objects
        p = s["points"].numpy().astype(int)
        assert (mask[p[:, 1], p[:, 2]] == p[:, 0]).all()  # each click still on its object


def test_out_of_image_labels_are_dropped_and_counted():
    img = np.zeros((20, 20, 1), np.float32)
    m = np.zeros((20, 20), np.int64)
    m[1:4, 1:4] = 1
    boxes = np.array([[1, 1, 1, 4, 4], [1, 10, 10, 15, 15]], np.float32)
    points = np.array([[1, 2, 2], [1, 12, 12]], np.float32)
    shift = compose([A.Affine(translate_px={"x": -8, "y": -8}, p=1, fill=0, fill_mask=0)])
    _, maps, b, p, nb, np_ = apply(shift, img, {"mask": m}, boxes, points)
    assert nb == 1 and np_ == 1
    assert b.tolist() == [[1, 2, 2, 7, 7]] and p.tolist() == [[1, 4, 4]]
    assert (maps["mask"][-8:, :] == 255).all() and (maps["mask"][:, -8:] == 255).all()  # unknown, not background
