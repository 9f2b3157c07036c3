"""MIL pooling and the tag loss against hand-computed values and obvious references."""
import math

import pytest
import torch
import torch.nn.functional as F

from lightning_weakseg.losses import (AttentionMIL, MILLoss, mil_gem, mil_loss, mil_lse, mil_max, mil_mean, mil_pool,
                                      mil_topk, softmax_log_odds)

S = torch.tensor([[[[1.0, -2.0], [3.0, 0.5]], [[0.0, 0.0], [0.0, 4.0]]]])  # (1, 2, 2, 2)


def test_hand_computed_values():
    assert torch.allclose(mil_max(S), torch.tensor([[3.0, 4.0]]))
    assert torch.allclose(mil_mean(S), torch.tensor([[2.5 / 4, 1.0]]))
    assert torch.allclose(mil_topk(S, 2), torch.tensor([[2.0, 2.0]]))
    assert torch.allclose(mil_topk(S, 0.25), mil_max(S))
    lse = [math.log((math.exp(2) + math.exp(-4) + math.exp(6) + math.exp(1)) / 4) / 2, math.log((3 + math.exp(8)) / 4) / 2]
    assert torch.allclose(mil_lse(S, 2.0), torch.tensor([lse]), atol=1e-6)
    q = torch.tensor([[[0.1, 0.2, 0.7]]])
    assert torch.allclose(mil_gem(q, p=2.0), torch.tensor([[math.sqrt((0.01 + 0.04 + 0.49) / 3)]]), atol=1e-6)


def test_lse_and_gem_limits():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(3, 4, 8, 8, generator=g)
    assert torch.allclose(mil_lse(s, 1e3), mil_max(s), atol=1e-2)
    assert (mil_lse(s, 1e3) <= mil_max(s) + 1e-6).all()
    assert torch.allclose(mil_lse(s, 1e-4), mil_mean(s), atol=1e-3)
    r = torch.tensor([0.1, 1.0, 10.0])
    vals = torch.stack([mil_lse(s, float(x)) for x in r])
    assert (vals[1:] >= vals[:-1] - 1e-6).all()  # monotone in r
    q = s.sigmoid()
    assert torch.allclose(mil_gem(q, p=1.0), mil_mean(q), atol=1e-5)
    assert torch.allclose(mil_gem(q, p=500.0), mil_max(q), atol=2e-2)
    assert torch.equal(mil_pool(s, "topk", k=3), s.flatten(2).sort(2, descending=True).values[..., :3].mean(2))
    with pytest.raises(ValueError, match="non-negative"):
        mil_gem(s)
    with pytest.raises(ValueError, match="unknown"):
        mil_pool(s, "median")


def test_attention_mil_matches_formula():
    torch.manual_seed(0)
    att = AttentionMIL(3, hidden=5)
    h = torch.randn(2, 3, 4, 4)
    z = att(h)
    for b in range(2):
        inst = h[b].reshape(3, -1).T  # (N, D)
        logits = torch.stack([att.w.weight[0] @ torch.tanh(att.V.weight @ hi + att.V.bias) for hi in inst])
        a = torch.softmax(logits, 0)
        assert torch.allclose(z[b], (a[:, None] * inst).sum(0), atol=1e-6)
        assert torch.allclose(att.attention[b], a, atol=1e-6)
    # constant bag → z equals the instance
    const = torch.ones(1, 3, 2, 2) * torch.tensor([1.0, -2.0, 0.5]).view(1, 3, 1, 1)
    assert torch.allclose(att(const), torch.tensor([[1.0, -2.0, 0.5]]), atol=1e-6)


def test_softmax_log_odds_and_loss():
    g = torch.Generator().manual_seed(1)
    s = torch.randn(2, 3, 5, 5, generator=g)
    p = s.softmax(1)
    assert torch.allclose(softmax_log_odds(s), torch.log(p / (1 - p)), atol=1e-5)
    z = torch.tensor([[0.5, -1.0, 2.0]])
    t = torch.tensor([[1.0, 0.0, 1.0]])
    sig = torch.sigmoid(z)
    want = -(t * sig.log() + (1 - t) * (1 - sig).log()).mean()
    assert torch.allclose(mil_loss(z, t, reduction="none"), want.view(1), atol=1e-6)
    assert torch.allclose(mil_loss(z, t, classes=slice(1, None), reduction="none"),
                          -(torch.log(1 - sig[0, 1]) + sig[0, 2].log()).view(1) / 2)
    assert torch.allclose(mil_loss(sig, t, probabilities=True, reduction="none"), want.view(1), atol=1e-5)


def test_mil_loss_module_learns_presence():
    """A free logit map trained with max-pooling MIL puts the absent class below 0.5 everywhere and makes the
    present class win somewhere (max pooling sends the gradient to the arg-max pixel only: with untied
    logits, the present class wins at that one pixel and nowhere else)."""
    torch.manual_seed(0)
    logits = (0.1 * torch.randn(2, 3, 6, 6)).requires_grad_()
    tags = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 1.0]])
    loss_fn = MILLoss("max", reduction="mean")
    opt = torch.optim.SGD([logits], lr=1.0)
    for _ in range(50):
        opt.zero_grad()
        loss_fn(logits, tags).backward()
        opt.step()
    p = logits.detach().softmax(1)
    assert p[0, 2].max() < 0.5 and p[1, 1].max() < 0.5
    assert p[0, 1].max() > 0.5 and p[1, 2].max() > 0.5
    assert int((p[0, 1] > 0.5).sum()) == 1 and int((p[1, 2] > 0.5).sum()) == 1
    assert loss_fn.image_scores(logits).shape == (2, 3)
    gem = MILLoss("gem", p=3.0)
    assert torch.allclose(gem(logits, tags), mil_loss(mil_gem(logits.softmax(1), 3.0), tags, probabilities=True,
                                                       classes=slice(1, None)))
    att = MILLoss("attention", num_classes=3, reduction="none")
    assert att(logits, tags).shape == (2,)
