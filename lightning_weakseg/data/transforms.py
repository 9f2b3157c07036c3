"""albumentations pipelines that move boxes and points with the image and every label map."""
from __future__ import annotations

import albumentations as A
import numpy as np

__all__ = ["train_augmentation", "compose", "apply"]


def train_augmentation(strength: str = "default") -> list:
    """Default training augmentation. ``"none"`` → no augmentation; ``"light"`` → flips only."""
    if strength == "none":
        return []
    ops = [A.HorizontalFlip(p=0.5), A.VerticalFlip(p=0.5)]
    if strength == "light":
        return ops
    return ops + [
        A.Affine(scale=(0.9, 1.1), translate_percent=(-0.06, 0.06), rotate=(-15, 15), p=0.5,
                 fill=0, fill_mask=0),
        A.RandomBrightnessContrast(0.1, 0.1, p=0.5),
    ]


def compose(ops: list) -> A.Compose:
    return A.Compose(
        ops,
        bbox_params=A.BboxParams(format="pascal_voc", label_fields=["box_labels"], min_visibility=0.0,
                                 clip=True),
        keypoint_params=A.KeypointParams(format="xy", label_fields=["point_labels"], remove_invisible=True),
    )


def apply(pipeline: A.Compose, image: np.ndarray, maps: dict, boxes: np.ndarray | None, points: np.ndarray | None):
    """Apply ``pipeline`` to an image, label maps (dict name → (H,W) int array), boxes (N,5) and points (M,3).

    Pixels that a geometric transform brings in from outside the image become unknown (255) in the label maps
    (0 in ``instances``). Returns ``image, maps, boxes, points, dropped_boxes, dropped_points``.
    """
    h, w = image.shape[:2]
    names = list(maps)
    masks = [maps[k].astype(np.int32) for k in names] + [np.ones((h, w), np.uint8)]
    b = boxes if boxes is not None else np.zeros((0, 5), np.float32)
    p = points if points is not None else np.zeros((0, 3), np.float32)
    res = pipeline(image=image, masks=masks, bboxes=b[:, 1:], box_labels=b[:, 0].tolist(),
                   keypoints=p[:, [2, 1]], point_labels=p[:, 0].tolist())
    out_masks = res["masks"]
    valid = np.asarray(out_masks[-1]).astype(bool)
    new_maps = {}
    for k, m in zip(names, out_masks[:-1]):
        m = np.asarray(m)
        if not valid.all():
            m = np.where(valid, m, 0 if k == "instances" else 255)
        new_maps[k] = m
    nb = np.asarray(res["bboxes"], np.float32).reshape(-1, 4)
    new_boxes = np.concatenate([np.asarray(res["box_labels"], np.float32).reshape(-1, 1), nb], 1)
    # a box clipped to nothing or a point pushed out of the image is dropped; we count it
    keep = (new_boxes[:, 3] > new_boxes[:, 1]) & (new_boxes[:, 4] > new_boxes[:, 2])
    new_boxes = new_boxes[keep]
    kp = np.asarray(res["keypoints"], np.float32).reshape(-1, 2)
    kp = np.round(kp)  # rotation lands between pixels; points are pixel indices
    new_points = np.concatenate([np.asarray(res["point_labels"], np.float32).reshape(-1, 1), kp[:, [1, 0]]], 1)
    inside = (new_points[:, 1] >= 0) & (new_points[:, 1] <= h - 1) & (new_points[:, 2] >= 0) & (new_points[:, 2] <= w - 1)
    new_points = new_points[inside]
    return (res["image"], new_maps,
            new_boxes if boxes is not None else None,
            new_points if points is not None else None,
            len(b) - len(new_boxes), len(p) - len(new_points))
