"""Tiles: every image of a data set cut into a grid of tiles, each tile a sample with its own labels.

Image-level tags are only informative when some images lack a class: every Kvasir image holds a polyp, but a
quarter of it often does not. ``TiledDataset(source, grid=2)`` resizes each image of ``source`` to
``grid·H × grid·W`` (``source.image_hw`` must be that size) and cuts it into ``grid × grid`` tiles of
``H × W``; weak labels (tags, boxes, points, ...) are then derived per tile from the tile's mask. The tiles of
one image share its split group, so they never straddle train and validation.

Boxes given with the data are shifted into each tile and clipped to it; a box that does not reach into a tile
is not part of that tile (it belongs to the tiles it overlaps). A clipped box is not tight on a cut edge.
"""
from __future__ import annotations

import numpy as np

from .dataset import WeakSegDataset

__all__ = ["TiledDataset"]


class TiledDataset(WeakSegDataset):
    """``grid × grid`` tiles of each image of ``source``; tile ``t`` of image ``j`` is raw index ``j·grid² + t``
    (row-major), with id ``"<image id>@r<row>c<col>"``.

    Args:
        source: the data set to tile; its base view (``image_size``) must be ``grid`` times this one's.
        grid: tiles per side (≥ 1).
        Other arguments: see :class:`~lightning_weakseg.data.dataset.WeakSegDataset` (``image_size`` = the
            tile size; ``num_classes`` / ``in_channels`` default to the source's).
    """

    def __init__(self, source: WeakSegDataset, grid: int, **kwargs):
        if int(grid) != grid or grid < 1:
            raise ValueError(f"grid must be a positive integer, got {grid!r}")
        kwargs.setdefault("num_classes", source.num_classes)
        kwargs.setdefault("in_channels", source.in_channels)
        super().__init__(**kwargs)
        self.source, self.grid = source, int(grid)
        H, W = self.image_hw
        if tuple(source.image_hw) != (H * self.grid, W * self.grid):
            raise ValueError(f"the source's base view is {tuple(source.image_hw)}, expected "
                             f"{(H * self.grid, W * self.grid)} = grid {self.grid} × tile {(H, W)}")

    def raw_length(self) -> int:
        return self.source.raw_length() * self.grid ** 2

    def _where(self, i: int) -> tuple[int, int, int]:
        j, t = divmod(int(i), self.grid ** 2)
        return (j, *divmod(t, self.grid))

    def sample_id(self, i: int) -> str:
        j, r, c = self._where(i)
        return f"{self.source.sample_id(j)}@r{r}c{c}"

    def groups(self, regex: str | None = None) -> list[str]:
        """The source image's split group for every tile (sources without ``groups``: one group per image)."""
        base = self.source.groups(regex) if hasattr(self.source, "groups") else \
            [str(j) for j in range(self.source.raw_length())]
        return [g for g in base for _ in range(self.grid ** 2)]

    def load_raw(self, i: int) -> dict:
        j, r, c = self._where(i)
        src_id = self.source.sample_id(j)
        raw = self.source.load_raw(j)
        self.source.check_raw(raw, src_id)  # in the file's geometry: errors name its own coordinates
        raw = self.source._resize(raw, src_id)
        H, W = self.image_hw
        ys, xs = slice(r * H, (r + 1) * H), slice(c * W, (c + 1) * W)
        out = {k: v[ys, xs] for k, v in raw.items() if k != "boxes" and not k.startswith("_") and v is not None}
        if raw.get("boxes") is not None:
            b = np.asarray(raw["boxes"], np.float32).reshape(-1, 5).copy()
            b[:, [1, 3]] = np.clip(b[:, [1, 3]] - c * W, 0, W)
            b[:, [2, 4]] = np.clip(b[:, [2, 4]] - r * H, 0, H)
            out["boxes"] = b[(b[:, 3] > b[:, 1]) & (b[:, 4] > b[:, 2])]
        return out
