"""Point regime: Voronoi and cluster labels (Qu et al.), the torch Voronoi used in the step, the mixin."""
import numpy as np
import pytest
import torch
from scipy import ndimage as ndi

from lightning_weakseg.errors import WeakSegDataError
from lightning_weakseg.pseudo import cluster_labels, point_labels, voronoi_labels


def brute_nearest(pts, shape):
    yy, xx = np.mgrid[0:shape[0], 0:shape[1]]
    d = (yy[..., None] - pts[:, 0]) ** 2 + (xx[..., None] - pts[:, 1]) ** 2
    return np.sort(d, -1)


def test_voronoi_two_points_edge_exactly_midway():
    lab = voronoi_labels(np.array([[5, 2], [5, 8]]), (11, 11), point_radius=0)
    assert set(np.nonzero(lab == 0)[1].tolist()) == {5} and (lab[:, 5] == 0).all()
    # odd spacing: the bisector x = 4.5 lies between two columns; both are edge
    lab = voronoi_labels(np.array([[3, 2], [3, 7]]), (7, 10), point_radius=0)
    assert set(np.nonzero(lab == 0)[1].tolist()) == {4, 5} and (lab[:, 4:6] == 0).all()
    assert lab[3, 2] == 1 and lab[3, 7] == 1 and (lab == 1).sum() == 2


def test_voronoi_three_points_properties():
    pts = np.array([[4, 4], [4, 16], [15, 10]])
    shape = (20, 21)
    lab = voronoi_labels(pts, shape, point_radius=2)
    d = np.sqrt(brute_nearest(pts, shape))
    edge = lab == 0
    # every edge pixel lies within half a pixel (per axis: ≤ 1/√2) of a bisector: d2 − d1 small
    assert edge.any() and ((d[..., 1] - d[..., 0])[edge] <= 2 * 0.75).all()
    # every pixel exactly on a bisector that is nearer than the third point is an edge pixel
    on = (np.abs(d[..., 1] - d[..., 0]) < 1e-9)
    assert edge[on].all()
    # point pixels are foreground; disks of radius 2; nothing else
    assert (lab[pts[:, 0], pts[:, 1]] == 1).all()
    yy, xx = np.mgrid[0:20, 0:21]
    disk = ((yy[..., None] - pts[:, 0]) ** 2 + (xx[..., None] - pts[:, 1]) ** 2 <= 4).any(-1)
    assert ((lab == 1) == (disk & ~edge)).all()
    assert not ((lab == 1) & edge).any()
    # edges separate the cells: no 4-neighbours in different cells are both non-edge
    owner = d.shape and np.argmin(((yy[..., None] - pts[:, 0]) ** 2 + (xx[..., None] - pts[:, 1]) ** 2), -1)
    for a, b, ea, eb in ((owner[:, :-1], owner[:, 1:], edge[:, :-1], edge[:, 1:]),
                         (owner[:-1], owner[1:], edge[:-1], edge[1:])):
        assert not ((a != b) & ~ea & ~eb).any()


def test_voronoi_inputs():
    assert (voronoi_labels(np.zeros((0, 2)), (4, 4)) == 255).all()
    t = voronoi_labels(torch.tensor([[1.0, 1.0], [1.0, 6.0]]), (3, 8))
    assert (t == voronoi_labels(np.array([[1, 1], [1, 6]]), (3, 8))).all()
    with pytest.raises(WeakSegDataError, match="outside"):
        voronoi_labels(np.array([[5, 1]]), (4, 4))
    with pytest.raises(WeakSegDataError, match=r"\(M, 2\)"):
        voronoi_labels(np.zeros((3, 3)), (4, 4))


def draw_discs(rng, size=64, n=6, rgb=True):
    inst = np.zeros((size, size), np.int32)
    yy, xx = np.mgrid[0:size, 0:size]
    centres = []
    while len(centres) < n:
        c = rng.uniform(8, size - 8, 2)
        if all(np.hypot(*(c - o)) > 14 for o in centres):
            centres.append(c)
    for k, c in enumerate(centres, 1):
        inst[(yy - c[0]) ** 2 + (xx - c[1]) ** 2 <= 25] = k
    img = np.where(inst[..., None] > 0, [200, 80, 160], [40, 30, 50]) + rng.normal(0, 12, (size, size, 3))
    img = np.clip(img, 0, 255).astype(np.uint8)
    return (img if rgb else img[..., 0]), inst, np.rint(np.array(centres)).astype(int)


@pytest.mark.parametrize("rgb", [True, False])
def test_cluster_labels_on_discs(rgb):
    img, inst, pts = draw_discs(np.random.default_rng(1), rgb=rgb)
    lab = cluster_labels(img, pts, scale=0.5)
    fg = inst > 0
    known = lab != 255
    acc = ((lab == 1) == fg)[known].mean()
    assert acc >= 0.99 and known.mean() > 0.2, (acc, known.mean())
    assert (lab == 1)[fg].mean() > 0.3  # a conservative but real foreground
    assert (lab[pts[:, 0], pts[:, 1]] == 1).all()


def test_cluster_labels_on_synthetic_nuclei():
    from lightning_weakseg.data import SyntheticDataset
    ds = SyntheticDataset("nuclei", n=4, image_size=64)
    accs, covs = [], []
    for i in range(4):
        raw = ds.load_raw(i)
        inst = raw["instances"]
        img = np.round(raw["image"] * 255).astype(np.uint8)
        ids = np.arange(1, inst.max() + 1)
        pts = np.rint(np.array(ndi.center_of_mass(inst > 0, inst, ids))).astype(int)
        vor, lab = point_labels(img, pts, scale=0.4)
        known = lab != 255
        accs.append(((lab == 1) == (inst > 0))[known].mean())
        covs.append(known.mean())
        assert (vor == voronoi_labels(pts, inst.shape)).all()
    # stated: ≥ 97% pixel accuracy on the labelled pixels, ≥ 50% of the pixels labelled
    assert min(accs) >= 0.97 and np.mean(covs) >= 0.5, (accs, covs)


def test_cluster_labels_partial_never_calls_nucleus_colour_background():
    rng = np.random.default_rng(3)
    img, inst, pts = draw_discs(rng, n=6)
    clicked = pts[:3]  # half of the nuclei carry a point
    full = cluster_labels(img, clicked, scale=0.5)
    part = cluster_labels(img, clicked, scale=0.5, partial=True)
    unclicked = np.isin(inst, np.arange(4, 7))
    assert ((part == 0) & unclicked).sum() <= ((full == 0) & unclicked).sum()
    assert ((part == 0) & unclicked).sum() == 0


# ---------------------------------------------------------------- the fast building blocks against slow references
def random_points(rng, n, shape, dup=0):
    p = np.c_[rng.integers(0, shape[0], n), rng.integers(0, shape[1], n)]
    return np.r_[p, p[:dup]] if dup else p


def test_voronoi_cells_exact_against_brute_force():
    from lightning_weakseg.pseudo.points import voronoi_cells
    rng = np.random.default_rng(5)
    for shape, n, dup in (((57, 83), 40, 3), ((31, 29), 2, 0), ((64, 64), 150, 5)):
        pts = random_points(rng, n, shape, dup)
        cells, dist = voronoi_cells(pts, shape)
        d2 = brute_nearest(pts, shape)[..., 0]
        assert np.array_equal(dist, np.sqrt(d2))  # exact distances
        yy, xx = np.mgrid[0:shape[0], 0:shape[1]]
        own = (yy - pts[cells, 0]) ** 2 + (xx - pts[cells, 1]) ** 2
        assert np.array_equal(own, d2)  # the cell's point is a nearest point (ties: any of them)


def slow_voronoi_label(pts, shape, cells, point_radius=2.0):
    """Pixel-pair loop from the geometric definition: for 4-neighbours p, q in the cells of different points a, b
    the one nearer the perpendicular bisector of a, b is an edge pixel (both on a tie). Signed distances to the
    bisector are projections on b − a from the midpoint (times 2|b − a|, to stay in integers)."""
    h, w = shape
    edge = np.zeros(shape, bool)
    for y in range(h):
        for x in range(w):
            for qy, qx in ((y, x + 1), (y + 1, x)):
                if qy >= h or qx >= w or cells[y, x] == cells[qy, qx]:
                    continue
                a, b = pts[cells[y, x]], pts[cells[qy, qx]]
                ab = b - a
                dp = int(np.dot(a + b - 2 * np.array([y, x]), ab))    # >= 0: p on a's side
                dq = int(np.dot(2 * np.array([qy, qx]) - a - b, ab))  # >= 0: q on b's side
                edge[y, x] |= dp <= dq
                edge[qy, qx] |= dq <= dp
    d2 = brute_nearest(pts, shape)[..., 0]
    lab = np.full(shape, 255, np.uint8)
    lab[d2 <= point_radius ** 2] = 1
    lab[edge] = 0
    lab[pts[:, 0], pts[:, 1]] = 1
    return lab


def test_voronoi_labels_larger_random_case_against_pixel_loop():
    rng = np.random.default_rng(11)
    shape = (96, 130)
    p = np.unique(random_points(rng, 120, shape), axis=0)
    yy, xx = np.mgrid[0:shape[0], 0:shape[1]]
    d2 = (yy[..., None] - p[:, 0]) ** 2 + (xx[..., None] - p[:, 1]) ** 2
    brute_cells = d2.argmin(-1)  # ties: the first point
    want = slow_voronoi_label(p, shape, brute_cells)
    # the same cells: the edge rule alone, exactly
    assert (voronoi_labels(p, shape, _cells=(brute_cells, np.sqrt(d2.min(-1)))) == want).all()
    # our own cells break distance ties differently (which of two equidistant points owns a pixel); that can
    # move an edge pixel next to a three-cell junction, nothing else
    got = voronoi_labels(p, shape)
    assert (got != want).sum() <= 5
    d = np.sqrt(np.sort(d2, -1))
    is_point = np.zeros(shape, bool)
    is_point[p[:, 0], p[:, 1]] = True
    for lab in (got, want):
        edge = (lab == 0) | is_point  # a clicked pixel stays nucleus even on an edge (adjacent clicks)
        assert ((d[..., 1] - d[..., 0])[lab == 0] <= 1.5).all()  # edge pixels hug a bisector
        assert (lab[is_point] == 1).all()
        assert ((lab == 1) == (((d[..., 0] <= 2) & (lab != 0)) | is_point)).all()
        # separation: 4-neighbours whose sets of nearest points are disjoint are never both non-edge
        nearest = d2 == d2.min(-1, keepdims=True)
        for sa, sb, ea, eb in ((nearest[:, :-1], nearest[:, 1:], edge[:, :-1], edge[:, 1:]),
                               (nearest[:-1], nearest[1:], edge[:-1], edge[1:])):
            assert not (~(sa & sb).any(-1) & ~ea & ~eb).any()


def test_remove_small_and_fill_holes_against_scipy():
    from lightning_weakseg.pseudo.points import _fill_holes, _remove_small
    rng = np.random.default_rng(2)
    for density in (0.3, 0.55, 0.7):
        m = ndi.gaussian_filter(rng.random((90, 110)), 1.5) > np.quantile(
            ndi.gaussian_filter(rng.random((90, 110)), 1.5), 1 - density)
        m = rng.random((90, 110)) < density if density == 0.7 else m
        lab, n = ndi.label(m)  # 4-connected objects
        for size in (2, 5, 30):
            want = np.zeros_like(m)
            for i in range(1, n + 1):
                obj = lab == i
                if obj.sum() >= size:
                    want |= obj
            assert np.array_equal(_remove_small(m, size), want)
        assert np.array_equal(_fill_holes(m), ndi.binary_fill_holes(m))


def _per_cell_dilation(mask, cells, r):
    """Slow reference: each cell's mask dilated by the disk on its own, clipped to the cell; and for every pixel
    the number of cells whose mask lies within r."""
    yy, xx = np.mgrid[-int(r):int(r) + 1, -int(r):int(r) + 1]
    disk = yy ** 2 + xx ** 2 <= r * r
    out = np.zeros(mask.shape, bool)
    reach = np.zeros(mask.shape, int)
    for c in np.unique(cells):
        grown = ndi.binary_dilation(mask & (cells == c), disk)
        out |= grown & (cells == c)
        reach += grown
    return out, reach


def test_dilate_and_erode_in_cells_against_slow_references():
    from lightning_weakseg.pseudo.points import _Geometry, _check_points, _dilate_in_cells, _erode_in_cells
    rng = np.random.default_rng(4)
    shape = (80, 90)
    pts = _check_points(np.unique(random_points(rng, 25, shape), axis=0), shape)
    geo = _Geometry(pts, shape)
    cells = geo.cells.astype(int)
    mask = ndi.gaussian_filter(rng.random(shape), 2) > 0.52
    for r in (2, 3.5, 5):
        got = _dilate_in_cells(mask, geo.cells, r, pts)
        want, reach = _per_cell_dilation(mask, cells, r)
        assert not (got & ~want).any()               # never crosses into another cell
        assert np.array_equal(got[reach < 3], want[reach < 3])  # exact where at most two cells' mask is in reach
        assert (got == want).mean() > 0.98  # a dense mask in small cells: the hard case (one ordering: 0.94)
        # erosion: disk erosion of the mask without the cell-border pixels (outside the image counts as inside)
        border = geo.border()
        inner = mask & ~border
        assert np.array_equal(_erode_in_cells(mask, border, r), ndi.distance_transform_edt(inner) > r)
    # border = pixels with a 4-neighbour in another cell
    b = np.zeros(shape, bool)
    b[:, :-1] |= cells[:, :-1] != cells[:, 1:]
    b[:, 1:] |= cells[:, :-1] != cells[:, 1:]
    b[:-1] |= cells[:-1] != cells[1:]
    b[1:] |= cells[:-1] != cells[1:]
    assert np.array_equal(geo.border(), b)


def test_kmeans_matches_sklearn():
    from sklearn.cluster import KMeans
    from lightning_weakseg.pseudo.points import _kmeans
    rng = np.random.default_rng(0)
    centres = np.array([[19.0, 8, 16, 5], [4, 3, 6, 12], [4, 3, 6, 19.5]])
    x = np.concatenate([c + rng.normal(0, 1.2, (n, 4)) for c, n in zip(centres, (300, 900, 1800))])
    ours = _kmeans(x, 3, np.random.default_rng(1), 3, 100)
    ref = KMeans(3, n_init=3, random_state=0, tol=0).fit(x).cluster_centers_
    order = lambda c: c[np.argsort(c[:, 3])]  # noqa: E731
    assert np.allclose(order(ours), order(ref), atol=1e-6)


def nuclei_like(size, n, seed=0):
    rng = np.random.default_rng(seed)
    pts = rng.integers(10, size - 10, (n, 2))
    yy, xx = np.mgrid[:size, :size]
    fg = ((yy[..., None] - pts[:, 0]) ** 2 + (xx[..., None] - pts[:, 1]) ** 2 <= 64).any(-1)
    img = np.where(fg[..., None], [190, 80, 160], [40, 30, 60]) + rng.normal(0, 12, (size, size, 3))
    return np.clip(img, 0, 255).astype(np.uint8), pts, fg


def test_cluster_labels_subsampled_fit_and_seed_stability():
    """k-means fitted on a pixel subsample gives (almost) the labels of the fit on every pixel, whatever the seed;
    and when no pixel near a point falls in either non-nucleus cluster (a tie in the overlap), the background is
    the cluster far from the points, not whichever one the clustering happened to list first."""
    img, pts, fg = nuclei_like(240, 60)
    full = cluster_labels(img, pts, max_fit_pixels=10 ** 9)
    for seed in range(4):
        lab = cluster_labels(img, pts, max_fit_pixels=2048, seed=seed)
        assert (lab == full).mean() > 0.99
        assert (lab == 0).mean() > 0.4                      # the far cluster is the background
        known = lab != 255
        assert (((lab == 1) == fg)[known]).mean() > 0.99

def test_torch_voronoi_equals_numpy():
    from lightning_weakseg.regimes.points import voronoi_labels_torch
    rng = np.random.default_rng(0)
    pts_list, want = [], []
    for n in (1, 2, 7, 15, 0):
        p = np.unique(rng.integers(0, 40, (n, 2)), axis=0) if n else np.zeros((0, 2), int)
        pts_list.append(torch.tensor(np.c_[np.ones(len(p)), p], dtype=torch.float32))
        want.append(voronoi_labels(p, (40, 40)))
    got = voronoi_labels_torch(pts_list, (40, 40)).numpy()
    assert (got == np.stack(want)).all()


def test_mixin_terms_and_pseudo_labels():
    import torch.nn.functional as F
    from lightning_weakseg.data import WeakSegDataModule
    from lightning_weakseg.regimes import PointSegModule

    torch.manual_seed(0)
    dm = WeakSegDataModule(synthetic_kind="nuclei", n_samples=6, image_size=32, batch_size=3,
                           train_labels=["points"], augment="none", val_fraction=0.34)
    dm.setup("fit")
    model = PointSegModule(encoder="resnet18", num_classes=2, point_cluster_kwargs={"scale": 0.3},
                           point_refine_kwargs={"sxy_bilateral": 10}, point_crf_kernel_radius=2)
    model.trainer = SimpleTrainer(dm)
    model.on_fit_start()  # fills the data set with cluster labels
    ds = dm.train_dataset
    assert sorted(ds.pseudo_labels) == sorted(ds.indices)
    batch = next(iter(dm.train_dataloader()))
    assert batch["has_pseudo"].all()
    out = model(batch["image"])
    terms = model.loss_terms(batch, out)
    assert set(terms) == {"point/voronoi", "point/cluster", "point/crf"}
    vor = torch.stack([torch.from_numpy(voronoi_labels(p[:, 1:].numpy(), (32, 32)).astype(np.int64))
                       for p in batch["points"]])
    ce = F.cross_entropy(out["logits"], vor, ignore_index=255, reduction="none").flatten(1)
    want = (ce.sum(1) / (vor != 255).flatten(1).sum(1)).mean()
    assert torch.allclose(terms["point/voronoi"], want)
    # background weight < 1 lowers the background pixels' share
    model.point_bg_weight = 0.5
    w = torch.tensor([0.5, 1.0])
    ce_w = F.cross_entropy(out["logits"], vor, weight=w, ignore_index=255, reduction="none").flatten(1)
    assert torch.allclose(model.loss_terms(batch, out)["point/voronoi"],
                          (ce_w.sum(1) / (vor != 255).flatten(1).sum(1)).mean())
    # self-training labels obey the Voronoi label
    lab = model.make_pseudo_labels(batch)
    assert lab.shape == (3, 32, 32) and lab.dtype == torch.long
    assert ((lab == vor) | (vor == 255)).all()


class SimpleTrainer:
    def __init__(self, dm):
        self.datamodule = dm
        self.current_epoch = 0


def test_fit_start_fills_only_missing_point_samples_and_keeps_existing_labels():
    """Mixed data set: only point samples get cluster labels; labels that exist (e.g. restored by a
    PseudoLabelRefresh on resume) are never overwritten, and nothing is recomputed when none is missing."""
    from lightning_weakseg.data import WeakSegDataModule
    from lightning_weakseg.regimes import PointSegModule

    dm = WeakSegDataModule(synthetic_kind="nuclei", n_samples=10, image_size=32, batch_size=4, augment="none",
                           label_fractions={"points": 0.5, "mask": 0.5}, val_fraction=0.2, seed=0)
    dm.setup("fit")
    ds = dm.train_dataset
    raw = [ds.raw_index(i) for i in range(len(ds))]
    point_raw = sorted(r for r in raw if "points" in ds.keys_for(r))
    assert 2 <= len(point_raw) < len(raw)            # really mixed
    model = PointSegModule(encoder="resnet18", num_classes=2, point_cluster_kwargs={"scale": 0.3})
    model.trainer = SimpleTrainer(dm)
    calls = []
    real = model.cluster_label_maps
    model.cluster_label_maps = lambda loader, only=None: calls.append(set(only)) or real(loader, only)
    # restored labels for every point sample (a checkerboard, which no cluster label is): kept, no recomputation
    marker = (np.indices((32, 32)).sum(0) % 2).astype(np.uint8)
    restored = {r: marker.copy() for r in point_raw}
    ds.set_pseudo_labels(restored)
    model.on_fit_start()
    assert calls == [] and sorted(ds.pseudo_labels) == point_raw
    assert all((ds.pseudo_labels[r] == marker).all() for r in point_raw)
    # one point sample lacks a label: only it is computed, the others stay as they were
    del restored[point_raw[0]]
    ds.set_pseudo_labels(restored)
    model.on_fit_start()
    assert calls == [{point_raw[0]}] and sorted(ds.pseudo_labels) == point_raw
    assert all((ds.pseudo_labels[r] == marker).all() for r in point_raw[1:])
    assert not (ds.pseudo_labels[point_raw[0]] == marker).all()
    assert set(np.unique(ds.pseudo_labels[point_raw[0]])) <= {0, 1, 255}
