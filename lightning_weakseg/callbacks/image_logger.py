"""``SegmentationImageLogger``: image | ground truth | prediction panels of a few validation samples per epoch."""
from __future__ import annotations

from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_only

__all__ = ["SegmentationImageLogger", "colorize", "panel"]

# background black, then well separated colours; 255 (unknown) grey
PALETTE = np.array([[0, 0, 0], [230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48],
                    [145, 30, 180], [70, 240, 240], [240, 50, 230], [210, 245, 60]], dtype=np.uint8)
UNKNOWN = np.array([128, 128, 128], dtype=np.uint8)


def colorize(labels: torch.Tensor) -> np.ndarray:
    """long (H,W) class map → uint8 (H,W,3); 255 is grey, classes beyond the palette cycle through it."""
    lab = labels.detach().cpu().long().numpy()
    out = PALETTE[np.where(lab == 255, 0, lab) % len(PALETTE)]
    out[lab == 255] = UNKNOWN
    return out


def _image_rgb(image: torch.Tensor) -> np.ndarray:
    img = image.detach().float().cpu()
    lo, hi = img.min(), img.max()
    img = (img - lo) / (hi - lo).clamp_min(1e-8)  # display only: stretch to [0, 1]
    img = (img * 255).round().byte()
    if img.shape[0] == 1:
        img = img.expand(3, -1, -1)
    return img[:3].permute(1, 2, 0).numpy()


def panel(image: torch.Tensor, target: torch.Tensor | None, pred: torch.Tensor) -> np.ndarray:
    """One row: image | target (if any) | prediction, uint8 (H, n·W, 3)."""
    cols = [_image_rgb(image)]
    if target is not None:
        cols.append(colorize(target))
    cols.append(colorize(pred))
    return np.concatenate(cols, axis=1)


class SegmentationImageLogger(L.Callback):
    """Every ``every_n_epochs`` validation epochs, log a grid (one row per sample: image | mask | prediction) of
    the first ``num_samples`` samples of the first validation batch.

    Where it goes: ``TensorBoardLogger`` → ``add_image("val/predictions", ...)``; any logger with
    ``log_image`` (W&B, Neptune, MLflow adapters) → that; otherwise a PNG under
    ``<trainer.log_dir or default_root_dir>/images/epoch_<e>.png``. Rank zero only.
    """

    def __init__(self, num_samples: int = 4, every_n_epochs: int = 1, tag: str = "val/predictions"):
        if num_samples < 1 or every_n_epochs < 1:
            raise ValueError("num_samples and every_n_epochs must be >= 1")
        self.num_samples, self.every_n_epochs, self.tag = num_samples, every_n_epochs, tag
        self.last_path: Path | None = None

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        if batch_idx != 0 or trainer.sanity_checking or trainer.current_epoch % self.every_n_epochs:
            return
        self._log(trainer, pl_module, batch)

    @rank_zero_only
    def _log(self, trainer, pl_module, batch):
        n = min(self.num_samples, batch["image"].shape[0])
        with torch.no_grad():
            pred = pl_module(batch["image"][:n])["probs"].argmax(1)
        target = batch.get("mask")
        rows = [panel(batch["image"][i], None if target is None else target[i], pred[i]) for i in range(n)]
        grid = np.concatenate(rows, axis=0)
        step, logged = trainer.global_step, False
        for logger in trainer.loggers:
            exp = getattr(logger, "experiment", None)
            if hasattr(exp, "add_image"):
                exp.add_image(self.tag, grid, step, dataformats="HWC")
                logged = True
            elif hasattr(logger, "log_image"):
                logger.log_image(key=self.tag, images=[grid], step=step)
                logged = True
        if not logged:
            import cv2
            root = Path(trainer.log_dir or trainer.default_root_dir) / "images"
            root.mkdir(parents=True, exist_ok=True)
            self.last_path = root / f"epoch_{trainer.current_epoch:03d}.png"
            cv2.imwrite(str(self.last_path), grid[..., ::-1])
