"""CAM refinement: the affinity random walk against a dense slow reference, the pseudo-mask rule against a
per-pixel reference and hand cases, the dense-CRF wrapper on a picture whose answer is known."""
import math

import pytest
import torch
import torch.nn.functional as F

from lightning_weakseg.pseudo.cam_refine import (affinity_random_walk, cam_to_pseudo, cams_to_probs, crf_refine_cams,
                                                 disk_offsets, transition_matrix)


def dense_walk_reference(cams, image, radius, sigma_rgb, sigma_xy, beta, t):
    """T built pixel pair by pixel pair, T^t by matrix_power, per sample and channel."""
    b, k, h, w = cams.shape
    out = torch.zeros(b, k, h, w, dtype=torch.float64)
    for s in range(b):
        a = torch.zeros(h * w, h * w, dtype=torch.float64)
        for i in range(h * w):
            yi, xi = divmod(i, w)
            for j in range(h * w):
                yj, xj = divmod(j, w)
                d2 = (yi - yj) ** 2 + (xi - xj) ** 2
                if d2 > radius ** 2:
                    continue
                e = float(((image[s, :, yi, xi] - image[s, :, yj, xj]) ** 2).sum()) / (2 * sigma_rgb ** 2)
                if sigma_xy is not None:
                    e += d2 / (2 * sigma_xy ** 2)
                a[i, j] = math.exp(-e) ** beta
        tm = a / a.sum(1, keepdim=True)
        tp = torch.linalg.matrix_power(tm, t)
        out[s] = (tp @ cams[s].double().reshape(k, -1).T).T.reshape(k, h, w)
    return out


@pytest.mark.parametrize("sigma_xy", [None, 1.5])
def test_random_walk_matches_dense_reference(sigma_xy):
    g = torch.Generator().manual_seed(0)
    cams = torch.rand(2, 3, 5, 6, generator=g)
    image = torch.rand(2, 2, 5, 6, generator=g)
    got = affinity_random_walk(cams, image, radius=2.5, sigma_rgb=0.3, sigma_xy=sigma_xy, beta=2.0, iterations=7,
                               renormalize=False)
    want = dense_walk_reference(cams, image, 2.5, 0.3, sigma_xy, 2.0, 7)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)
    assert (got - cams).abs().max() > 0.05  # the walk changed something
    # renormalize divides every channel by its maximum
    norm = affinity_random_walk(cams, image, radius=2.5, sigma_rgb=0.3, sigma_xy=sigma_xy, beta=2.0, iterations=7)
    torch.testing.assert_close(norm.double(), want / want.flatten(2).amax(2)[..., None, None], atol=1e-5, rtol=1e-5)


def test_transition_matrix_is_row_stochastic_and_local():
    image = torch.rand(3, 1, 7, 4)
    t = transition_matrix(image, radius=2, sigma_rgb=10.0).to_dense()
    torch.testing.assert_close(t.sum(1), torch.ones(3 * 28))
    assert t[:28, 28:].abs().sum() == 0  # samples do not mix
    assert len(disk_offsets(2)) == 13 and len(disk_offsets(1.5)) == 9
    # pixel (0, 0) reaches exactly the disk of radius 2 around it inside the image: 6 pixels
    assert int((t[0] > 0).sum()) == 6


def test_walk_respects_edges_and_fills_regions():
    image = torch.zeros(1, 1, 8, 8)
    image[..., 4:] = 1.0
    cams = torch.zeros(1, 2, 8, 8)
    cams[0, 1, 3, 1] = 1.0
    out = affinity_random_walk(cams, image, radius=3, sigma_rgb=0.1, iterations=300)
    assert out[0, 1, :, :4].min() > 0.95           # the seed's region is filled ...
    assert out[0, 1, :, 4:].max() < 1e-6           # ... and the colour edge stops it
    # a constant map is a fixed point of a row-stochastic T
    const = torch.full((2, 2, 8, 8), 0.3)
    torch.testing.assert_close(affinity_random_walk(const, torch.rand(2, 1, 8, 8), iterations=5, renormalize=False),
                               const)


def test_downscale_tags_and_background():
    g = torch.Generator().manual_seed(2)
    cams = torch.rand(2, 3, 8, 10, generator=g)
    image = torch.rand(2, 1, 8, 10, generator=g)
    tags = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    kw = dict(radius=2, sigma_rgb=0.5, beta=1.0, iterations=3, renormalize=False)
    got = affinity_random_walk(cams, image, downscale=2, tags=tags, **kw)
    small = F.avg_pool2d(cams * tags[:, :, None, None], 2)
    ref = dense_walk_reference(small, F.avg_pool2d(image, 2), 2, 0.5, None, 1.0, 3)
    ref = F.interpolate(ref, size=(8, 10), mode="bilinear", align_corners=False)
    torch.testing.assert_close(got.double(), ref, atol=1e-5, rtol=1e-5)
    assert got[0, 2].abs().max() == 0  # untagged class stays empty
    # background "class": (1 − max fg)^α propagated, foreground zeroed where it wins
    cams = 0.1 * cams
    cams[:, 1, :, :4] += 0.8
    cams[:, 2, 5:, 6:] += 0.7
    out = affinity_random_walk(cams, image, background_alpha=0.5, **kw)
    m = cams.clone()
    m[:, 0] = (1 - cams[:, 1:].amax(1)) ** 0.5
    ref = dense_walk_reference(m, image, 2, 0.5, None, 1.0, 3).float()
    wins = ref[:, :1] > ref[:, 1:].amax(1, keepdim=True)
    assert wins.any() and (~wins).any()
    torch.testing.assert_close(out[:, 0], ref[:, 0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[:, 1:], ref[:, 1:].masked_fill(wins, 0.0), atol=1e-5, rtol=1e-5)


def pseudo_reference(cams, tags, fg, bg):
    b, k, h, w = cams.shape
    out = torch.full((b, h, w), 255, dtype=torch.long)
    for s in range(b):
        tagged = [c for c in range(k) if tags[s, c] > 0.5]
        for y in range(h):
            for x in range(w):
                if len(tagged) == 0:
                    continue
                if len(tagged) == 1:
                    out[s, y, x] = tagged[0]
                    continue
                fgc = [c for c in tagged if c >= 1]
                score = max((float(cams[s, c, y, x]) for c in fgc), default=0.0)
                if fgc and score >= fg:
                    out[s, y, x] = max(fgc, key=lambda c: float(cams[s, c, y, x]))
                elif score < bg and 0 in tagged:
                    out[s, y, x] = 0
    return out


def test_cam_to_pseudo_against_reference():
    g = torch.Generator().manual_seed(3)
    cams = torch.rand(6, 4, 5, 7, generator=g)
    tags = torch.tensor([[1, 1, 1, 1], [1, 0, 1, 0], [0, 1, 1, 0], [1, 0, 0, 0], [0, 0, 1, 0], [0, 0, 0, 0]],
                        dtype=torch.float32)
    got = cam_to_pseudo(cams, tags, 0.6, 0.3)
    want = pseudo_reference(cams, tags, 0.6, 0.3)
    assert torch.equal(got, want)
    # every outcome occurs in the first sample: class, background, ignore band
    assert {0, 1, 2, 3, 255} <= set(got[0].unique().tolist())
    assert set(got[1].unique().tolist()) <= {0, 2, 255}        # untagged classes never assigned
    assert 0 not in got[2].unique().tolist()                   # background untagged → never 0
    assert (got[3] == 0).all() and (got[4] == 2).all() and (got[5] == 255).all()
    # equal thresholds: no ignore band where the background is tagged
    assert (cam_to_pseudo(cams, tags, 0.5, 0.5)[:2] != 255).all()
    with pytest.raises(ValueError, match="bg_threshold"):
        cam_to_pseudo(cams, tags, 0.3, 0.6)
    with pytest.raises(ValueError, match="tags"):
        cam_to_pseudo(cams, tags[:, :3], 0.6, 0.3)


def test_cams_to_probs_and_crf():
    tags = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    cams = torch.zeros(2, 3, 24, 24)
    yy, xx = torch.meshgrid(torch.arange(24.0), torch.arange(24.0), indexing="ij")
    blob = torch.exp(-((yy - 12) ** 2 + (xx - 12) ** 2) / (2 * 7.0 ** 2))  # a blurry CAM around a square
    cams[:, 1] = blob
    cams[:, 2] = 0.9  # untagged: must vanish
    p = cams_to_probs(cams, tags)
    torch.testing.assert_close(p.sum(1), torch.ones(2, 24, 24))
    assert p[:, 2].abs().max() == 0 and (p[1, 0] == 1).all()
    torch.testing.assert_close(p[0, 1] / p[0, 0], (blob + 1e-5) / (1 - blob + 1e-5), atol=1e-4, rtol=1e-4)
    image = torch.zeros(2, 1, 24, 24)
    square = torch.zeros(24, 24, dtype=torch.bool)
    square[8:16, 8:16] = True
    image[:, 0][:, square] = 1.0
    q = crf_refine_cams(cams, image, tags, iterations=10, sxy_bilateral=20, srgb=20, compat_bilateral=10)
    torch.testing.assert_close(q[0].sum(0), torch.ones(24, 24), atol=1e-4, rtol=0)
    assert q[:, 2].abs().max() == 0 and (q[1, 0] == 1).all()

    def iou(pred):
        return float((pred & square).sum()) / float((pred | square).sum())

    raw = iou(blob >= 0.5)
    refined = iou(q[0, 1] >= 0.5)
    assert refined > raw + 0.2 and refined > 0.9
