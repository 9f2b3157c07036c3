"""Generalized and symmetric cross-entropy against their formulas (per-pixel values, per-sample means and
closed-form gradients, evaluated pixel by pixel in Python), their limits, ignore handling, and the
RobustLossMixin's term (which replaces the base ``seg/ce``)."""
import math

import pytest
import torch

from lightning_weakseg.losses import (GeneralizedCrossEntropyLoss, SymmetricCrossEntropyLoss,
                                      generalized_cross_entropy, generalized_cross_entropy_map,
                                      symmetric_cross_entropy, symmetric_cross_entropy_map)
from lightning_weakseg.regimes import RobustSegModule


def softmax_list(s):
    m = max(s)
    e = [math.exp(v - m) for v in s]
    return [v / sum(e) for v in e]


def gce_ref(s, y, q):
    """L_q = (1 − p_y^q) / q and ∂L/∂s_k = −p_y^q (δ_ky − p_k)."""
    p = softmax_list(s)
    return (1 - p[y] ** q) / q, [-(p[y] ** q) * ((k == y) - p[k]) for k in range(len(s))]


def sce_ref(s, y, alpha, beta, A):
    """α·(−log p_y) + β·(−Σ_k p_k log q_k), q one-hot with log 0 := A; gradient in closed form."""
    p = softmax_list(s)
    log_q = [0.0 if k == y else A for k in range(len(s))]
    value = alpha * -math.log(p[y]) + beta * -sum(pk * lq for pk, lq in zip(p, log_q))
    # ∂CE/∂s_k = p_k − δ_ky ; RCE = −A (1 − p_y) → ∂RCE/∂s_k = A p_y (δ_ky − p_k)
    grad = [alpha * (p[k] - (k == y)) + beta * A * p[y] * ((k == y) - p[k]) for k in range(len(s))]
    return value, grad


def tiny_case(seed=0, K=3):
    g = torch.Generator().manual_seed(seed)
    logits = (3 * torch.randn(2, K, 3, 4, generator=g, dtype=torch.float64)).requires_grad_(True)
    target = torch.randint(0, K, (2, 3, 4), generator=g)
    target[0, 1, 2] = 255
    target[1, 0, :2] = 255
    return logits, target


def check_against(fn_map, fn, ref, logits, target):
    """Per-pixel values, per-sample means over the labelled pixels, their batch mean and sum, and the gradient of
    the mean, against the Python reference."""
    per = fn_map(logits, target)
    per_sample = fn(logits, target, "none")
    mean = fn(logits, target, "mean")
    (grad,) = torch.autograd.grad(mean, logits)
    B, _, H, W = logits.shape
    want, want_grad = [0.0] * B, torch.zeros_like(logits)
    for b in range(B):
        n = sum(int(target[b, i, j] != 255) for i in range(H) for j in range(W))
        for i in range(H):
            for j in range(W):
                y = int(target[b, i, j])
                if y == 255:
                    assert per[b, i, j].item() == 0.0
                    continue
                v, gr = ref(logits[b, :, i, j].tolist(), y)
                assert per[b, i, j].item() == pytest.approx(v, rel=1e-10, abs=1e-12)
                want[b] += v / n
                want_grad[b, :, i, j] = torch.tensor(gr, dtype=torch.float64) / n / B
    assert per_sample.tolist() == pytest.approx(want, rel=1e-10)
    assert mean.item() == pytest.approx(sum(want) / B, rel=1e-10)
    torch.testing.assert_close(grad, want_grad, rtol=1e-8, atol=1e-12)
    assert fn(logits, target, "sum").item() == pytest.approx(sum(want), rel=1e-10)


@pytest.mark.parametrize("q", [0.7, 0.3, 1.0])
def test_gce_against_formula(q):
    logits, target = tiny_case(0)
    check_against(lambda s, t: generalized_cross_entropy_map(s, t, q=q),
                  lambda s, t, r: generalized_cross_entropy(s, t, q=q, reduction=r),
                  lambda s, y: gce_ref(s, y, q), logits, target)


@pytest.mark.parametrize("alpha,beta,A", [(0.1, 1.0, -4.0), (1.0, 0.5, -2.0)])
def test_sce_against_formula(alpha, beta, A):
    logits, target = tiny_case(1, K=4)
    check_against(lambda s, t: symmetric_cross_entropy_map(s, t, alpha, beta, A),
                  lambda s, t, r: symmetric_cross_entropy(s, t, alpha, beta, A, reduction=r),
                  lambda s, y: sce_ref(s, y, alpha, beta, A), logits, target)


def test_limits_and_hand_values():
    logits, target = tiny_case(2)
    lab = target != 255
    safe = target.clamp(max=2)
    per_sample = lambda v: (v * lab).flatten(1).sum(1) / lab.flatten(1).sum(1)  # noqa: E731 - mean over labelled
    ce = per_sample(torch.nn.functional.cross_entropy(logits, safe, reduction="none"))
    py = logits.softmax(1).gather(1, safe.unsqueeze(1)).squeeze(1)
    # q → 0 is cross-entropy; q = 1 is 1 − p_y
    torch.testing.assert_close(generalized_cross_entropy(logits, target, q=1e-7, reduction="none"), ce, rtol=1e-5,
                               atol=0)
    torch.testing.assert_close(generalized_cross_entropy(logits, target, q=1.0, reduction="none"), per_sample(1 - py))
    # SCE with β = 0 is α·CE; with α = 0 it is −A (1 − p_y)
    torch.testing.assert_close(symmetric_cross_entropy(logits, target, 1.0, 0.0, reduction="none"), ce)
    torch.testing.assert_close(symmetric_cross_entropy(logits, target, 0.0, 1.0, -4.0, reduction="none"),
                               per_sample(4 * (1 - py)))
    # p = (1/2, 1/2): GCE(q=0.7) = (1 − 0.5^0.7)/0.7, SCE = 0.1 ln 2 + 4 · 0.5
    half = torch.zeros(1, 2, 1, 1)
    assert generalized_cross_entropy(half, torch.tensor([[[1]]])).item() == pytest.approx((1 - 0.5 ** 0.7) / 0.7)
    assert symmetric_cross_entropy(half, torch.tensor([[[0]]])).item() == pytest.approx(0.1 * math.log(2) + 2.0)
    # a map without labelled pixels: 0, finite gradient
    empty = torch.full((1, 3, 4), 255)
    x = torch.randn(1, 3, 3, 4, requires_grad=True)
    generalized_cross_entropy(x, empty).backward()
    assert generalized_cross_entropy(x, empty).item() == 0.0 and x.grad.abs().max() == 0
    # modules store their hyper-parameters
    assert GeneralizedCrossEntropyLoss(q=0.5)(logits, target).item() == pytest.approx(
        generalized_cross_entropy(logits, target, q=0.5).item())
    assert SymmetricCrossEntropyLoss(0.3, 0.7, -3.0)(logits, target).item() == pytest.approx(
        symmetric_cross_entropy(logits, target, 0.3, 0.7, -3.0).item())


def test_bad_inputs():
    logits, target = tiny_case(0)
    with pytest.raises(ValueError, match=r"q in \(0, 1\]"):
        generalized_cross_entropy(logits, target, q=0.0)
    with pytest.raises(ValueError, match="log_zero < 0"):
        symmetric_cross_entropy(logits, target, log_zero=0.5)
    with pytest.raises(ValueError, match=r"values in \[0, 2\]"):
        generalized_cross_entropy(logits, torch.full_like(target, 3))
    with pytest.raises(ValueError, match="target of shape"):
        symmetric_cross_entropy(logits, target[:, :2])
    with pytest.raises(ValueError, match="integer class target"):
        generalized_cross_entropy(logits, target.double())


@pytest.mark.parametrize("robust_loss", ["gce", "sce"])
def test_mixin_term_is_per_image_mean_then_batch_mean(robust_loss):
    torch.manual_seed(0)
    model = RobustSegModule(robust_loss=robust_loss, encoder="resnet18", num_classes=3, gce_q=0.6,
                            sce_alpha=0.2, sce_beta=0.9, model_kwargs={"encoder_depth": 3,
                                                                      "decoder_channels": (16, 8, 4)})
    logits, target = tiny_case(3)
    has = torch.tensor([True, False])
    batch = {"image": torch.rand(2, 3, 3, 4), "noisy_mask": target, "has_noisy_mask": has}
    terms = model.loss_terms(batch, {"logits": logits, "probs": logits.softmax(1)})
    assert set(terms) == {f"noisy/{robust_loss}"}
    ref = (lambda s, y: gce_ref(s, y, 0.6)) if robust_loss == "gce" else (lambda s, y: sce_ref(s, y, 0.2, 0.9, -4.0))
    vals = [ref(logits[0, :, i, j].tolist(), int(target[0, i, j]))[0]
            for i in range(3) for j in range(4) if target[0, i, j] != 255]
    # image 1 has no noisy mask: it counts 0, the mean is over the batch of 2
    assert terms[f"noisy/{robust_loss}"].item() == pytest.approx(sum(vals) / len(vals) / 2, rel=1e-10)


def test_mixin_replaces_the_base_term():
    """``replaces_base_term``: with ``mask_key`` on the noisy mask the robust loss is the only term; an explicit
    ``loss_weights["seg/ce"]`` still turns plain CE back on."""
    tiny = {"encoder_depth": 3, "decoder_channels": (16, 8, 4)}
    logits, target = tiny_case(4)
    batch = {"image": torch.rand(2, 3, 3, 4), "noisy_mask": target, "has_noisy_mask": torch.ones(2, dtype=torch.bool)}
    out = {"logits": logits, "probs": logits.softmax(1)}
    model = RobustSegModule(num_classes=3, mask_key="noisy_mask", model_kwargs=tiny)
    assert set(model.loss_terms(batch, out)) == {"noisy/gce"}
    both = RobustSegModule(num_classes=3, mask_key="noisy_mask", model_kwargs=tiny, loss_weights={"seg/ce": 0.5})
    assert set(both.loss_terms(batch, out)) == {"noisy/gce", "seg/ce"}
