"""Co-teaching: the keep-ratio schedule, the small-loss selection against a brute-force sort (both DDP methods),
the kept fraction R(T) in pixel and sample mode, the peer exchange (inside the mixin, by gradients), the
experimental options (co-teaching+, their validation), inference modes, and the ForgetRateSchedule's checkpoint
state.

(2-process DDP equality of the mixin's selections is checked by tests/test_ddp.py through
scripts/ddp_regime_check.py; scripts/ddp_coteaching_check.py checks the raw selection with uneven shards.)
"""
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import lightning_weakseg.losses.coteaching as ct
import lightning_weakseg.losses.selection as selmod
import lightning_weakseg.regimes.coteaching as regime
from lightning_weakseg.callbacks import ForgetRateSchedule
from lightning_weakseg.losses import (coteaching_keep_ratio, coteaching_losses, coteaching_pair_loss,
                                      small_loss_selection, soft_dice_loss)
from lightning_weakseg.regimes import CoTeachingSegModule


def R_ref(T, tau, Tk, c=1.0):
    """R(T) = 1 − min(T^c / T_k · τ, τ), written out."""
    return 1.0 - min(T ** c / Tk * tau, tau)


def brute_force(losses, valid, ratio):
    """Sort (loss, position) pairs of the valid items, keep the first floor(R·N + 1/2)."""
    flat, ok = losses.reshape(-1).tolist(), valid.reshape(-1).tolist()
    items = sorted((math.inf if v != v else v, i) for i, (v, good) in enumerate(zip(flat, ok)) if good)
    keep = torch.zeros(len(flat), dtype=torch.bool)
    for _, i in items[:int(len(items) * ratio + 0.5)]:
        keep[i] = True
    return keep.reshape(losses.shape)


# ----------------------------------------------------------------------------- schedule
@pytest.mark.parametrize("tau,Tk,c", [(0.5, 4, 1.0), (0.3, 10, 1.0), (0.45, 5, 2.0), (0.2, 3, 0.5)])
def test_keep_ratio_formula(tau, Tk, c):
    for T in range(0, 13):
        assert coteaching_keep_ratio(T, tau, Tk, c) == pytest.approx(R_ref(T, tau, Tk, c), abs=1e-12)
    assert coteaching_keep_ratio(0, tau, 0) == pytest.approx(1 - tau)      # T_k = 0: forget τ from the start
    with pytest.raises(ValueError, match="forget_rate"):
        coteaching_keep_ratio(0, 1.5)


# ----------------------------------------------------------------------------- selection
@pytest.mark.parametrize("ratio", [0.0, 0.25, 0.5, 0.613, 0.9, 1.0])
def test_selection_equals_brute_force_with_ties_both_methods(ratio, monkeypatch):
    g = torch.Generator().manual_seed(1)
    losses = torch.randint(0, 6, (3, 7, 5), generator=g).float() / 3       # many exact ties
    losses[0, 0, :3] = torch.tensor([-0.0, 0.0, float("nan")])             # -0 ties +0, NaN sorts last
    valid = torch.rand(3, 7, 5, generator=g) > 0.3
    want = brute_force(losses, valid, ratio)
    assert torch.equal(small_loss_selection(losses, ratio, valid), want)
    # the radix path (used under DDP) run in one process: its all-reduces are identities for one rank
    monkeypatch.setattr(selmod.dist, "all_reduce", lambda t, group=None: None)
    keys = selmod._ordered_keys(losses).reshape(-1)
    radix = selmod._select_radix(keys, valid.reshape(-1), ratio, None, 1, 0).reshape(losses.shape)
    assert torch.equal(radix, want)


def test_pair_loss_exchanges_selections_hand_computed():
    la = torch.tensor([0.1, 0.9, 0.5, 0.7], requires_grad=True)
    lb = torch.tensor([0.8, 0.2, 0.6, 0.4], requires_grad=True)
    out = coteaching_pair_loss(la, lb, 0.5)
    assert out["select_a"].tolist() == [True, False, True, False]            # A's small losses: items 0, 2
    assert out["select_b"].tolist() == [False, True, False, True]            # B's small losses: items 1, 3
    # A learns on B's picks, B on A's; with its own picks A's loss would be (0.1 + 0.5) / 2 = 0.3
    assert out["loss_a"].item() == pytest.approx((0.9 + 0.7) / 2)
    assert out["loss_b"].item() == pytest.approx((0.8 + 0.6) / 2)
    (out["loss_a"] + out["loss_b"]).backward()
    assert la.grad.tolist() == pytest.approx([0, 0.5, 0, 0.5]) and lb.grad.tolist() == pytest.approx([0.5, 0, 0.5, 0])


@pytest.mark.parametrize("selection,experimental", [("sample", None), ("sample", {"sample_rank": "ce"}),
                                                    ("pixel", {"class_balanced": False})])
def test_kept_fraction_equals_R_of_T(selection, experimental):
    g = torch.Generator().manual_seed(0)
    B, K, H, W = 9, 3, 12, 10
    la, lb = torch.randn(B, K, H, W, generator=g), torch.randn(B, K, H, W, generator=g)
    target = torch.randint(0, K, (B, H, W), generator=g)
    target[torch.rand(B, H, W, generator=g) < 0.15] = 255
    target[4] = 255                                                          # a sample with no labelled pixel
    has = torch.ones(B, dtype=torch.bool)
    has[7] = False                                                           # a sample without a noisy mask
    labelled = (target != 255) & has[:, None, None]
    n = int(labelled.sum()) if selection == "pixel" else int(labelled.flatten(1).any(1).sum())
    ce_a = torch.nn.functional.cross_entropy(la, target.clamp(max=K - 1), reduction="none")
    if selection == "pixel":                                                 # A ranks its pixels by CE
        rank_a = ce_a
    elif experimental:                                                       # ... its images by mean CE
        rank_a = (ce_a * labelled).flatten(1).sum(1) / labelled.flatten(1).sum(1).clamp_min(1)
    else:                                                                    # ... by Dice on the labelled pixels
        noisy = torch.where(labelled, target, torch.full_like(target, 255))
        rank_a = soft_dice_loss(la.softmax(1), noisy)
    for T in range(7):
        R = coteaching_keep_ratio(T, 0.5, 4)
        assert R == pytest.approx(R_ref(T, 0.5, 4))
        res = coteaching_losses(la, lb, target, has, R, selection=selection, experimental=experimental)
        for sel in (res["select_a"], res["select_b"]):
            assert abs(int(sel.sum()) - R * n) <= 0.5                        # to one item (rounded)
            assert not (sel & ~res["candidates"]).any()
        assert torch.equal(res["select_a"], brute_force(rank_a, res["candidates"], R))  # A's smallest losses


def test_coteaching_plus_selects_among_disagreements():
    g = torch.Generator().manual_seed(3)
    la, lb = torch.randn(2, 2, 16, 16, generator=g), torch.randn(2, 2, 16, 16, generator=g)
    target = torch.randint(0, 2, (2, 16, 16), generator=g)
    target[:, :2] = 255
    plus = {"coteach_plus": True, "plus_min_disagreement": 0.0, "class_balanced": False}   # the paper's rule
    res = coteaching_losses(la, lb, target, None, 0.6, selection="pixel", experimental=plus)
    disagree = (la.argmax(1) != lb.argmax(1)) & (target != 255)
    assert torch.equal(res["candidates"], disagree) and 0 < int(disagree.sum()) < disagree.numel()
    assert abs(int(res["select_a"].sum()) - 0.6 * int(disagree.sum())) <= 0.5


def test_coteaching_plus_falls_back_per_class_when_networks_agree():
    # co-teaching+ (an experimental option), with its fallback at the default 0.1:
    # class 1 (the rare one): the networks agree on all but one of its 40 labelled pixels (1/40 < 0.1), so
    # class 1 falls back to plain co-teaching; class 0 has plenty of disagreement and keeps the plus rule
    g = torch.Generator().manual_seed(5)
    target = torch.zeros(2, 16, 16, dtype=torch.long)
    target[0, 2:6, 2:12] = 1  # 40 pixels of class 1
    la = torch.randn(2, 2, 16, 16, generator=g)
    lb = la.clone()
    flip = torch.rand(2, 16, 16, generator=g) < 0.5
    flip &= target == 0
    lb[:, 0][flip], lb[:, 1][flip] = la[:, 1][flip], la[:, 0][flip]  # swapped scores: argmax differs when unequal
    lb[0, :, 2, 2] = lb[0, :, 2, 2].flip(0)  # one disagreement pixel inside class 1
    disagree = la.argmax(1) != lb.argmax(1)
    assert int((disagree & (target == 1)).sum()) == 1 and int((disagree & (target == 0)).sum()) > 100
    ce_a = torch.nn.functional.cross_entropy(la, target, reduction="none")
    res = coteaching_losses(la, lb, target, None, 0.5, selection="pixel", experimental={"coteach_plus": True})
    expected = (disagree & (target == 0)) | (target == 1)
    assert torch.equal(res["candidates"], expected)
    for c, cand in ((0, disagree & (target == 0)), (1, target == 1)):
        assert torch.equal(res["select_a"] & (target == c), brute_force(ce_a, cand, 0.5))
    # the paper's rule (0): class 1 keeps only its single disagreement pixel as a candidate
    res0 = coteaching_losses(la, lb, target, None, 0.5, selection="pixel",
                             experimental={"coteach_plus": True, "plus_min_disagreement": 0.0})
    assert int((res0["candidates"] & (target == 1)).sum()) == 1
    # without balance the whole labelled set is one group: 0.5 of it disagrees → no fallback at 0.1 ...
    one = {"coteach_plus": True, "class_balanced": False}
    res_u = coteaching_losses(la, lb, target, None, 0.5, selection="pixel", experimental=one)
    assert torch.equal(res_u["candidates"], disagree)
    # ... and a fallback at 0.9
    res_f = coteaching_losses(la, lb, target, None, 0.5, selection="pixel",
                              experimental={**one, "plus_min_disagreement": 0.9})
    assert torch.equal(res_f["candidates"], torch.ones_like(disagree))


# ----------------------------------------------------------------------------- the mixin
TINY = {"encoder_depth": 3, "decoder_channels": (16, 8, 4)}


def tiny_module(**kw):
    torch.manual_seed(0)
    return CoTeachingSegModule(encoder="resnet18", in_channels=3, num_classes=2, model_kwargs=TINY, **kw)


def noisy_batch(B=3, hw=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    noisy = torch.randint(0, 2, (B, hw, hw), generator=g)
    noisy[torch.rand(B, hw, hw, generator=g) < 0.1] = 255
    return {"image": torch.rand(B, 3, hw, hw, generator=g), "noisy_mask": noisy,
            "has_noisy_mask": torch.ones(B, dtype=torch.bool)}


@pytest.mark.parametrize("selection", ["pixel", "sample"])
def test_mixin_peers_learn_from_each_others_selection(selection, monkeypatch):
    """Each network's gradient reaches exactly the items its PEER selected: fails if a network used its own."""
    model = tiny_module(selection=selection, forget_rate=0.5, num_gradual=4)
    model.keep_ratio = coteaching_keep_ratio(3, 0.5, 4)                      # R = 0.625, as the callback sets it
    seen = {}

    def record(*args, **kwargs):
        seen.update(ct.coteaching_losses(*args, **kwargs))
        return seen

    monkeypatch.setattr(regime, "coteaching_losses", record)
    model.train()
    batch = noisy_batch(B=6 if selection == "sample" else 3)
    out = model(batch["image"])
    out["logits_a"].retain_grad()
    out["logits_b"].retain_grad()
    terms = model.loss_terms(batch, out)
    assert set(terms) == {"noisy/coteach_a", "noisy/coteach_b"}
    sel_a, sel_b, cand = seen["select_a"], seen["select_b"], seen["candidates"]
    assert abs(int(sel_a.sum()) - 0.625 * int(cand.sum())) <= 0.5
    assert (sel_a != sel_b).any()                                            # the two selections differ
    terms["noisy/coteach_a"].backward(retain_graph=True)
    reach_a = out["logits_a"].grad.abs().sum(1) > 0
    if selection == "sample":
        reach_a = reach_a.flatten(1).any(1)
    assert torch.equal(reach_a, sel_b)
    assert out["logits_b"].grad is None or out["logits_b"].grad.abs().max() == 0
    assert all(p.grad is None or p.grad.abs().max() == 0 for p in model.peer_model.parameters())
    terms["noisy/coteach_b"].backward()
    reach_b = out["logits_b"].grad.abs().sum(1) > 0
    if selection == "sample":
        reach_b = reach_b.flatten(1).any(1)
    assert torch.equal(reach_b, sel_a)


def test_mixin_default_schedule_and_inference_modes():
    model = tiny_module(forget_rate=0.4, num_gradual=2, inference="average")
    model.trainer = SimpleNamespace(current_epoch=1)  # current_epoch is all the schedule reads
    assert model.current_keep_ratio() == pytest.approx(R_ref(1, 0.4, 2))     # no callback: the mixin's schedule
    model.keep_ratio = 0.9
    assert model.current_keep_ratio() == 0.9                                  # the callback's value wins
    model.eval()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        pa = model.model(x).softmax(1)
        pb = model.peer_model(x).softmax(1)
        avg = model(x)
        model.hparams.inference = "a"
        only_a = model(x)
        model.hparams.inference = "b"
        only_b = model(x)
    torch.testing.assert_close(avg["probs"], (pa + pb) / 2)
    torch.testing.assert_close(avg["logits"].softmax(1), (pa + pb) / 2)
    torch.testing.assert_close(only_a["probs"], pa)
    torch.testing.assert_close(only_b["probs"], pb)


# ----------------------------------------------------------------------------- ForgetRateSchedule state
class _Module:
    def __init__(self, **hp):
        self.hparams = hp
        self.keep_ratio = None

    def log(self, *a, **k):
        pass


def test_forget_rate_schedule_state_restores_the_schedule():
    module = _Module(forget_rate=0.5, num_gradual=4, exponent=1.0)
    cb = ForgetRateSchedule()
    cb.on_fit_start(None, module)                                             # τ, T_k, c from the module
    for epoch in range(3):
        cb.on_train_epoch_start(SimpleNamespace(current_epoch=epoch), module)
        assert module.keep_ratio == pytest.approx(R_ref(epoch, 0.5, 4))
    state = cb.state_dict()
    assert state == {"forget_rate": 0.5, "num_gradual": 4, "exponent": 1.0, "epoch": 2, "keep_ratio": 0.75}
    # resume with a callback (and module) configured differently: the checkpoint's schedule continues
    fresh, module2 = ForgetRateSchedule(forget_rate=0.1, num_gradual=100), _Module(forget_rate=0.2, num_gradual=1)
    fresh.load_state_dict(state)
    fresh.on_fit_start(None, module2)
    assert (fresh.forget_rate, fresh.num_gradual, fresh.exponent) == (0.5, 4, 1.0)
    for epoch in (3, 4, 5):
        fresh.on_train_epoch_start(SimpleNamespace(current_epoch=epoch), module2)
        assert module2.keep_ratio == pytest.approx(R_ref(epoch, 0.5, 4))


def test_class_balanced_selection_keeps_R_of_each_class():
    """Pixel selection: R of the labelled pixels of *each* noisy-label class are kept (round half up), even when one
    class's losses are all larger than the other's; without it the hard minority class is dropped first."""
    torch.manual_seed(0)
    b, h, w = 2, 6, 7
    target = torch.zeros(b, h, w, dtype=torch.long)
    target[:, :2, :3] = 1                      # 12 foreground pixels, 72 background
    target[0, 5, 6] = 255                      # one unlabelled pixel
    logits_a, logits_b = torch.randn(b, 2, h, w), torch.randn(b, 2, h, w)
    logits_a[:, 1] -= 3.0 * (target == 1)      # foreground is hard for both networks: large losses
    logits_b[:, 1] -= 3.0 * (target == 1)
    ratio = 0.6
    out = coteaching_losses(logits_a, logits_b, target, None, ratio, selection="pixel")
    for key in ("select_a", "select_b"):
        sel = out[key]
        for c, n in ((0, 71), (1, 12)):
            assert int((sel & (target == c)).sum()) == int(n * ratio + 0.5), (key, c)
        assert not sel[target == 255].any()
    # a slow reference: per class, the smallest round(R n_c) CE values of network a
    ce_a = F.cross_entropy(logits_a, target.clamp_max(1), reduction="none")
    for c in (0, 1):
        vals = ce_a[target == c]
        k = int(len(vals) * ratio + 0.5)
        assert torch.equal(torch.sort(ce_a[out["select_a"] & (target == c)]).values, torch.sort(vals).values[:k])
    plain = coteaching_losses(logits_a, logits_b, target, None, ratio, selection="pixel",
                              experimental={"class_balanced": False})   # one ranking over all pixels
    assert int((plain["select_a"] & (target == 1)).sum()) < int(12 * ratio + 0.5)  # the imbalance it fixes


# ----------------------------------------------------------------------------- defaults and experimental options
def test_mixin_defaults_are_dice_ranked_sample_selection(monkeypatch):
    """By default the mixin selects images ranked by Dice and passes no experimental option to the selection; its
    two terms replace the base ``seg/ce`` on the noisy mask (``replaces_base_term``)."""
    model = tiny_module(mask_key="noisy_mask")
    assert (model.hparams.selection, model.hparams.forget_rate, model.hparams.experimental) == ("sample", 0.3, None)
    seen = {}

    def record(*args, **kwargs):
        seen["kwargs"] = kwargs
        return ct.coteaching_losses(*args, **kwargs)

    monkeypatch.setattr(regime, "coteaching_losses", record)
    model.keep_ratio = 0.5
    model.train()
    batch = noisy_batch(B=4)
    out = model(batch["image"])
    terms = model.loss_terms(batch, out)
    assert set(terms) == {"noisy/coteach_a", "noisy/coteach_b"}
    assert seen["kwargs"]["selection"] == "sample" and seen["kwargs"]["experimental"] is None
    noisy = batch["noisy_mask"]
    ce = {n: F.cross_entropy(out[f"logits_{n}"], noisy, ignore_index=255, reduction="none").flatten(1).sum(1)
          / (noisy != 255).flatten(1).sum(1) for n in ("a", "b")}
    dice_b = soft_dice_loss(out["logits_b"].detach().softmax(1), noisy)
    keep_b = brute_force(dice_b, torch.ones(4, dtype=torch.bool), 0.5)     # B's two smallest Dice losses ...
    torch.testing.assert_close(terms["noisy/coteach_a"], ce["a"][keep_b].mean())  # ... train A on their CE


def test_experimental_options_are_validated():
    la, lb = torch.randn(2, 2, 4, 4), torch.randn(2, 2, 4, 4)
    target = torch.randint(0, 2, (2, 4, 4))
    with pytest.raises(ValueError, match=r"unknown experimental options \['relabel'\]"):
        coteaching_losses(la, lb, target, None, 0.5, experimental={"relabel": True})
    with pytest.raises(ValueError, match="relabel_rejected"):   # a mixin option, not the selection's
        coteaching_losses(la, lb, target, None, 0.5, experimental={"relabel_rejected": True})
    with pytest.raises(ValueError, match="'sample_rank': expected 'dice' or 'ce', got 'iou'"):
        coteaching_losses(la, lb, target, None, 0.5, experimental={"sample_rank": "iou"})
    with pytest.raises(ValueError, match="plus_min_disagreement"):
        coteaching_losses(la, lb, target, None, 0.5, experimental={"coteach_plus": True, "plus_min_disagreement": 2})
    with pytest.raises(ValueError, match="needs class-balanced pixel selection"):
        coteaching_losses(la, lb, target, None, (0.5, 0.5))                  # per-class ratios, sample selection
    with pytest.raises(ValueError, match="needs class-balanced pixel selection"):
        coteaching_losses(la, lb, target, None, (0.5, 0.5), selection="pixel", experimental={"class_balanced": False})
    with pytest.raises(ValueError, match="unknown experimental options"):
        tiny_module(experimental={"class_balance": False})
    with pytest.raises(ValueError, match="'coteach_plus': expected a bool"):
        tiny_module(experimental={"coteach_plus": "yes"})
    with pytest.raises(ValueError, match="'relabel_to': expected 'any' or 'foreground'"):
        tiny_module(experimental={"relabel_rejected": True, "relabel_to": "bg"})
    with pytest.raises(ValueError, match="'plus_start_epoch': expected an epoch"):
        tiny_module(experimental={"coteach_plus": True, "plus_start_epoch": -1})
    with pytest.raises(ValueError, match="needs class-balanced pixel selection"):
        tiny_module(forget_rate=[0.1, 0.3])


def test_mixin_starts_coteaching_plus_at_its_epoch(monkeypatch):
    """experimental coteach_plus with plus_start_epoch: plain co-teaching before it, disagreement candidates from it
    on (with the fallback fraction passed through)."""
    model = tiny_module(selection="pixel", experimental={"coteach_plus": True, "plus_start_epoch": 2,
                                                         "plus_min_disagreement": 0.0})
    seen = []
    monkeypatch.setattr(regime, "coteaching_losses",
                        lambda *a, **kw: seen.append(kw["experimental"]) or ct.coteaching_losses(*a, **kw))
    model.train()
    batch = noisy_batch()
    for epoch in (1, 2):
        monkeypatch.setattr(type(model), "current_epoch", property(lambda self, e=epoch: e))
        model.loss_terms(batch, model(batch["image"]))
    assert seen == [None, {"coteach_plus": True, "plus_min_disagreement": 0.0}]
