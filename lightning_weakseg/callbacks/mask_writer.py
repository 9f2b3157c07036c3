"""``MaskWriter``: one label map per predicted image, at the image's own height × width; one NIfTI label volume per
predicted volume, on the input's voxel grid."""
from __future__ import annotations

import os
import tempfile
import warnings
from pathlib import Path
from typing import Any, Sequence

import cv2
import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import BasePredictionWriter

from .image_logger import PALETTE

__all__ = ["MaskWriter"]

PROBABILITY_FORMATS = ("npy", "png16")
_UMASK = os.umask(0)
os.umask(_UMASK)


def _atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and ``os.replace``: a reader (or a
    run killed half-way) never sees a partial file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp's 0600 would make the result private
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _png(array: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", array)
    if not ok:  # pragma: no cover - cv2 encodes any uint8/uint16 array of 1, 3 or 4 channels
        raise RuntimeError(f"cannot encode an array of shape {array.shape} {array.dtype} as PNG")
    return buf.tobytes()


class MaskWriter(BasePredictionWriter):
    """Write ``trainer.predict`` results of :class:`~lightning_weakseg.WeakSegModule` to files, one per image,
    named by the sample ``id`` (for folder data: the file stem):

    * ``<output_dir>/<id>.png`` — uint8 class ids in ``[0, num_classes)``, at the input image's original
      height × width;
    * ``probabilities="npy"`` (or ``True``): ``<output_dir>/probs/<id>.npy``, float16 (K,H,W);
      ``"png16"``: ``<output_dir>/probs/<id>_<k>.png``, one 16-bit PNG per class, probability × 65535;
    * ``overlay=True``: ``<output_dir>/overlay/<id>.png``, the image with the classes ≥ 1 blended in colour.

    Slices of volumes (predictions carrying ``volume`` and ``slice``, e.g. from ``WeakSegDataModule(source=
    "volumes", predict_dir=...)``) are collected per volume instead; once all its slices are in, the volume is
    written as ``<output_dir>/<file name of the input>`` (``<name>.nii.gz``) with the input's affine and header,
    uint8 class ids on the input's voxel grid (each slice's labels are already at the slice's own size:
    :meth:`~lightning_weakseg.WeakSegModule.predict_step` maps them back). The prediction data set must describe its
    volumes (``volume_meta(name)``, as :class:`~lightning_weakseg.data.volumes.VolumeDataset` does). Probability and
    overlay files are written for 2D images only.

    Every file is written atomically (temporary file + ``os.replace``). Under DDP each rank writes the images it
    predicted, each exactly once (filler samples that even out the shards are never in the predictions), and
    nothing is gathered: ``trainer.predict(..., return_predictions=False)`` keeps memory flat. For volumes the data
    module gives each rank whole volumes (:class:`~lightning_weakseg.data.volumes.WholeVolumeSampler`), so a rank
    writes the volumes it predicted, also without gathering; a volume still incomplete at the end of prediction
    (its slices spread over ranks, or cut by ``limit_predict_batches``) is not written, with a warning.

    Args:
        output_dir: the folder (created).
        probabilities: ``False``, ``True``/``"npy"`` or ``"png16"``.
        overlay: also write the colour preview.
        alpha: overlay opacity of the class colours.
        write_interval: ``"batch"`` (default: write as predictions come).

    Example::

        trainer = L.Trainer(callbacks=[MaskWriter("out/")])
        trainer.predict(model, WeakSegDataModule(..., predict_dir="new_images/"), return_predictions=False)
    """

    def __init__(self, output_dir: str | Path, probabilities: bool | str = False, overlay: bool = False,
                 alpha: float = 0.5, write_interval: str = "batch"):
        if write_interval != "batch":
            raise ValueError("MaskWriter writes each batch as it comes: write_interval must be 'batch' (an epoch "
                             "interval would need every prediction in memory)")
        super().__init__(write_interval)
        if probabilities is True:
            probabilities = "npy"
        if probabilities not in (False, None, *PROBABILITY_FORMATS):
            raise ValueError(f"probabilities must be False, True, 'npy' or 'png16', got {probabilities!r}")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        self.output_dir = Path(output_dir)
        self.probabilities = probabilities or None
        self.overlay = bool(overlay)
        self.alpha = float(alpha)
        self.written: list[Path] = []  # the label maps this process wrote
        self._volumes: dict[tuple[int, str], dict] = {}  # volumes whose slices are still coming in
        self._warned_volume_extras = False

    def mask_path(self, sample_id: str) -> Path:
        return self.output_dir / f"{sample_id}.png"

    def write_on_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, prediction: Any,
                           batch_indices: Sequence[int] | None, batch: Any, batch_idx: int,
                           dataloader_idx: int) -> None:
        if prediction is None:
            return
        if not isinstance(prediction, dict) or "labels" not in prediction or "id" not in prediction:
            raise TypeError("MaskWriter expects predict_step to return WeakSegModule's dict with per-image "
                            f"'labels' and 'id', got {type(prediction).__name__}")
        labels, ids = prediction["labels"], prediction["id"]
        probs = prediction.get("probs")
        if len(labels) != len(ids):
            raise ValueError(f"predict_step returned {len(labels)} label maps for {len(ids)} ids")
        if prediction.get("volume") is not None:
            self._add_slices(trainer, prediction, dataloader_idx)
            return
        positions = self._batch_positions(batch, ids)
        for j, (lab, sid) in enumerate(zip(labels, ids)):
            self._write_one(str(sid), lab, None if probs is None else probs[j], batch, positions.get(str(sid)),
                            pl_module)

    # ---- volumes ----
    @staticmethod
    def _volume_source(trainer: L.Trainer, dataloader_idx: int):
        loaders = trainer.predict_dataloaders
        if isinstance(loaders, dict):
            loaders = list(loaders.values())
        loader = loaders[dataloader_idx] if isinstance(loaders, (list, tuple)) else loaders
        ds = getattr(loader, "dataset", None)
        if ds is None or not hasattr(ds, "volume_meta"):
            raise TypeError("MaskWriter got slices of volumes but the prediction data set does not describe its "
                            f"volumes (volume_meta(name)); got {type(ds).__name__}. Use WeakSegDataModule("
                            "source='volumes', predict_dir=...) or a lightning_weakseg.data.VolumeDataset")
        return ds

    def _add_slices(self, trainer: L.Trainer, prediction: dict, dataloader_idx: int) -> None:
        if (self.probabilities or self.overlay) and not self._warned_volume_extras:
            self._warned_volume_extras = True
            warnings.warn("MaskWriter: probability and overlay files are written for 2D images only; the volumes "
                          "get their label files", stacklevel=2)
        ds = None
        for lab, name, k in zip(prediction["labels"], prediction["volume"], prediction["slice"]):
            key = (dataloader_idx, str(name))
            entry = self._volumes.get(key)
            if entry is None:
                ds = ds or self._volume_source(trainer, dataloader_idx)
                entry = self._volumes[key] = {"meta": ds.volume_meta(str(name)), "slices": {}}
            lab = lab.detach().cpu()
            if int(lab.min()) < 0 or int(lab.max()) > 255:
                raise ValueError(f"{name} slice {int(k)}: class ids {int(lab.min())}..{int(lab.max())} do not fit "
                                 "uint8")
            entry["slices"][int(k)] = lab.to(torch.uint8).numpy()
            if len(entry["slices"]) == entry["meta"]["slices"]:
                self._write_volume(entry)
                del self._volumes[key]

    def _write_volume(self, entry: dict) -> None:
        from ..data.volumes import volume_bytes

        meta, slices = entry["meta"], entry["slices"]
        labels = np.stack([slices[k] for k in sorted(slices)])
        path = self.output_dir / Path(meta["file"]).name
        _atomic_write(path, volume_bytes(labels, meta))
        self.written.append(path)

    def on_predict_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_predict_epoch_end(trainer, pl_module)
        if self._volumes:
            left = sorted(f"{name} ({len(e['slices'])} of {e['meta']['slices']} slices)"
                          for (_, name), e in self._volumes.items())
            warnings.warn(f"MaskWriter: rank {trainer.global_rank}: {len(left)} volume(s) incomplete at the end of "
                          f"prediction, not written: {left[:5]}", stacklevel=2)
            self._volumes.clear()

    @staticmethod
    def _batch_positions(batch: Any, ids: Sequence[str]) -> dict[str, int]:
        """Where each predicted id sits in the batch (for the overlay's image), skipping filler samples."""
        if not isinstance(batch, dict) or batch.get("id") is None:
            return {}
        pad = batch.get("pad")
        return {str(s): i for i, s in enumerate(batch["id"]) if pad is None or not bool(pad[i])}

    def _write_one(self, sid: str, labels: torch.Tensor, probs: torch.Tensor | None, batch: Any,
                   position: int | None, pl_module: L.LightningModule) -> None:
        lab = labels.detach().cpu()
        if lab.ndim != 2:
            raise ValueError(f"{sid}: expected a (H,W) label map, got shape {tuple(lab.shape)}")
        num_classes = getattr(pl_module, "num_classes", None)
        if (num_classes or 0) > 256 or int(lab.max()) > 255 or int(lab.min()) < 0:
            raise ValueError(f"{sid}: class ids {int(lab.min())}..{int(lab.max())} do not fit a uint8 PNG")
        lab8 = lab.to(torch.uint8).numpy()
        path = self.mask_path(sid)
        _atomic_write(path, _png(lab8))
        self.written.append(path)
        if self.probabilities and probs is not None:
            p = probs.detach().float().cpu().clamp(0, 1).numpy()
            if self.probabilities == "npy":
                import io
                buf = io.BytesIO()
                np.save(buf, p.astype(np.float16))
                _atomic_write(self.output_dir / "probs" / f"{sid}.npy", buf.getvalue())
            else:
                for k in range(p.shape[0]):
                    _atomic_write(self.output_dir / "probs" / f"{sid}_{k}.png",
                                  _png(np.round(p[k] * 65535).astype(np.uint16)))
        if self.overlay:
            image = self._native_image(batch, position, lab8.shape)
            _atomic_write(self.output_dir / "overlay" / f"{sid}.png", _png(self._blend(image, lab8)))

    @staticmethod
    def _native_image(batch: Any, position: int | None, shape: tuple[int, int]) -> np.ndarray | None:
        """The input image at the label map's size, uint8 RGB (H,W,3), or None if the batch does not hold it."""
        if position is None or not isinstance(batch, dict):
            return None
        if batch.get("native_image") is not None:
            img = batch["native_image"][position]
        else:  # the base view: crop its content and resize it back
            img = batch["image"][position]
            if batch.get("content") is not None:
                top, left, h, w = (int(v) for v in batch["content"][position])
                img = img[:, top:top + h, left:left + w]
        img = img.detach().float().cpu()
        if tuple(img.shape[-2:]) != tuple(shape):
            img = torch.nn.functional.interpolate(img[None], size=shape, mode="bilinear", align_corners=False)[0]
        img = (img.clamp(0, 1) * 255).round().byte()
        if img.shape[0] == 1:
            img = img.expand(3, -1, -1)
        return img[:3].permute(1, 2, 0).numpy()

    def _blend(self, image: np.ndarray | None, labels: np.ndarray) -> np.ndarray:
        colours = PALETTE[labels % len(PALETTE)].astype(np.float32)
        if image is None:
            out = colours
        else:
            fg = (labels > 0)[..., None]
            out = np.where(fg, (1 - self.alpha) * image + self.alpha * colours, image)
        return cv2.cvtColor(np.round(out).astype(np.uint8), cv2.COLOR_RGB2BGR)
