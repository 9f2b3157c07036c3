"""Tiles: exact crops of the resized image and labels, per-tile tags, clipped boxes, whole images per split."""
import json

import cv2
import numpy as np
import pytest

from lightning_weakseg.data import FolderDataset, TiledDataset, WeakSegDataModule


def write_folder(root, n=6, size=8):
    (root / "images").mkdir()
    (root / "masks").mkdir()
    rng = np.random.default_rng(0)
    boxes = {}
    for i in range(n):
        img = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        mask = np.zeros((size, size), np.uint8)
        mask[1:3, 1:3] = 1  # an object in the top-left tile only (tiles of 4 px)
        if i % 2:
            mask[5:7, 2:7] = 1  # and one across the two bottom tiles
        cv2.imwrite(str(root / "images" / f"im{i}.png"), img)
        cv2.imwrite(str(root / "masks" / f"im{i}.png"), mask)
        boxes[f"im{i}"] = [[1, 1, 3, 3]] + ([[2, 5, 7, 7]] if i % 2 else [])
    (root / "boxes.json").write_text(json.dumps(boxes))
    return root


def test_tiles_are_exact_crops_with_their_own_tags_and_boxes(tmp_path):
    root = write_folder(tmp_path)
    src = FolderDataset(root, num_classes=2, in_channels=3, image_size=8, boxes_json="boxes.json")
    ds = TiledDataset(src, 2, image_size=4, labels=("mask", "tags", "boxes"))
    assert len(ds) == 4 * len(src) and ds.sample_id(7) == "im1@r1c1"
    full = src.load_raw(1)
    for t in range(4):
        r, c = divmod(t, 2)
        s = ds[4 + t]
        img = np.moveaxis(s["image"].numpy(), 0, 2)
        assert np.allclose(img, full["image"][4 * r:4 * r + 4, 4 * c:4 * c + 4])
        assert np.array_equal(s["mask"].numpy(), full["mask"][4 * r:4 * r + 4, 4 * c:4 * c + 4])
    # tags by hand: top-left tile holds the first object, the bottom tiles the second, top-right nothing
    tags = [ds[4 + t]["tags"].tolist() for t in range(4)]
    assert tags == [[1.0, 1.0], [1.0, 0.0], [1.0, 1.0], [1.0, 1.0]]
    assert [ds[t]["tags"][1].item() for t in range(4)] == [1.0, 0.0, 0.0, 0.0]
    # boxes: (x0, y0, x1, y1) = (2, 5, 7, 7) spans the bottom tiles → (2, 1, 4, 3) and (0, 1, 3, 3)
    assert ds[4]["boxes"].tolist() == [[1, 1, 1, 3, 3]]
    assert ds[5]["boxes"].numel() == 0
    assert ds[6]["boxes"].tolist() == [[1, 2, 1, 4, 3]]
    assert ds[7]["boxes"].tolist() == [[1, 0, 1, 3, 3]]


def test_tiles_resize_first_and_check_the_source_size(tmp_path):
    root = write_folder(tmp_path, size=16)
    src = FolderDataset(root, num_classes=2, in_channels=3, image_size=8)
    ds = TiledDataset(src, 2, image_size=4)
    resized = src._resize(src.load_raw(0), "im0")
    assert np.array_equal(ds[1]["mask"].numpy(), resized["mask"][0:4, 4:8])
    with pytest.raises(ValueError, match="grid 3"):
        TiledDataset(src, 3, image_size=4)


@pytest.mark.parametrize("source", ["folder", "synthetic"])
def test_datamodule_keeps_the_tiles_of_an_image_in_one_split(tmp_path, source):
    kw = dict(source="folder", root=str(write_folder(tmp_path, n=10)), num_classes=2, in_channels=3) \
        if source == "folder" else dict(n_samples=10)
    dm = WeakSegDataModule(image_size=4 if source == "folder" else 32, tiles=2, val_fraction=0.3,
                           train_labels=("tags",), **kw)
    dm.setup("fit")
    train, val = set(dm.split["train"]), set(dm.split["val"])
    assert len(train) + len(val) == 40 and not train & val
    assert {i // 4 for i in train}.isdisjoint({i // 4 for i in val})
    assert all({i // 4 * 4 + t for t in range(4)} <= train for i in train)
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape[-2:] == ((4, 4) if source == "folder" else (32, 32))
    with pytest.raises(ValueError, match="tiles"):
        WeakSegDataModule(tiles=0)


def test_tile_eval_images_validates_on_the_whole_images(tmp_path):
    root = write_folder(tmp_path, n=10)
    dm = WeakSegDataModule(source="folder", root=str(root), num_classes=2, in_channels=3, image_size=4, tiles=2,
                           val_fraction=0.3, train_labels=("tags",), tile_eval="images")
    dm.setup("fit")
    assert dm.val_dataset.indices == sorted({i // 4 for i in dm.split["val"]}) and len(dm.val_dataset) == 3
    batch = next(iter(dm.val_dataloader()))
    assert batch["image"].shape[-2:] == (8, 8)
    src = FolderDataset(root, num_classes=2, in_channels=3, image_size=8)
    j = dm.val_dataset.indices[0]
    assert np.array_equal(batch["mask"][0].numpy(), src.load_raw(j)["mask"])
    assert next(iter(dm.train_dataloader()))["image"].shape[-2:] == (4, 4)
    with pytest.raises(ValueError, match="tile_eval"):
        WeakSegDataModule(tiles=2, tile_eval="whole")
