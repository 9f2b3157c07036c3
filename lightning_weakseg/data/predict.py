"""New images in: a folder of images without labels, of any size, read and resized as in training.

``WeakSegDataModule(predict_dir="new_images/")`` serves :class:`PredictDataset` from ``predict_dataloader``. Each
sample holds

* ``image`` — the base view the model was trained on (the training ``resize`` to ``image_size``; letterbox by
  default), float (C,H,W) in [0, 1];
* ``orig_size`` ``[H0, W0]`` and ``content`` ``[top, left, h, w]`` — the geometry that maps a prediction in the
  base view back to the file's pixels (:func:`lightning_weakseg.inference.to_native`);
* ``native_image`` — the image at the file's own size (C,H0,W0), for ``predict_scale="native"``; collated by
  :func:`predict_collate` as a list, like ``boxes``;
* ``id`` — the file stem, the name the mask is written under (:class:`~lightning_weakseg.callbacks.MaskWriter`).

Reading and colour handling are those of :func:`~lightning_weakseg.data.folder.read_image` (``color_mode``), and
the channel count is checked against ``in_channels`` with an error that names the file.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from ..errors import WeakSegDataError
from .batch import collate
from .dataset import WeakSegDataset
from .folder import IMAGE_EXTS, read_image

__all__ = ["PredictDataset", "predict_collate"]


class PredictDataset(WeakSegDataset):
    """The images of ``root`` (sorted by name; extensions of :data:`~lightning_weakseg.data.folder.IMAGE_EXTS`),
    no labels.

    Args:
        root: the image folder.
        in_channels: channels the model expects (after ``color_mode``).
        image_size, resize: the base view, as in training (see :mod:`~lightning_weakseg.data.geometry`).
        color_mode: ``"auto"``, ``"rgb"`` or ``"gray"``, as in training.
        keep_native: also return ``native_image`` (the unresized image); off saves memory when only the
            training scale is used.
        ids: optional subset of file stems.
        num_classes: only for the shared checks (no labels are read).
    """

    def __init__(self, root: str | Path, in_channels: int, image_size: int | Sequence[int] = 64,
                 resize: str = "longest", color_mode: str = "auto", keep_native: bool = True,
                 ids: Sequence[str] | None = None, num_classes: int = 2):
        super().__init__(num_classes=num_classes, in_channels=in_channels, image_size=image_size, labels=(),
                         augment="none", resize=resize)
        self.root = Path(root)
        if not self.root.is_dir():
            raise WeakSegDataError(f"image folder {self.root} does not exist", None, "predict_dir")
        files = sorted(p for p in self.root.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTS)
        if ids is not None:
            wanted = set(ids)
            files = [p for p in files if p.stem in wanted]
        if not files:
            raise WeakSegDataError(f"no image files ({', '.join(IMAGE_EXTS)}) in {self.root}", None, "predict_dir")
        stems = [p.stem for p in files]
        dup = sorted({s for s in stems if stems.count(s) > 1})
        if dup:
            # one mask is written per stem: two files of one stem would overwrite each other's mask
            raise WeakSegDataError(f"several image files share the stems {dup[:5]} (e.g. a.png and a.jpg); "
                                   "masks are named by stem", None, "predict_dir")
        self.files, self.ids = files, stems
        self.color_mode, self.keep_native = color_mode, keep_native

    def raw_length(self) -> int:
        return len(self.files)

    def sample_id(self, i: int) -> str:
        return self.ids[i]

    def load_raw(self, i: int) -> dict:
        return {"image": read_image(self.files[i], self.color_mode)}

    def _getitem(self, i: int) -> dict[str, Any]:
        raw_i = self.raw_index(int(i))
        name = self.sample_id(raw_i)
        raw = self.load_raw(raw_i)
        self.check_raw(raw, str(self.files[raw_i]))
        return self.unlabelled_sample(raw, name, raw_i, self.keep_native)


def predict_collate(samples: Sequence[dict]) -> dict[str, Any]:
    """:func:`~lightning_weakseg.data.batch.collate` plus ``native_image`` as a list of B (C,H0_i,W0_i)."""
    native = [s.get("native_image") for s in samples]
    batch = collate([{k: v for k, v in s.items() if k != "native_image"} for s in samples])
    if any(n is not None for n in native):
        if any(n is None for n in native):
            raise WeakSegDataError("some samples of the batch carry 'native_image' and some do not",
                                   batch["id"], "native_image")
        batch["native_image"] = [torch.as_tensor(n).float() for n in native]
    return batch
