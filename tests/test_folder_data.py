"""FolderDataset reads user folders and names file and field on bad input."""
import json

import cv2
import numpy as np
import pytest

from lightning_weakseg.data import FolderDataset, WeakSegDataError, WeakSegDataModule


def write_set(root, n=6, size=(20, 24), channels=3):
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    (root / "scribbles").mkdir()
    rng = np.random.default_rng(0)
    boxes = {}
    for i in range(n):
        img = rng.integers(0, 255, (*size, channels), dtype=np.uint8) if channels > 1 else \
            rng.integers(0, 255, size, dtype=np.uint8)
        mask = np.zeros(size, np.uint8)
        mask[4:10, 5:15] = 1
        scrib = np.full(size, 255, np.uint8)
        scrib[6, 6:12] = 1
        scrib[15, 2:20] = 0
        cv2.imwrite(str(root / "images" / f"p{i // 2:02d}_s{i}.png"), img)
        cv2.imwrite(str(root / "masks" / f"p{i // 2:02d}_s{i}.png"), mask)
        cv2.imwrite(str(root / "scribbles" / f"p{i // 2:02d}_s{i}.png"), scrib)
        boxes[f"p{i // 2:02d}_s{i}"] = [[5, 4, 15, 10]]
    (root / "boxes.json").write_text(json.dumps(boxes))
    return root


def test_reads_layout_and_resizes_boxes(tmp_path):
    root = write_set(tmp_path)
    ds = FolderDataset(root, scribble_dir="scribbles", boxes_json="boxes.json", num_classes=2, in_channels=3,
                       image_size=(40, 48), labels=("mask", "scribble", "boxes"))
    s = ds[0]
    assert s["image"].shape == (3, 40, 48)
    assert s["boxes"].tolist() == [[1, 10, 8, 30, 20]]   # scaled by 2 with the image
    ys, xs = np.nonzero(s["mask"].numpy() == 1)
    assert (ys.min(), ys.max() + 1, xs.min(), xs.max() + 1) == (8, 20, 10, 30)  # the box stays tight
    assert set(np.unique(s["scribble"].numpy())) == {0, 1, 255}


def test_split_by_group_never_splits_a_patient(tmp_path):
    root = write_set(tmp_path, n=12)
    dm = WeakSegDataModule(source="folder", root=str(root), num_classes=2, in_channels=3, image_size=16,
                           group_regex=r"^(p\d+)", val_fraction=0.34)
    dm.setup()
    pat = lambda ds, idx: {ds.ids[i][:3] for i in idx}
    assert not pat(dm.full_dataset, dm.split["train"]) & pat(dm.full_dataset, dm.split["val"])
    assert len(dm.split["val"]) == 4


def test_unreadable_image_names_the_file(tmp_path):
    root = write_set(tmp_path)
    (root / "images" / "p00_s0.png").write_bytes(b"not a png")
    ds = FolderDataset(root, num_classes=2, in_channels=3, image_size=16)
    with pytest.raises(WeakSegDataError) as e:
        ds[0]
    assert "p00_s0.png" in str(e.value) and e.value.field == "image"


def test_mask_of_other_size_names_file_and_field(tmp_path):
    root = write_set(tmp_path)
    cv2.imwrite(str(root / "masks" / "p00_s1.png"), np.zeros((5, 5), np.uint8))
    ds = FolderDataset(root, num_classes=2, in_channels=3, image_size=16)
    with pytest.raises(WeakSegDataError) as e:
        ds[1]
    assert "p00_s1" in str(e.value) and e.value.field == "mask"


def test_mask_values_out_of_range_and_mask_map(tmp_path):
    root = write_set(tmp_path)
    cv2.imwrite(str(root / "masks" / "p00_s0.png"), np.full((20, 24), 255, np.uint8) * 0 + 200)
    with pytest.raises(WeakSegDataError) as e:
        FolderDataset(root, num_classes=2, in_channels=3, image_size=16)[0]
    assert e.value.field == "mask" and "200" in str(e.value)
    ds = FolderDataset(root, num_classes=2, in_channels=3, image_size=16, mask_map={200: 1}, resize="stretch")
    assert ds[0]["mask"].unique().tolist() == [1]


def test_wrong_channel_count_and_color_mode(tmp_path):
    root = write_set(tmp_path, channels=1)
    with pytest.raises(WeakSegDataError) as e:
        FolderDataset(root, num_classes=2, in_channels=3, image_size=16)[0]
    assert e.value.field == "image" and "channel" in str(e.value)
    assert FolderDataset(root, num_classes=2, in_channels=3, image_size=16, color_mode="rgb")[0]["image"].shape[0] == 3


def test_bad_box_in_json_names_the_sample(tmp_path):
    root = write_set(tmp_path)
    boxes = json.loads((root / "boxes.json").read_text())
    boxes["p00_s0"] = [[5, 4, 30, 10]]  # x1 beyond the 24-px width
    (root / "boxes.json").write_text(json.dumps(boxes))
    ds = FolderDataset(root, boxes_json="boxes.json", num_classes=2, in_channels=3, image_size=16, labels=("boxes",))
    with pytest.raises(WeakSegDataError) as e:
        ds[0]
    assert e.value.sample == "p00_s0" and e.value.field == "boxes"
