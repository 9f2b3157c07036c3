"""Morphological clean-up steps of the point pseudo-labels (Qu et al.), on binary masks and Voronoi cells.

OpenCV where it gives the same result as the textbook (SciPy) operation; each function is checked against a slow
reference in tests/test_points.py."""
from __future__ import annotations

import cv2
import numpy as np

__all__ = []


def _disk(r: float) -> np.ndarray:
    """Structuring element {(dy, dx): dy² + dx² <= r²}, uint8."""
    R = int(np.floor(r))
    yy, xx = np.mgrid[-R:R + 1, -R:R + 1]
    return (yy * yy + xx * xx <= r * r).astype(np.uint8)


def _u8(mask: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(mask).view(np.uint8)


def _remove_small(mask: np.ndarray, min_size: int) -> np.ndarray:
    """Drop 4-connected objects with fewer than ``min_size`` pixels."""
    if min_size <= 1 or not mask.any():
        return mask
    n, lab = cv2.connectedComponents(_u8(mask), connectivity=4, ltype=cv2.CV_32S)
    keep = np.bincount(lab[mask], minlength=n) >= min_size  # object sizes (label 0, the background, is 0 here)
    keep[0] = False
    return keep.take(lab)


def _dilate_in_cells(mask, cells, r, pts):
    """Dilation by a disk of radius r inside the Voronoi cells: a pixel of cell c joins when a mask pixel of cell
    c lies within r. Each cell gets an id; the ids of the mask's cells are max- and min-filtered over the disk,
    and a pixel joins when either equals its own id. That misses a pixel only when the mask of three or more
    cells lies within r and its own id is strictly between the others', so it is done for two orderings of the
    ids (by the points' (y, x) and by their (x, y)): around a junction of cells, a cell is rarely the middle one
    in both. A missed pixel is left out (more conservative); no pixel ever joins from another cell's mask."""
    if r <= 0 or not mask.any():
        return mask
    disk = _disk(r)
    n = len(pts)
    if n >= 2 ** 24:
        raise ValueError("more than 2**24 points")
    dtype, none = (np.uint16, 65535) if n < 65535 else (np.float32, 2 ** 24)  # float32: integers < 2**24 exact
    out = None
    for order in (np.lexsort((pts[:, 1], pts[:, 0])), np.lexsort((pts[:, 0], pts[:, 1]))):
        lut = np.empty(n, dtype)
        lut[order] = np.arange(1, n + 1)
        ids = lut.take(cells)
        hi = cv2.dilate(np.where(mask, ids, dtype(0)), disk)  # borders: outside counts as "no mask"
        lo = cv2.erode(np.where(mask, ids, dtype(none)), disk, borderType=cv2.BORDER_CONSTANT, borderValue=none)
        joined = hi == ids
        joined |= lo == ids
        out = joined if out is None else (out | joined)
    return out


def _fill_holes(mask: np.ndarray) -> np.ndarray:
    """Holes = background not 4-connected to the image border (as ``scipy.ndimage.binary_fill_holes``)."""
    h, w = mask.shape
    pad = np.zeros((h + 2, w + 2), np.uint8)
    pad[1:-1, 1:-1] = mask
    cv2.floodFill(pad, None, (0, 0), 2, flags=4)
    return pad[1:-1, 1:-1] != 2


def _erode_in_cells(mask, cell_border, r):
    """Erosion by a disk of radius r inside cells: pixels of other cells count as outside. Removing the cell
    border pixels first makes the erosion at most one pixel stronger near edges than per-cell erosion; outside
    the image counts as inside the mask."""
    if r <= 0 or not mask.any():
        return mask
    inner = mask & ~cell_border
    return cv2.erode(_u8(inner), _disk(r)).view(bool)
