"""SegmentationImageLogger: the logged panels are the image, the colour-coded mask and the model's argmax."""
import cv2
import lightning as L
import numpy as np
import torch

from lightning_weakseg import WeakSegModule
from lightning_weakseg.callbacks import SegmentationImageLogger
from lightning_weakseg.callbacks.image_logger import PALETTE, UNKNOWN, colorize
from lightning_weakseg.data import WeakSegDataModule


def test_colorize_by_hand():
    lab = torch.tensor([[0, 1], [255, 11]])
    got = colorize(lab)
    assert (got[0, 0] == PALETTE[0]).all() and (got[0, 1] == PALETTE[1]).all()
    assert (got[1, 0] == UNKNOWN).all() and (got[1, 1] == PALETTE[11 % len(PALETTE)]).all()


def test_png_panels_match_mask_and_prediction(tmp_path):
    L.seed_everything(0)
    dm = WeakSegDataModule(synthetic_kind="organ", n_samples=10, image_size=32, batch_size=4, eval_batch_size=2)
    model = WeakSegModule(in_channels=1, num_classes=4, encoder="resnet18")
    cb = SegmentationImageLogger(num_samples=2)
    tr = L.Trainer(max_epochs=1, limit_train_batches=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                   default_root_dir=tmp_path, callbacks=[cb], enable_progress_bar=False, num_sanity_val_steps=0)
    tr.fit(model, dm)
    grid = cv2.imread(str(cb.last_path))[..., ::-1]
    assert grid.shape == (64, 96, 3)  # 2 samples × (image | mask | prediction) at 32 px
    batch = next(iter(dm.val_dataloader()))
    model.eval()
    with torch.no_grad():
        pred = model(batch["image"])["probs"].argmax(1)
    for i in range(2):
        row = grid[32 * i:32 * (i + 1)]
        assert (row[:, 32:64] == colorize(batch["mask"][i])).all()
        assert (row[:, 64:96] == colorize(pred[i])).all()


def test_weak_label_panel_draws_boxes_points_and_scribbles():
    from lightning_weakseg.callbacks.image_logger import weak_label_panel
    img = torch.zeros(2, 1, 16, 16)
    sc = torch.full((2, 16, 16), 255)
    sc[1, 3, 2:9] = 2
    batch = {"image": img, "boxes": [torch.tensor([[1., 2., 3., 10., 8.]]), torch.zeros(0, 5)],
             "has_boxes": torch.tensor([True, False]), "scribble": sc, "has_scribble": torch.tensor([False, True]),
             "points": [torch.tensor([[3., 12., 5.]]), torch.zeros(0, 3)], "has_points": torch.tensor([True, False])}
    p0 = weak_label_panel(batch, 0)
    # the box's outline (columns 2..9, rows 3..7) in class 1's colour, its inside untouched
    assert (p0[3, 2:10] == PALETTE[1]).all() and (p0[7, 2:10] == PALETTE[1]).all() and (p0[3:8, 2] == PALETTE[1]).all()
    assert not (p0[5, 5] == PALETTE[1]).all()
    assert (p0[12, 5] == PALETTE[3]).all()               # the point
    p1 = weak_label_panel(batch, 1)
    assert (p1[3, 2:9] == PALETTE[2]).all() and (p1[0, 0] == UNKNOWN).all()   # the scribble, unknown grey


def test_weak_label_grid_is_logged_from_the_training_batch(tmp_path):
    from lightning_weakseg.regimes import BoxSegModule
    L.seed_everything(0)
    dm = WeakSegDataModule(synthetic_kind="organ", n_samples=10, image_size=32, batch_size=4, train_labels=["boxes"],
                           augment="none", shuffle=False)
    model = BoxSegModule(in_channels=1, num_classes=4)
    cb = SegmentationImageLogger(num_samples=2)
    tr = L.Trainer(max_epochs=1, limit_train_batches=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                   default_root_dir=tmp_path, callbacks=[cb], enable_progress_bar=False, num_sanity_val_steps=0)
    tr.fit(model, dm)
    grid = cv2.imread(str(cb.last_weak_path))[..., ::-1]
    assert grid.shape == (64, 96, 3)
    batch = next(iter(dm.train_dataloader()))
    from lightning_weakseg.callbacks.image_logger import weak_label_panel
    assert (grid[:32, 32:64] == weak_label_panel(batch, 0)).all()
