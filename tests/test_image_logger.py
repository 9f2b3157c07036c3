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
