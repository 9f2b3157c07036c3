"""Two data sets as one: the training split followed by a folder of images that have no label files.

``WeakSegDataModule(unlabelled_dir=...)`` trains on the labelled split and on every image of ``unlabelled_dir``
(always training, never validated on, no label of any kind). Both live in one :class:`JoinedDataset`, so that a
raw index names one image (pseudo labels, per-sample views and memories are keyed by it) and the training loop
sees one data set.
"""
from __future__ import annotations

from typing import Any

from .dataset import WeakSegDataset

__all__ = ["JoinedDataset"]


class JoinedDataset(WeakSegDataset):
    """Raw sample ``i < n`` is ``first``'s ``i``; raw sample ``n + j`` is ``second``'s ``j``
    (``n = first.raw_length()``). Ids of ``second`` get ``second_prefix`` (``"unlabelled/<id>"``: an image of the
    unlabelled folder never shares an id with a labelled one).

    Args:
        first, second: the two data sets (same base view, classes and channels).
        second_prefix: prepended to the ids of ``second``.
        Other arguments: see :class:`~lightning_weakseg.data.dataset.WeakSegDataset` (``num_classes``,
            ``in_channels``, ``image_size``, ``resize``, ``weakify`` and ``seed`` default to ``first``'s).
    """

    def __init__(self, first: WeakSegDataset, second: WeakSegDataset, second_prefix: str = "unlabelled/",
                 **kwargs):
        kwargs.setdefault("num_classes", first.num_classes)
        kwargs.setdefault("in_channels", first.in_channels)
        kwargs.setdefault("image_size", tuple(first.image_hw))
        kwargs.setdefault("resize", first.resize)
        kwargs.setdefault("weakify", first.weakify_kwargs)  # weak labels derived as the data derives them
        kwargs.setdefault("seed", first.seed)
        super().__init__(**kwargs)
        for name, a, b in (("num_classes", first.num_classes, second.num_classes),
                           ("in_channels", first.in_channels, second.in_channels),
                           ("image_hw", tuple(first.image_hw), tuple(second.image_hw))):
            if a != b:
                raise ValueError(f"JoinedDataset: {name} differs ({a} and {b})")
        self.first, self.second, self.second_prefix = first, second, second_prefix
        self.offset = first.raw_length()

    def _part(self, i: int) -> tuple[WeakSegDataset, int]:
        i = int(i)
        return (self.first, i) if i < self.offset else (self.second, i - self.offset)

    def raw_length(self) -> int:
        return self.offset + self.second.raw_length()

    def sample_id(self, i: int) -> str:
        ds, j = self._part(i)
        return ds.sample_id(j) if ds is self.first else self.second_prefix + ds.sample_id(j)

    def load_raw(self, i: int) -> dict:
        ds, j = self._part(i)
        return ds.load_raw(j)

    def sample_meta(self, i: int) -> dict[str, Any]:
        ds, j = self._part(i)
        return ds.sample_meta(j)

    def _getitem(self, i: int) -> dict[str, Any]:
        out = super()._getitem(i)
        out.update(self.sample_meta(self.raw_index(int(i))))
        return out
