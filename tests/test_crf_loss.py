"""Gated / dense CRF losses against an explicit double loop over pixel pairs; dense CRF post-processing."""
import itertools

import numpy as np
import pytest
import torch

from lightning_weakseg.losses import dense_crf_loss, gated_crf_loss, GatedCRFLoss
from lightning_weakseg.pseudo import dense_crf


def slow_pairs(probs, image, valid, r, sxy, srgb):
    """Σ_i Σ_{j in window, j≠i} K_ij m_i m_j Σ_{a≠b} p_i^a p_j^b and Σ m_i m_j, per sample, by brute force."""
    B, K, H, W = probs.shape
    losses, pairs = [], []
    for b in range(B):
        num = probs.new_zeros(())
        den = 0.0
        for yi, xi, yj, xj in itertools.product(range(H), range(W), range(H), range(W)):
            if (yi, xi) == (yj, xj) or abs(yi - yj) > r or abs(xi - xj) > r:
                continue
            m = float(valid[b, yi, xi] * valid[b, yj, xj])
            kxy = np.exp(-((yi - yj) ** 2 + (xi - xj) ** 2) / (2 * sxy ** 2))
            krgb = torch.exp(-((image[b, :, yi, xi] - image[b, :, yj, xj]) ** 2).sum() / (2 * srgb ** 2))
            dis = sum(probs[b, a, yi, xi] * probs[b, c, yj, xj] for a in range(K) for c in range(K) if a != c)
            num = num + m * kxy * krgb * dis
            den += m
        losses.append(num)
        pairs.append(den)
    return torch.stack(losses), torch.tensor(pairs, dtype=probs.dtype)


@pytest.mark.parametrize("channels,K", [(3, 2), (1, 3)])
def test_gated_crf_matches_double_loop_values_and_gradients(channels, K):
    g = torch.Generator().manual_seed(channels)
    B, H, W, r, sxy, srgb = 2, 5, 6, 2, 1.5, 0.3
    logits = torch.randn(B, K, H, W, generator=g, dtype=torch.float64, requires_grad=True)
    image = torch.rand(B, channels, H, W, generator=g, dtype=torch.float64)
    valid = torch.rand(B, H, W, generator=g) > 0.25
    valid[1] = True
    probs = logits.softmax(1)
    fast = gated_crf_loss(probs, image, kernel_radius=r, sigma_xy=sxy, sigma_rgb=srgb, valid=valid)
    (g_fast,) = torch.autograd.grad(fast, logits)
    num, den = slow_pairs(logits.softmax(1), image, valid.double(), r, sxy, srgb)
    slow = (num / den).sum()  # the default reduction: the sum of the per-sample values
    (g_slow,) = torch.autograd.grad(slow, logits)
    assert torch.allclose(fast, slow, rtol=1e-10, atol=1e-12)
    assert torch.allclose(g_fast, g_slow, rtol=1e-8, atol=1e-12)
    # per-sample values, their mean, and the module wrapper
    per = gated_crf_loss(logits.softmax(1), image, r, sxy, srgb, valid, reduction="none")
    assert torch.allclose(per, num / den)
    assert torch.allclose(gated_crf_loss(logits.softmax(1), image, r, sxy, srgb, valid, reduction="mean"),
                          (num / den).mean())
    mod = GatedCRFLoss(r, sxy, srgb)
    assert torch.allclose(mod(logits.softmax(1), image, valid), fast)
    # windowed dense CRF loss: same numerator, each sample divided by its number of valid pixels
    dense = dense_crf_loss(logits.softmax(1), image, r, sxy, srgb, valid, reduction="none")
    assert torch.allclose(dense, num / valid.flatten(1).sum(1))


def test_gated_crf_downscale_equals_loss_on_pooled_inputs():
    g = torch.Generator().manual_seed(0)
    probs = torch.randn(1, 2, 8, 8, generator=g, dtype=torch.float64).softmax(1)
    image = torch.rand(1, 3, 8, 8, generator=g, dtype=torch.float64)
    pooled = gated_crf_loss(torch.nn.functional.avg_pool2d(probs, 2), torch.nn.functional.avg_pool2d(image, 2),
                            kernel_radius=2, sigma_xy=1.5, sigma_rgb=0.2)
    ds = gated_crf_loss(probs, image, kernel_radius=2, sigma_xy=3.0, sigma_rgb=0.2, downscale=2)
    assert torch.allclose(pooled, ds)


def test_gated_crf_prefers_edge_aligned_segmentation():
    image = torch.zeros(1, 1, 8, 8)
    image[..., 4:] = 1.0
    aligned = torch.zeros(1, 2, 8, 8)
    aligned[:, 0, :, :4] = 1
    aligned[:, 1, :, 4:] = 1
    shifted = torch.roll(aligned, 2, dims=-1)
    lo = gated_crf_loss(aligned, image, kernel_radius=3, sigma_xy=6, sigma_rgb=0.1)
    hi = gated_crf_loss(shifted, image, kernel_radius=3, sigma_xy=6, sigma_rgb=0.1)
    assert lo < 1e-6 < hi


def test_gated_crf_rejects_bad_shapes():
    with pytest.raises(ValueError, match="expected image"):
        gated_crf_loss(torch.rand(1, 2, 4, 4), torch.rand(1, 3, 5, 4))
    with pytest.raises(ValueError, match="expected valid"):
        gated_crf_loss(torch.rand(1, 2, 4, 4), torch.rand(1, 3, 4, 4), valid=torch.ones(1, 4, 5))


def test_dense_crf_moves_noisy_map_towards_image_edge():
    rng = np.random.default_rng(0)
    img = np.zeros((24, 24), np.uint8)
    img[:, 12:] = 220
    # the unary puts the boundary at column 16 (4 px off the image edge) and adds noise
    p1 = np.where(np.arange(24)[None, :] >= 16, 0.7, 0.3) + rng.normal(0, 0.1, (24, 24))
    p1 = np.clip(p1, 0.05, 0.95).astype(np.float32)
    probs = np.stack([1 - p1, p1])
    truth = np.broadcast_to(np.arange(24)[None, :] >= 12, (24, 24))
    before = ((probs.argmax(0) == 1) == truth).mean()
    q = dense_crf(img, probs, iterations=5)
    after = ((q.argmax(0) == 1) == truth).mean()
    assert q.shape == probs.shape and np.allclose(q.sum(0), 1, atol=1e-4)
    assert before < 0.85 and after > 0.97
    # RGB input gives the same answer as replicated grayscale
    q3 = dense_crf(np.repeat(img[..., None], 3, 2), probs, iterations=5)
    assert np.allclose(q, q3)
