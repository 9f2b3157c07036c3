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

Everything is O(HW) array code without Python loops over points or cells:

* one exact Euclidean distance transform with ``return_indices`` gives both the distance to the nearest point
  and its index (the Voronoi cell); :func:`point_labels` computes it once for both labels;
* Voronoi edges come from the pixel pairs whose nearest point differs (a few per cent of the pixels), decided
  exactly in integer arithmetic;
* k-means is a vectorised Lloyd iteration fitted on a random pixel subsample (fixed seed); assigning every
  pixel to the k centres is one (k, C) × (C, HW) product and k − 1 comparisons;
* the morphology runs on whole images with OpenCV (disk-shaped structuring elements, flood fill for the holes,
  connected components for the small objects); "inside each Voronoi cell" is obtained from the cell index map
  (max and min filters of the cell ids for the dilation, cell-border pixels removed before the erosion).

Partial points (only a fraction of nuclei clicked): the functions are unchanged, but the labels mean less.
Unclicked nuclei fall inside the Voronoi cells of clicked neighbours, so a Voronoi edge can cross an unclicked
nucleus (wrong background), and the cluster label's nucleus cluster is still driven by colour, so unclicked
nuclei far from any point tend to land in the unknown or background cluster. Use ``partial=True`` in
:func:`cluster_labels` (pixels whose *colour alone* is closer to the nucleus centre are never background) and
a background weight below 1 in the loss (``PointVoronoiMixin(point_bg_weight=...)``).
"""
from __future__ import annotations

import cv2
import numpy as np
from scipy import ndimage as ndi

from ..errors import WeakSegDataError
from ..data.batch import IGNORE_INDEX
from .morphology import _dilate_in_cells, _disk, _erode_in_cells, _fill_holes, _remove_small, _u8  # noqa: F401


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


def _nearest(pts: np.ndarray, shape) -> tuple[np.ndarray, np.ndarray]:
    """Exact nearest point of every pixel (at least one point): ``(cells, dist2)`` (H, W), cells uint16 (fewer
    than 65535 points) or int32, dist2 the squared Euclidean distance, an exact integer (int32, or int64 for
    images of 2**30 pixels or more). Duplicate points: the last one owns the pixel."""
    h, w = shape
    seeds = np.ones(shape, dtype=bool)
    seeds[pts[:, 0], pts[:, 1]] = False
    iy, ix = ndi.distance_transform_edt(seeds, return_distances=False, return_indices=True)
    if h * w >= 2 ** 30:
        iy, ix = iy.astype(np.int64), ix.astype(np.int64)
    dist2 = iy - np.arange(h, dtype=iy.dtype)[:, None]
    dx = ix - np.arange(w, dtype=ix.dtype)[None]
    dist2 *= dist2
    dx *= dx
    dist2 += dx
    flat = iy
    flat *= w
    flat += ix
    owner = np.zeros(h * w, np.uint16 if len(pts) < 65535 else np.int32)
    owner[pts[:, 0] * w + pts[:, 1]] = np.arange(len(pts))  # duplicates: the last one owns the pixel
    return owner.take(flat), dist2


def voronoi_cells(points, shape):
    """Nearest-point map: ``(cells, dist)`` with ``cells[y, x]`` the index of the nearest point and ``dist`` the
    Euclidean distance to it (both (H, W)); cells is -1 everywhere when there is no point."""
    shape = _check_shape(shape)
    pts = _check_points(points, shape)
    if len(pts) == 0:
        return np.full(shape, -1, np.int64), np.full(shape, np.inf, np.float64)
    cells, dist2 = _nearest(pts, shape)
    return cells.astype(np.int64), np.sqrt(dist2, dtype=np.float64)


def _neighbour_offsets(connectivity: int):
    pairs = [(0, 1), (1, 0)]
    if connectivity == 2:
        pairs += [(1, 1), (1, -1)]
    return pairs


class _Geometry:
    """The nearest-point map of one image with the quantities derived from it, each computed once."""

    def __init__(self, pts: np.ndarray, shape, cells=None, dist=None):
        self.pts, self.shape = pts, shape
        if cells is None:
            cells, self.dist2 = _nearest(pts, shape)
        else:  # (cells, dist) as returned by voronoi_cells
            self.dist2 = np.rint(np.square(np.asarray(dist, np.float64))).astype(np.int64)
        self.cells = cells
        self._pairs: dict[int, list] = {}
        self._edges: dict[int, np.ndarray] = {}
        self._border = None

    def within(self, r: float) -> np.ndarray:
        """dist <= r, bool (H, W): exactly, as dist² <= ⌊r²⌋ in integers."""
        if not np.isfinite(r):
            return np.full(self.shape, r > 0)
        return self.dist2 <= (int(np.floor(r * r)) if r >= 0 else -1)

    def pairs(self, connectivity: int):
        """For each neighbour offset: flat indices (p, q = p + offset) and cells (a, b) of the pixel pairs in
        different cells."""
        if connectivity not in self._pairs:
            h, w = self.shape
            c = self.cells.reshape(-1)
            n = h * w
            out = []
            for dy, dx in _neighbour_offsets(connectivity):
                o = dy * w + dx
                if o >= n:
                    continue
                diff = c[:n - o] != c[o:]
                if dx == 1:  # q = p + (dy, 1) leaves the image when p is in the last column
                    diff[w - 1::w] = False
                elif dx == -1:
                    diff[0::w] = False
                p = np.flatnonzero(diff)
                q = p + o
                out.append((p, q, c.take(p), c.take(q)))
            self._pairs[connectivity] = out
        return self._pairs[connectivity]

    def edges(self, connectivity: int = 1) -> np.ndarray:
        """Pixels on the Voronoi edges, bool (H, W).

        For every pair of neighbouring pixels (p, q) in different cells (a, b) the pixel closer to the bisector
        of a and b is marked (both on a tie). The distance of p to that bisector is (|p−b|² − |p−a|²) / (2|a−b|),
        so comparing the two numerators decides it — exactly, in integers. The edge sits midway between the
        points and separates the cells (no neighbouring pair of non-edge pixels belongs to two cells)."""
        if connectivity not in self._edges:
            h, w = self.shape
            edges = np.zeros(h * w, dtype=bool)
            if len(self.pts) >= 2:
                py_, px_ = self.pts[:, 0], self.pts[:, 1]
                for p, q, a, b in self.pairs(connectivity):
                    ya, xa, yb, xb = py_[a], px_[a], py_[b], px_[b]
                    y = p // w
                    x = p - y * w
                    yq = q // w
                    xq = q - yq * w
                    num_p = (y - yb) ** 2 + (x - xb) ** 2 - (y - ya) ** 2 - (x - xa) ** 2  # >= 0: p is in a's cell
                    num_q = (yq - ya) ** 2 + (xq - xa) ** 2 - (yq - yb) ** 2 - (xq - xb) ** 2
                    edges[p[num_p <= num_q]] = True
                    edges[q[num_q <= num_p]] = True
            self._edges[connectivity] = edges.reshape(self.shape)
        return self._edges[connectivity]

    def border(self) -> np.ndarray:
        """Pixels with a 4-neighbour in another cell, bool (H, W)."""
        if self._border is None:
            border = np.zeros(self.shape[0] * self.shape[1], dtype=bool)
            for p, q, _, _ in self.pairs(1):
                border[p] = True
                border[q] = True
            self._border = border.reshape(self.shape)
        return self._border


def _geometry(pts, shape, given) -> _Geometry:
    if isinstance(given, _Geometry):
        return given
    if given is not None:  # (cells, dist) as returned by voronoi_cells
        return _Geometry(pts, shape, *given)
    return _Geometry(pts, shape)


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
    out = np.full(shape, IGNORE_INDEX, np.uint8)
    if len(pts) == 0:
        return out
    geo = _geometry(pts, shape, _cells)
    out[geo.within(point_radius)] = 1
    out[geo.edges(connectivity)] = 0
    out[pts[:, 0], pts[:, 1]] = 1
    return out


def _kmeans(fit: np.ndarray, k: int, rng: np.random.Generator, n_init: int, max_iter: int) -> np.ndarray:
    """Lloyd's k-means with k-means++ seeding on the rows of ``fit`` (vectorised, best of ``n_init`` by inertia);
    an iteration stops when no assignment changes. Returns the (k, D) centres."""
    fit = np.asarray(fit, np.float64)
    m, n_feat = fit.shape
    fit_t = np.ascontiguousarray(fit.T)
    fit_sq = np.einsum("ij,ij->i", fit, fit)

    def part(c):  # |x − c|² − |x|² for every row x and centre c: (m, len(c))
        return fit @ (-2.0 * c.T) + np.einsum("ij,ij->i", c, c)[None]

    best, best_inertia = None, np.inf
    for _ in range(n_init):
        c = np.empty((k, n_feat))
        c[0] = fit[rng.integers(m)]
        d2 = np.maximum(fit_sq + part(c[:1])[:, 0], 0)
        for j in range(1, k):
            s = d2.sum()
            c[j] = fit[rng.choice(m, p=d2 / s) if s > 0 else rng.integers(m)]
            np.minimum(d2, np.maximum(fit_sq + part(c[j:j + 1])[:, 0], 0), out=d2)
        assign = None
        for _ in range(max_iter):
            new_assign = part(c).argmin(1)
            if assign is not None and np.array_equal(new_assign, assign):
                break
            assign = new_assign
            counts = np.bincount(assign, minlength=k)
            sums = np.stack([np.bincount(assign, fit_t[j], minlength=k) for j in range(n_feat)], 1)
            c = np.where(counts[:, None] > 0, sums / np.maximum(counts, 1)[:, None], c)
        inertia = float(part(c).min(1).sum())  # + Σ|x|², the same for every init
        if inertia < best_inertia:
            best, best_inertia = c, inertia
    return best


def cluster_labels(image, points, *, n_clusters: int = 3, color_scale: float = 0.1, dist_clip: float = 20.0,
                   point_overlap_radius: float = 5.0, min_object_size: int = 30, dilate_radius: float = 5.0,
                   erode_radius: float = 7.0, fill_holes: bool = True, bg_point_margin: float = 10.0,
                   cleanup: bool = True, partial: bool = False, scale: float = 1.0, max_fit_pixels: int = 8192,
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
        max_fit_pixels, n_init, max_iter, seed: k-means is fitted on a random subsample (with a fixed seed) of
            this many pixels (three centres in four dimensions are stable long before), then every pixel is
            assigned to its nearest centre.

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
    out = np.full(shape, IGNORE_INDEX, np.uint8)
    if len(pts) == 0:
        return out
    if scale <= 0:
        raise ValueError(f"scale must be > 0, got {scale}")
    dist_clip, point_overlap_radius, dilate_radius = dist_clip * scale, point_overlap_radius * scale, dilate_radius * scale
    erode_radius, bg_point_margin = erode_radius * scale, bg_point_margin * scale
    min_object_size = int(round(min_object_size * scale ** 2))
    geo = _geometry(pts, shape, _cells)

    # features: [colour · color_scale, min(dist, dist_clip)]; k-means on a subsample, then every pixel
    n_pix = shape[0] * shape[1]
    n_ch = 1 if img.ndim == 2 else img.shape[2]
    colour = img.reshape(n_pix, n_ch)
    d2flat = geo.dist2.reshape(-1)
    clip2 = dist_clip * dist_clip  # min(dist, clip) = sqrt(min(dist², clip²))
    rng = np.random.default_rng(seed)
    sub = slice(None) if n_pix <= max_fit_pixels else rng.choice(n_pix, max_fit_pixels, replace=False)
    fit = np.concatenate([colour[sub] * color_scale, np.sqrt(np.minimum(d2flat[sub], clip2))[:, None]], 1)
    centers = _kmeans(fit, n_clusters, rng, n_init, max_iter)
    # nearest centre = largest f·c − |c|²/2; relative to centre 0 that is one (k − 1, C + 1) × (C + 1, HW)
    # product in float32 and k − 1 comparisons (ties go to the lower index, as argmin)
    feats = np.empty((n_ch + 1, n_pix), np.float32)
    feats[:n_ch] = colour.T
    np.minimum(d2flat, clip2, out=feats[n_ch], casting="same_kind")
    np.sqrt(feats[n_ch], out=feats[n_ch])
    weights = np.concatenate([centers[:, :n_ch] * color_scale, centers[:, n_ch:]], 1)
    bias = -0.5 * (centers * centers).sum(1)
    rel = (weights[1:] - weights[0]).astype(np.float32) @ feats
    rel += (bias[1:] - bias[0]).astype(np.float32)[:, None]
    assign = np.zeros(n_pix, np.uint8)
    top = None  # best score so far, relative to centre 0
    for j in range(1, n_clusters):
        r = rel[j - 1]
        better = r > 0 if top is None else r > top
        assign[better] = j
        if j < n_clusters - 1:
            top = np.maximum(r, 0) if top is None else np.maximum(top, r, out=top)
    assign = assign.reshape(shape)

    at_points = np.bincount(assign[pts[:, 0], pts[:, 1]], minlength=n_clusters)
    nucleus = int(at_points.argmax())
    overlap = np.bincount(assign[geo.within(point_overlap_radius)], minlength=n_clusters).astype(np.float64)
    overlap[nucleus] = np.inf
    # least overlap; on a tie (e.g. every pixel near a point is nucleus) the cluster farther from the points
    candidates = np.flatnonzero(overlap == overlap.min())
    background = int(candidates[np.argmax(centers[candidates, n_ch])])
    fg = assign == nucleus
    bg = assign == background

    if cleanup:
        edges = geo.edges(1)
        fg = _remove_small(fg, min_object_size)
        fg = _dilate_in_cells(fg, geo.cells, dilate_radius, pts)
        if fill_holes:
            fg = _fill_holes(fg & ~edges)
        fg = _erode_in_cells(fg, geo.border(), erode_radius) & ~edges
        bg &= ~geo.within(bg_point_margin)
    if partial:
        # |x − c_bg|² < |x − c_nuc|²  ⇔  2 x·(c_nuc − c_bg) < |c_nuc|² − |c_bg|²  (colour part only)
        cn, cb = centers[nucleus, :n_ch], centers[background, :n_ch]  # in feature units (colour · color_scale)
        lhs = (2 * color_scale * (cn - cb)).astype(np.float32) @ feats[:n_ch]  # feats hold the raw colour
        bg &= (lhs < np.float32(cn @ cn - cb @ cb)).reshape(shape)
    out[bg] = 0
    out[fg] = 1
    return out


def point_labels(image, points, **cluster_kwargs):
    """Both labels at once, sharing one distance transform and the Voronoi edges: ``(voronoi, cluster)``, each
    uint8 (H, W)."""
    img = _as_numpy(image)
    shape = _check_shape(img.shape[:2])
    pts = _check_points(points, shape)
    geo = _Geometry(pts, shape) if len(pts) else None
    return (voronoi_labels(pts, shape, _cells=geo),
            cluster_labels(img, pts, _cells=geo, **cluster_kwargs))
