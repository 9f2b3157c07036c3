"""Pseudo labels from point annotations (Qu et al., MIDL 2019 / IEEE TMI 2020).

One point per nucleus gives two complementary, partial label maps:

* **Voronoi label** — the Voronoi partition of the image by the points. Its edges lie between neighbouring
  nuclei, so they are background (0); each point, dilated by a small disk, is nucleus (1); everything else is
  unknown (255).
* **Cluster label** — k-means (k = 3) on per-pixel features ``[colour * color_scale, min(dist to nearest
  point, dist_clip)]``. The cluster holding most points is nucleus, of the two others the one that overlaps
  least with the points dilated by ``point_overlap_radius`` is background, the third is unknown. Clean-up:
  drop nucleus objects smaller than ``min_object_size``; inside each Voronoi cell dilate, fill holes and erode;
  background excludes pixels within ``bg_point_margin`` of a point.

Everything is O(HW) array code: one Euclidean distance transform with ``return_indices`` gives both the
distance to the nearest point and its index (the Voronoi cell), edges come from label changes between
neighbouring pixels, morphology inside cells is done with distance transforms, and k-means is a vectorised
Lloyd iteration fitted on a pixel subsample and then applied to every pixel.

Partial points (only a fraction of nuclei clicked): the functions are unchanged, but the labels mean less.
Unclicked nuclei fall inside the Voronoi cells of clicked neighbours, so a Voronoi edge can cross an unclicked
nucleus (wrong background), and the cluster label's nucleus cluster is still driven by colour, so unclicked
nuclei far from any point tend to land in the unknown or background cluster. Use ``partial=True`` in
:func:`cluster_labels` (pixels whose *colour alone* is closer to the nucleus centre are never background) and
a background weight below 1 in the loss (``PointVoronoiMixin(point_bg_weight=...)``).
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

from ..errors import WeakSegDataError

IGNORE = 255

__all__ = ["voronoi_labels", "cluster_labels", "point_labels", "voronoi_cells"]


def _as_numpy(x) -> np.ndarray:
    if hasattr(x, "detach"):  # torch tensor, without importing torch here
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def _check_points(points, shape) -> np.ndarray:
    pts = _as_numpy(points)
    if pts.size == 0:
        return np.zeros((0, 2), dtype=np.int64)
    if pts.ndim != 2 or pts.shape[1] != 2:
        raise WeakSegDataError(f"expected points of shape (M, 2) as [y, x], got {tuple(pts.shape)}", field="points")
    if not np.all(np.isfinite(pts)):
        raise WeakSegDataError("points contain NaN or inf", field="points")
    pts = np.rint(pts).astype(np.int64)
    h, w = shape
    bad = (pts[:, 0] < 0) | (pts[:, 0] >= h) | (pts[:, 1] < 0) | (pts[:, 1] >= w)
    if bad.any():
        raise WeakSegDataError(
            f"{int(bad.sum())} point(s) outside the image of shape {(h, w)}, e.g. [y, x] = {pts[bad][0].tolist()}",
            field="points",
        )
    return pts


def _check_shape(shape) -> tuple[int, int]:
    shape = tuple(int(s) for s in shape)
    if len(shape) != 2 or min(shape) < 1:
        raise ValueError(f"expected shape (H, W) with H, W >= 1, got {shape}")
    return shape


def voronoi_cells(points, shape):
    """Nearest-point map: ``(cells, dist)`` with ``cells[y, x]`` the index of the nearest point and ``dist`` the
    Euclidean distance to it (both (H, W)); cells is -1 everywhere when there is no point."""
    shape = _check_shape(shape)
    pts = _check_points(points, shape)
    if len(pts) == 0:
        return np.full(shape, -1, np.int64), np.full(shape, np.inf, np.float64)
    seeds = np.ones(shape, dtype=bool)
    seeds[pts[:, 0], pts[:, 1]] = False
    dist, (iy, ix) = ndi.distance_transform_edt(seeds, return_indices=True)
    owner = np.full(shape, -1, np.int64)
    owner[pts[:, 0], pts[:, 1]] = np.arange(len(pts))  # duplicates: the last one owns the pixel
    return owner[iy, ix], dist


def _neighbour_pairs(connectivity: int):
    pairs = [(0, 1), (1, 0)]
    if connectivity == 2:
        pairs += [(1, 1), (1, -1)]
    return pairs


def _shifted(a, dy, dx):
    """Views (a[p], a[p + (dy, dx)]) over all p for which both lie inside the image."""
    h, w = a.shape[:2]
    y0, y1 = max(0, -dy), h - max(0, dy)
    x0, x1 = max(0, -dx), w - max(0, dx)
    return a[y0:y1, x0:x1], a[y0 + dy:y1 + dy, x0 + dx:x1 + dx], (slice(y0, y1), slice(x0, x1)), (
        slice(y0 + dy, y1 + dy), slice(x0 + dx, x1 + dx))


def _voronoi_edges(cells: np.ndarray, pts: np.ndarray, connectivity: int = 1) -> np.ndarray:
    """Pixels on the Voronoi edges.

    For every pair of neighbouring pixels (p, q) in different cells (a, b) the pixel closer to the bisector of
    a and b is marked (both on a tie). The distance of p to that bisector is (|p−b|² − |p−a|²) / (2|a−b|), so the
    edge sits exactly midway between the points and separates the cells (no neighbouring pair of non-edge pixels
    belongs to two cells)."""
    edges = np.zeros(cells.shape, dtype=bool)
    if len(pts) < 2:
        return edges
    h, w = cells.shape
    yy, xx = np.mgrid[0:h, 0:w]
    pf = pts.astype(np.float64)
    for dy, dx in _neighbour_pairs(connectivity):
        cp, cq, sp, sq = _shifted(cells, dy, dx)
        diff = cp != cq
        if not diff.any():
            continue
        a, b = cp[diff], cq[diff]
        py, px = yy[sp][diff], xx[sp][diff]
        qy, qx = py + dy, px + dx
        ab = np.sqrt(((pf[a] - pf[b]) ** 2).sum(1))
        ab = np.maximum(ab, 1e-12)

        def sq_d(y, x, k):
            return (y - pf[k, 0]) ** 2 + (x - pf[k, 1]) ** 2

        dp = (sq_d(py, px, b) - sq_d(py, px, a)) / (2 * ab)  # >= 0: p is in a's cell
        dq = (sq_d(qy, qx, a) - sq_d(qy, qx, b)) / (2 * ab)
        mark_p = dp <= dq + 1e-9
        mark_q = dq <= dp + 1e-9
        edges[py[mark_p], px[mark_p]] = True
        edges[qy[mark_q], qx[mark_q]] = True
    return edges


def voronoi_labels(points, shape, *, point_radius: float = 2.0, connectivity: int = 1, _cells=None):
    """Voronoi label of Qu et al.: uint8 (H, W), 0 = Voronoi edge (background), 1 = point dilated by a disk of
    radius ``point_radius`` (nucleus), 255 = unknown.

    Args:
        points: (M, 2) ``[y, x]`` pixel indices (NumPy array or tensor; floats are rounded).
        shape: (H, W).
        point_radius: radius of the nucleus disk around each point (paper: 2).
        connectivity: 1 — edges separate cells for 4-neighbours (thin edges); 2 — also for diagonal
            neighbours (slightly thicker edges).

    Precedence: edges beat the point disks (a disk never crosses into a neighbour's edge), the point pixel
    itself beats everything (a click is on a nucleus), so points closer than ~1 px can put a point on an edge.

    Example:
        >>> lab = voronoi_labels(np.array([[5, 2], [5, 8]]), (11, 11), point_radius=0)
        >>> np.unique(np.nonzero(lab == 0)[1]).tolist(), int(lab[5, 2]), int(lab[0, 0])
        ([5], 1, 255)
    """
    shape = _check_shape(shape)
    if connectivity not in (1, 2):
        raise ValueError(f"connectivity must be 1 or 2, got {connectivity}")
    pts = _check_points(points, shape)
    out = np.full(shape, IGNORE, np.uint8)
    if len(pts) == 0:
        return out
    cells, dist = _cells if _cells is not None else voronoi_cells(pts, shape)
    edges = _voronoi_edges(cells, pts, connectivity)
    out[dist <= point_radius] = 1
    out[edges] = 0
    out[pts[:, 0], pts[:, 1]] = 1
    return out


def _kmeans(x: np.ndarray, k: int, rng: np.random.Generator, n_init: int, max_iter: int, max_fit: int):
    """Lloyd's k-means with k-means++ seeding, vectorised; fitted on at most ``max_fit`` rows of ``x``."""
    fit = x if len(x) <= max_fit else x[rng.choice(len(x), max_fit, replace=False)]
    fit_sq = (fit * fit).sum(1)
    best, best_inertia = None, np.inf
    for _ in range(n_init):
        centers = [fit[rng.integers(len(fit))]]
        d2 = ((fit - centers[0]) ** 2).sum(1)
        for _ in range(1, k):
            p = d2 / d2.sum() if d2.sum() > 0 else None
            centers.append(fit[rng.choice(len(fit), p=p)])
            d2 = np.minimum(d2, ((fit - centers[-1]) ** 2).sum(1))
        c = np.stack(centers)
        for _ in range(max_iter):
            d = fit_sq[:, None] - 2 * fit @ c.T + (c * c).sum(1)[None]
            assign = d.argmin(1)
            counts = np.bincount(assign, minlength=k)
            sums = np.stack([np.bincount(assign, fit[:, j], minlength=k) for j in range(fit.shape[1])], 1)
            new = np.where(counts[:, None] > 0, sums / np.maximum(counts, 1)[:, None], c)
            shift = np.abs(new - c).max()
            c = new
            if shift < 1e-4:
                break
        d = fit_sq[:, None] - 2 * fit @ c.T + (c * c).sum(1)[None]
        inertia = d.min(1).sum()
        if inertia < best_inertia:
            best, best_inertia = c, inertia
    return best


def _remove_small(mask: np.ndarray, min_size: int) -> np.ndarray:
    if min_size <= 1 or not mask.any():
        return mask
    lab, n = ndi.label(mask)
    sizes = np.bincount(lab.ravel(), minlength=n + 1)
    keep = sizes >= min_size
    keep[0] = False
    return keep[lab]


def _dilate_in_cells(mask, cells, r):
    """Dilation by a disk of radius r that never crosses into another Voronoi cell: a pixel joins when its
    nearest mask pixel is within r *and* in the same cell (a nearer mask pixel of a neighbouring cell can hide a
    farther one of its own cell; that only makes the label more conservative near cell edges)."""
    if r <= 0 or not mask.any():
        return mask
    d, (iy, ix) = ndi.distance_transform_edt(~mask, return_indices=True)
    return (d <= r) & (cells[iy, ix] == cells)


def _erode_in_cells(mask, cell_border, r):
    """Erosion by a disk of radius r inside cells: pixels of other cells count as outside. Removing the cell
    border pixels first makes the erosion at most one pixel stronger near edges than per-cell erosion."""
    if r <= 0 or not mask.any():
        return mask
    inner = mask & ~cell_border
    return ndi.distance_transform_edt(inner) > r


def cluster_labels(image, points, *, n_clusters: int = 3, color_scale: float = 0.1, dist_clip: float = 20.0,
                   point_overlap_radius: float = 5.0, min_object_size: int = 30, dilate_radius: float = 5.0,
                   erode_radius: float = 7.0, fill_holes: bool = True, bg_point_margin: float = 10.0,
                   cleanup: bool = True, partial: bool = False, scale: float = 1.0, max_fit_pixels: int = 65536,
                   n_init: int = 3, max_iter: int = 50, seed: int = 0, _cells=None):
    """Cluster label of Qu et al.: uint8 (H, W), 0 background, 1 nucleus, 255 unknown.

    Args:
        image: (H, W) or (H, W, C) uint8 (grayscale or RGB).
        points: (M, 2) ``[y, x]`` pixel indices.
        n_clusters: k of k-means (paper: 3).
        color_scale, dist_clip: feature = [colour · color_scale, min(dist, dist_clip)] (paper: 1/10, 20).
        point_overlap_radius: the background cluster is the one overlapping least with points dilated by this.
        min_object_size, dilate_radius, erode_radius, fill_holes: clean-up of the nucleus map inside each
            Voronoi cell (paper: 30, 5, 7, True); ``cleanup=False`` skips all of it.
        bg_point_margin: background excludes pixels within this distance of a point (paper: 10).
        scale: multiplies every length above (and ``min_object_size`` by scale²). The paper's values suit
            40× histology with nuclei of radius ≈ 8–10 px; use scale ≈ (typical nucleus radius) / 9, e.g.
            0.4 for nuclei of radius 3–4 px.
        partial: only part of the nuclei carry a point — pixels whose colour alone is nearer the nucleus
            centre than the background centre are never background.
        max_fit_pixels, n_init, max_iter, seed: k-means is fitted on a random subsample of this many pixels
            (the three centres are stable long before), then every pixel is assigned.

    Example:
        >>> img = np.zeros((40, 40), np.uint8); img[8:16, 8:16] = 200; img[25:33, 25:33] = 200
        >>> lab = cluster_labels(img, np.array([[11, 11], [28, 28]]), min_object_size=0)
        >>> int(lab[11, 11]), int(lab[2, 38])
        (1, 0)
    """
    img = _as_numpy(image)
    if img.ndim == 3 and img.shape[2] == 1:
        img = img[..., 0]
    if img.ndim not in (2, 3):
        raise WeakSegDataError(f"expected image (H, W) or (H, W, C), got shape {tuple(img.shape)}", field="image")
    if img.dtype != np.uint8:
        raise WeakSegDataError(f"expected a uint8 image, got {img.dtype}", field="image")
    shape = img.shape[:2]
    pts = _check_points(points, shape)
    out = np.full(shape, IGNORE, np.uint8)
    if len(pts) == 0:
        return out
    if scale <= 0:
        raise ValueError(f"scale must be > 0, got {scale}")
    dist_clip, point_overlap_radius, dilate_radius = dist_clip * scale, point_overlap_radius * scale, dilate_radius * scale
    erode_radius, bg_point_margin = erode_radius * scale, bg_point_margin * scale
    min_object_size = int(round(min_object_size * scale ** 2))
    cells, dist = _cells if _cells is not None else voronoi_cells(pts, shape)
    colour = img.reshape(-1, 1 if img.ndim == 2 else img.shape[2]).astype(np.float32) * color_scale
    feat = np.concatenate([colour, np.minimum(dist, dist_clip).reshape(-1, 1).astype(np.float32)], 1)
    rng = np.random.default_rng(seed)
    centers = _kmeans(feat, n_clusters, rng, n_init, max_iter, max_fit_pixels)
    d = (feat * feat).sum(1)[:, None] - 2 * feat @ centers.T + (centers * centers).sum(1)[None]
    assign = d.argmin(1).reshape(shape)

    at_points = np.bincount(assign[pts[:, 0], pts[:, 1]], minlength=n_clusters)
    nucleus = int(at_points.argmax())
    near = dist <= point_overlap_radius
    overlap = np.bincount(assign[near], minlength=n_clusters).astype(np.float64)
    overlap[nucleus] = np.inf
    background = int(overlap.argmin())
    fg = assign == nucleus
    bg = assign == background

    if cleanup:
        edges = _voronoi_edges(cells, pts, 1)
        fg = _remove_small(fg, min_object_size)
        fg = _dilate_in_cells(fg, cells, dilate_radius)
        if fill_holes:
            fg = ndi.binary_fill_holes(fg & ~edges)
        border = np.zeros(shape, bool)
        for dy, dx in _neighbour_pairs(1):
            cp, cq, sp, sq = _shifted(cells, dy, dx)
            diff = cp != cq
            border[sp] |= diff
            border[sq] |= diff
        fg = _erode_in_cells(fg, border, erode_radius) & ~edges
        bg &= dist > bg_point_margin
    if partial:
        cc = centers[:, :-1]
        cd = ((colour[:, None, :] - cc[None]) ** 2).sum(-1).reshape(*shape, n_clusters)
        bg &= cd[..., background] < cd[..., nucleus]
    out[bg] = 0
    out[fg] = 1
    return out


def point_labels(image, points, **cluster_kwargs):
    """Both labels at once, sharing one distance transform: ``(voronoi, cluster)``, each uint8 (H, W)."""
    img = _as_numpy(image)
    shape = img.shape[:2]
    pts = _check_points(points, shape)
    cells = voronoi_cells(pts, shape)
    return (voronoi_labels(pts, shape, _cells=cells),
            cluster_labels(img, pts, _cells=cells, **cluster_kwargs))
