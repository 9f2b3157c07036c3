"""The weak-label simulator against hand-checkable properties of each label type."""
import numpy as np
import pytest
from scipy import ndimage as ndi

from lightning_weakseg.data import SyntheticDataset
from lightning_weakseg.data.weakify import (boxes_from_mask, noisy_mask, points_from_mask, scribbles_from_mask,
                                            tags_from_mask)


@pytest.fixture
def organ():
    raw = SyntheticDataset("organ", n=4, image_size=64).load_raw(1)
    return raw["mask"]


def test_tags_hand_case():
    m = np.array([[0, 3], [255, 3]])
    assert tags_from_mask(m, 4).tolist() == [1, 0, 0, 1]


def test_boxes_are_tight_per_component():
    m = np.zeros((10, 12), np.uint8)
    m[1:4, 2:5] = 1
    m[6:9, 7:12] = 1
    m[5, 0] = 2
    rows = sorted(boxes_from_mask(m).tolist())
    assert rows == [[1, 2, 1, 5, 4], [1, 7, 6, 12, 9], [2, 0, 5, 1, 6]]


def test_box_jitter_stays_in_image_and_is_seeded(organ):
    a = boxes_from_mask(organ, jitter=0.2, rng=np.random.default_rng(1))
    b = boxes_from_mask(organ, jitter=0.2, rng=np.random.default_rng(1))
    assert (a == b).all() and (a[:, 1:] >= 0).all() and (a[:, [3, 4]] <= 64).all()
    assert (a[:, 3] > a[:, 1]).all() and (a[:, 4] > a[:, 2]).all()
    assert not (a == boxes_from_mask(organ)).all()


def test_instance_boxes_and_points_use_instances():
    ds = SyntheticDataset("nuclei", n=2, image_size=64)
    raw = ds.load_raw(0)
    inst, mask = raw["instances"], raw["mask"]
    b = boxes_from_mask(mask, inst)
    assert len(b) == inst.max()
    p = points_from_mask(mask, inst, "centroid")
    ids = inst[p[:, 1].astype(int), p[:, 2].astype(int)]
    assert sorted(ids.tolist()) == list(range(1, inst.max() + 1))  # one point inside each nucleus


def test_centroid_point_is_object_pixel_nearest_centroid():
    m = np.zeros((9, 9), np.uint8)
    m[2:7, 1:4] = 1  # centroid (4, 2)
    assert points_from_mask(m).tolist() == [[1, 4, 2]]
    ring = np.zeros((11, 11), np.uint8)
    ring[1:10, 1:10] = 1
    ring[3:8, 3:8] = 0  # centroid in the hole: the point must still be on the object
    y, x = points_from_mask(ring)[0, 1:].astype(int)
    assert ring[y, x] == 1


def test_click_points_inside_and_fraction(organ):
    rng = np.random.default_rng(0)
    p = points_from_mask(organ, mode="click", rng=rng)
    assert (organ[p[:, 1].astype(int), p[:, 2].astype(int)] == p[:, 0]).all()
    ds = SyntheticDataset("nuclei", n=1, image_size=128)
    raw = ds.load_raw(0)
    n_all = raw["instances"].max()
    part = points_from_mask(raw["mask"], raw["instances"], "click", 0.5, np.random.default_rng(3))
    assert 0.2 * n_all < len(part) < 0.8 * n_all


def test_scribbles_stay_inside_their_regions(organ):
    s = scribbles_from_mask(organ, 4, np.random.default_rng(0))
    lab = s != 255
    assert (s[lab] == organ[lab]).all()                       # every stroke pixel has its true class
    assert set(np.unique(s[lab])) == set(np.unique(organ))    # every class gets a stroke
    assert 0.002 < lab.mean() < 0.15                          # sparse, like ACDC (~1%)


def test_noisy_mask_rate_controls_damage(organ):
    def dice(a, b):
        fa, fb = a > 0, b > 0
        return 2 * (fa & fb).sum() / (fa.sum() + fb.sum())
    assert (noisy_mask(organ, 0.0, np.random.default_rng(0)) == organ).all()
    d = {r: np.mean([dice(noisy_mask(organ, r, np.random.default_rng(s)), organ) for s in range(12)])
         for r in (0.1, 0.3, 0.6)}
    assert d[0.1] > d[0.3] > d[0.6]
    assert d[0.1] > 0.85 and d[0.6] < 0.85


def test_noisy_fraction_corrupts_that_share_of_masks(organ):
    """``fraction`` picks which masks are corrupted (one uniform draw each, below ``fraction`` → corrupted); a
    corrupted mask is exactly the every-mask simulator run on the generator after that draw."""
    n, f = 200, 0.3
    corrupted = 0
    for s in range(n):
        out = noisy_mask(organ, 0.6, np.random.default_rng(s), fraction=f)
        ref = np.random.default_rng(s)
        draw = ref.random()
        if draw < f:
            corrupted += 1
            assert (out == noisy_mask(organ, 0.6, ref)).all()
        else:
            assert (out == organ).all()
    # the count is Binomial(200, 0.3): mean 60, sd 6.5
    assert abs(corrupted - n * f) < 4 * np.sqrt(n * f * (1 - f))
    # fraction 1 draws nothing extra: the masks are those of the plain simulator
    assert all((noisy_mask(organ, 0.6, np.random.default_rng(s), fraction=1.0)
                == noisy_mask(organ, 0.6, np.random.default_rng(s))).all() for s in range(5))
    assert all((noisy_mask(organ, 0.6, np.random.default_rng(s), fraction=0.0) == organ).all() for s in range(5))
    with pytest.raises(ValueError, match="fraction"):
        noisy_mask(organ, 0.6, np.random.default_rng(0), fraction=1.5)
