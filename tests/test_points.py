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


# ---------------------------------------------------------------- the mixin
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
