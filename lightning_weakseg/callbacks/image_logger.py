"""``SegmentationImageLogger``: image | ground truth | prediction panels of a few validation samples per epoch."""
from __future__ import annotations

from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_only

__all__ = ["SegmentationImageLogger", "colorize", "log_image", "panel", "weak_label_panel"]

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



def log_image(loggers, tag: str, image: np.ndarray, step: int) -> bool:
    """Give an H × W × 3 uint8 image to Lightning loggers: TensorBoard's ``add_image`` or any logger's
    ``log_image``. Returns whether one took it."""
    logged = False
    for logger in loggers or ():
        exp = getattr(logger, "experiment", None)
        if hasattr(exp, "add_image"):
            exp.add_image(tag, image, step, dataformats="HWC")
            logged = True
        elif hasattr(logger, "log_image"):
            logger.log_image(key=tag, images=[image], step=step)
            logged = True
    return logged

class SegmentationImageLogger(L.Callback):
    """Every ``every_n_epochs`` validation epochs, log a grid (one row per sample: image | mask | prediction) of
    the first ``num_samples`` samples of the first validation batch; with ``weak_labels`` (default), also a grid
    of the first training batch: image | the weak label it trained on (:func:`weak_label_panel`: boxes drawn,
    points, scribbles, tags as a caption) | prediction, under ``weak_tag``.

    Where it goes: ``TensorBoardLogger`` → ``add_image("val/predictions", ...)``; any logger with
    ``log_image`` (W&B, Neptune, MLflow adapters) → that; otherwise a PNG under
    ``<trainer.log_dir or default_root_dir>/images/epoch_<e>.png``. Rank zero only.
    """

    def __init__(self, num_samples: int = 4, every_n_epochs: int = 1, tag: str = "val/predictions",
                 weak_labels: bool = True, weak_tag: str = "train/weak_labels"):
        if num_samples < 1 or every_n_epochs < 1:
            raise ValueError("num_samples and every_n_epochs must be >= 1")
        self.num_samples, self.every_n_epochs, self.tag = num_samples, every_n_epochs, tag
        self.weak_labels, self.weak_tag = weak_labels, weak_tag
        self.last_path: Path | None = None
        self.last_weak_path: Path | None = None
        self.last_weak_grid: np.ndarray | None = None

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        if batch_idx != 0 or trainer.sanity_checking or trainer.current_epoch % self.every_n_epochs:
            return
        self._log(trainer, pl_module, batch)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if not self.weak_labels or batch_idx != 0 or trainer.current_epoch % self.every_n_epochs:
            return
        self._log_weak(trainer, pl_module, batch)

    @rank_zero_only
    def _log_weak(self, trainer, pl_module, batch):
        n = min(self.num_samples, batch["image"].shape[0])
        was_training = pl_module.training
        pl_module.eval()  # no batch-norm statistics updated by a picture
        try:
            with torch.no_grad():
                pred = pl_module(batch["image"][:n])["probs"].argmax(1)
        finally:
            pl_module.train(was_training)
        rows = [np.concatenate([_image_rgb(batch["image"][i]), weak_label_panel(batch, i), colorize(pred[i])], 1)
                for i in range(n)]
        self.last_weak_grid = np.concatenate(rows, 0)
        self.last_weak_path = self._emit(trainer, self.last_weak_grid, self.weak_tag, "weak")

    @rank_zero_only
    def _log(self, trainer, pl_module, batch):
        n = min(self.num_samples, batch["image"].shape[0])
        with torch.no_grad():
            pred = pl_module(batch["image"][:n])["probs"].argmax(1)
        target = batch.get("mask")
        rows = [panel(batch["image"][i], None if target is None else target[i], pred[i]) for i in range(n)]
        grid = np.concatenate(rows, axis=0)
        path = self._emit(trainer, grid, self.tag, "epoch")
        if path is not None:
            self.last_path = path

    def _emit(self, trainer, grid: np.ndarray, tag: str, prefix: str) -> Path | None:
        if log_image(trainer.loggers, tag, grid, trainer.global_step):
            return None
        import cv2
        root = Path(trainer.log_dir or trainer.default_root_dir) / "images"
        root.mkdir(parents=True, exist_ok=True)
        name = f"epoch_{trainer.current_epoch:03d}.png" if prefix == "epoch" else \
            f"{prefix}_epoch_{trainer.current_epoch:03d}.png"
        path = root / name
        cv2.imwrite(str(path), grid[..., ::-1])
        return path


def weak_label_panel(batch: dict, i: int) -> np.ndarray:
    """The label sample ``i`` of a training batch trained on, as a picture uint8 (H,W,3): its dense label map
    (mask, noisy mask, scribble or pseudo label; unknown grey), boxes drawn as rectangles and points as dots in
    their class colour, and the image-level tags written in the corner."""
    import cv2
    H, W = batch["image"].shape[-2:]
    canvas = np.zeros((H, W, 3), np.uint8)
    for key in ("mask", "noisy_mask", "scribble", "pseudo"):
        if key in batch and bool(batch.get(f"has_{key}", torch.ones(1, dtype=torch.bool).expand(i + 1))[i]):
            canvas = colorize(batch[key][i]).copy()
            break
    else:
        canvas[:] = UNKNOWN // 2
    if "boxes" in batch and bool(batch.get("has_boxes", torch.ones(i + 1, dtype=torch.bool))[i]):
        for c, x0, y0, x1, y1 in batch["boxes"][i].tolist():
            colour = tuple(int(v) for v in PALETTE[int(c) % len(PALETTE)])
            cv2.rectangle(canvas, (int(round(x0)), int(round(y0))), (int(round(x1)) - 1, int(round(y1)) - 1), colour, 1)
    if "points" in batch and bool(batch.get("has_points", torch.ones(i + 1, dtype=torch.bool))[i]):
        for c, y, x in batch["points"][i].tolist():
            colour = tuple(int(v) for v in PALETTE[int(c) % len(PALETTE)])
            cv2.circle(canvas, (int(x), int(y)), max(1, H // 64), colour, -1)
    if "tags" in batch and bool(batch.get("has_tags", torch.ones(i + 1, dtype=torch.bool))[i]):
        present = [str(c) for c in torch.nonzero(batch["tags"][i] > 0).flatten().tolist() if c > 0]
        cv2.putText(canvas, "tags:" + (",".join(present) or "-"), (1, max(8, H // 8)), cv2.FONT_HERSHEY_PLAIN,
                    max(0.5, H / 256), (255, 255, 255), 1, cv2.LINE_AA)
    return canvas
