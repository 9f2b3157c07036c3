"""log_barrier and quadratic_penalty against their formulas (hand-evaluated with Python's math)."""
import math

import pytest
import torch

from lightning_weakseg.losses.log_barrier import LogBarrier, log_barrier, quadratic_penalty


def psi_ref(z: float, t: float) -> float:
    if z <= -1.0 / t**2:
        return -math.log(-z) / t
    return t * z - math.log(1.0 / t**2) / t + 1.0 / t


def dpsi_ref(z: float, t: float) -> float:
    return -1.0 / (t * z) if z <= -1.0 / t**2 else t


@pytest.mark.parametrize("t", [0.5, 1.0, 5.0, 37.3])
def test_values_and_gradients_on_both_branches(t):
    pts = [-50.0, -3.0, -1.0, -0.9 / t**2 * 10, -2.0 / t**2, -0.5 / t**2, -1e-9, 0.0, 1e-3, 0.7, 12.0]
    z = torch.tensor(pts, dtype=torch.float64, requires_grad=True)
    out = log_barrier(z, t)
    out.sum().backward()
    for zi, oi, gi in zip(pts, out.tolist(), z.grad.tolist()):
        assert oi == pytest.approx(psi_ref(zi, t), rel=1e-12, abs=1e-12)
        assert gi == pytest.approx(dpsi_ref(zi, t), rel=1e-12, abs=1e-12)
    assert torch.isfinite(z.grad).all()


@pytest.mark.parametrize("t", [1.0, 5.0, 5.5, 100.0])
def test_junction_is_c1(t):
    j = -1.0 / t**2
    eps = 1e-9 * abs(j)
    z = torch.tensor([j - eps, j, j + eps], dtype=torch.float64, requires_grad=True)
    v = log_barrier(z, t)
    v.sum().backward()
    # value continuous: the two one-sided values agree with the junction value to O(eps * t)
    assert v[0].item() == pytest.approx(v[2].item(), abs=10 * t * eps)
    assert v[1].item() == pytest.approx(-math.log(-j) / t, rel=1e-12)
    # both branches at the junction, evaluated by their own formulas, agree
    assert -math.log(-j) / t == pytest.approx(t * j - math.log(1 / t**2) / t + 1 / t, rel=1e-12)
    # derivative continuous: -1/(t z) at z = -1/t^2 equals t
    assert z.grad.tolist() == pytest.approx([t, t, t], rel=1e-6)


def test_no_nan_gradient_from_unselected_branch():
    # z >= 0 would make log(-z) NaN/-inf in the unselected branch; torch.where must not leak it.
    z = torch.tensor([0.0, 1e-30, 5.0, 1e6, -1e-30], requires_grad=True)
    log_barrier(z, 5.0).sum().backward()
    assert torch.isfinite(z.grad).all()
    assert z.grad.tolist() == pytest.approx([5.0] * 5)


def test_tensor_t_broadcasts():
    z = torch.tensor([[-1.0], [0.5]], dtype=torch.float64)
    t = torch.tensor([1.0, 2.0, 4.0], dtype=torch.float64)
    out = log_barrier(z, t)
    assert out.shape == (2, 3)
    for i, zi in enumerate([-1.0, 0.5]):
        for j, tj in enumerate([1.0, 2.0, 4.0]):
            assert out[i, j].item() == pytest.approx(psi_ref(zi, tj), rel=1e-12, abs=1e-12)


def test_large_t_approaches_indicator():
    z = torch.tensor([-2.0, -0.5, -0.01], dtype=torch.float64)
    assert log_barrier(z, 1e6).abs().max().item() < 1e-4


def test_quadratic_penalty():
    z = torch.tensor([-2.0, 0.0, 0.5, 3.0], requires_grad=True)
    out = quadratic_penalty(z)
    out.sum().backward()
    assert out.tolist() == pytest.approx([0.0, 0.0, 0.25, 9.0])
    assert z.grad.tolist() == pytest.approx([0.0, 0.0, 1.0, 6.0])


def test_bad_inputs():
    with pytest.raises(ValueError, match="t > 0"):
        log_barrier(torch.zeros(2), 0.0)
    with pytest.raises(ValueError, match="t > 0"):
        log_barrier(torch.zeros(2), torch.tensor([1.0, -1.0]))
    with pytest.raises(TypeError, match="floating point"):
        log_barrier(torch.zeros(2, dtype=torch.long), 1.0)
    assert LogBarrier(3.0)(torch.tensor([0.0])).item() == pytest.approx(psi_ref(0.0, 3.0), rel=1e-6)
