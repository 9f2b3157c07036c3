"""Co-teaching extensions: one forget rate per class (selection, mixin, ForgetRateSchedule state), per-sample
ranking by Dice, and the experimental peer relabelling of the rejected pixels (against loops; ``relabel_to``).
Helpers come from tests/test_coteaching.py.
"""
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import lightning_weakseg.losses.coteaching as ct
import lightning_weakseg.regimes.coteaching as regime
from lightning_weakseg.callbacks import ForgetRateSchedule
from lightning_weakseg.losses import coteaching_keep_ratio, coteaching_losses
from test_coteaching import R_ref, _Module, noisy_batch, tiny_module


# ----------------------------------------------------------------------------- one forget rate per class
def test_per_class_keep_ratios_keep_their_own_fraction_of_each_class():
    """A sequence of keep ratios (pixel selection): class c keeps round(R_c · n_c) of its labelled pixels, and they
    are its smallest losses (a sort per class written out here)."""
    torch.manual_seed(1)
    b, h, w = 2, 8, 9
    target = torch.zeros(b, h, w, dtype=torch.long)
    target[:, :3, :4] = 1                      # 24 pixels of class 1
    target[:, 5:, 5:] = 2                      # 24 pixels of class 2
    target[1, 0, 8] = 255
    logits_a, logits_b = torch.randn(b, 3, h, w), torch.randn(b, 3, h, w)
    ratios = (0.95, 0.5, 0.25)
    out = coteaching_losses(logits_a, logits_b, target, None, ratios, selection="pixel")
    ce = {"select_a": F.cross_entropy(logits_a, target.clamp_max(2), reduction="none"),
          "select_b": F.cross_entropy(logits_b, target.clamp_max(2), reduction="none")}
    for key in ("select_a", "select_b"):
        for c, r in enumerate(ratios):
            vals = ce[key][target == c]
            k = int(len(vals) * r + 0.5)
            kept = ce[key][out[key] & (target == c)]
            assert len(kept) == k, (key, c)
            assert torch.equal(torch.sort(kept).values, torch.sort(vals).values[:k]), (key, c)
        assert not out[key][target == 255].any()
    # a scalar R equals the same R repeated per class
    same = coteaching_losses(logits_a, logits_b, target, None, (0.5,) * 3, selection="pixel")
    scalar = coteaching_losses(logits_a, logits_b, target, None, 0.5, selection="pixel")
    assert torch.equal(same["select_a"], scalar["select_a"]) and torch.equal(same["loss_b"], scalar["loss_b"])
    with pytest.raises(ValueError, match="one keep ratio per class"):
        coteaching_losses(logits_a, logits_b, target, None, (0.5, 0.5), selection="pixel")
    with pytest.raises(ValueError, match="pixel selection"):
        coteaching_losses(logits_a, logits_b, target, None, ratios)


def test_per_class_forget_rates_in_the_mixin_and_the_schedule(monkeypatch):
    assert coteaching_keep_ratio(2, [0.0, 0.4], 4) == (1.0, pytest.approx(R_ref(2, 0.4, 4)))
    with pytest.raises(ValueError, match="pixel selection"):
        tiny_module(forget_rate=[0.1, 0.3])
    with pytest.raises(ValueError, match="num_classes=2"):
        tiny_module(forget_rate=[0.1, 0.2, 0.3], selection="pixel")
    model = tiny_module(forget_rate=[0.0, 0.5], num_gradual=0, selection="pixel")
    assert model.current_keep_ratio() == (1.0, 0.5)                          # epoch 0, T_k = 0: τ at once
    batch = noisy_batch()
    model.train()
    seen = {}

    def record(*args, **kwargs):
        seen.update(ct.coteaching_losses(*args, **kwargs))
        return seen

    monkeypatch.setattr(regime, "coteaching_losses", record)
    model.loss_terms(batch, model(batch["image"]))                          # the mixin's own path
    target = batch["noisy_mask"]
    for key in ("select_a", "select_b"):
        assert torch.equal(seen[key] & (target == 0), target == 0)          # τ_0 = 0: all background kept
        assert int((seen[key] & (target == 1)).sum()) == int((target == 1).sum() * 0.5 + 0.5)
    # the callback's tuple reaches the module, survives its checkpoint state, and continues the schedule
    cb, module = ForgetRateSchedule(), _Module(forget_rate=[0.1, 0.6], num_gradual=3, exponent=1.0)
    cb.on_fit_start(None, module)
    cb.on_train_epoch_start(SimpleNamespace(current_epoch=1), module)
    assert module.keep_ratio == (pytest.approx(R_ref(1, 0.1, 3)), pytest.approx(R_ref(1, 0.6, 3)))
    state = cb.state_dict()
    assert state["forget_rate"] == [0.1, 0.6] and isinstance(state["keep_ratio"], list)
    fresh, module2 = ForgetRateSchedule(forget_rate=0.3), _Module(forget_rate=0.3, num_gradual=1)
    fresh.load_state_dict(state)
    assert fresh.keep_ratio == module.keep_ratio
    fresh.on_fit_start(None, module2)
    fresh.on_train_epoch_start(SimpleNamespace(current_epoch=2), module2)
    assert module2.keep_ratio == (pytest.approx(R_ref(2, 0.1, 3)), pytest.approx(R_ref(2, 0.6, 3)))


# ----------------------------------------------------------------------------- peer relabelling (experimental)
@pytest.mark.parametrize("relabel_to", ["any", "foreground"])
def test_peer_relabel_losses_against_a_loop(relabel_to):
    """Each network's relabel loss: Σ over labelled pixels its PEER rejected (and, with "foreground", where the peer's
    arg-max is not class 0) of −log p(peer's arg-max), / #labelled."""
    torch.manual_seed(3)
    b, k, h, w = 2, 3, 4, 5
    la, lb = torch.randn(b, k, h, w, requires_grad=True), torch.randn(b, k, h, w, requires_grad=True)
    labelled = torch.rand(b, h, w) > 0.2
    sel_a, sel_b = (torch.rand(b, h, w) > 0.5) & labelled, (torch.rand(b, h, w) > 0.5) & labelled
    got_a, got_b = ct.peer_relabel_losses(la, lb, sel_a, sel_b, labelled, relabel_to=relabel_to)
    for got, me, peer, peer_sel in ((got_a, la, lb, sel_b), (got_b, lb, la, sel_a)):
        total, n, taught = 0.0, 0, torch.zeros(b, h, w, dtype=torch.bool)
        for i in range(b):
            for y in range(h):
                for x in range(w):
                    if not labelled[i, y, x]:
                        continue
                    n += 1
                    tgt = int(peer[i, :, y, x].argmax())
                    if not peer_sel[i, y, x] and (relabel_to == "any" or tgt != 0):
                        taught[i, y, x] = True
                        total -= float(me.detach()[i, :, y, x].log_softmax(0)[tgt])
        assert got.item() == pytest.approx(total / n, rel=1e-5)
        if me is la:
            taught_a = taught
    if relabel_to == "foreground":
        assert 0 < taught_a.sum() < (labelled & ~sel_b).sum()      # the restriction removed some pixels, not all
    got_a.backward()
    assert lb.grad is None                                          # the peer's arg-max is a target, not a path
    reach = la.grad.abs().sum(1) > 0
    assert torch.equal(reach, taught_a)                             # only what the PEER rejected (and may teach)
    with pytest.raises(ValueError, match="relabel_to"):
        ct.peer_relabel_losses(la, lb, sel_a, sel_b, labelled, relabel_to="background")


def test_mixin_relabel_terms_start_after_the_ramp(monkeypatch):
    model = tiny_module(forget_rate=0.3, num_gradual=2, selection="pixel", experimental={"relabel_rejected": True})
    batch = noisy_batch()
    model.train()
    terms0 = model.loss_terms(batch, model(batch["image"]))         # epoch 0 < T_k: no relabel terms yet
    assert "noisy/relabel_a" not in terms0
    monkeypatch.setattr(type(model), "current_epoch", property(lambda self: 2))
    terms = model.loss_terms(batch, model(batch["image"]))
    assert {"noisy/relabel_a", "noisy/relabel_b"} <= set(terms)
    assert terms["noisy/relabel_a"].item() > 0
    # relabel_to reaches the loss: the mixin's term equals the function's on the same outputs and selections
    fg = tiny_module(forget_rate=0.3, num_gradual=2, selection="pixel",
                     experimental={"relabel_rejected": True, "relabel_to": "foreground"})
    fg.load_state_dict(model.state_dict())
    fg.train()
    monkeypatch.setattr(type(fg), "current_epoch", property(lambda self: 2))
    torch.manual_seed(0)
    out = fg(batch["image"])
    terms_fg = fg.loss_terms(batch, out)
    res = ct.coteaching_losses(out["logits_a"], out["logits_b"], batch["noisy_mask"], batch["has_noisy_mask"],
                               fg.current_keep_ratio(), selection="pixel")
    labelled = (batch["noisy_mask"] != 255) & batch["has_noisy_mask"].view(-1, 1, 1)
    ref = ct.peer_relabel_losses(out["logits_a"], out["logits_b"], res["select_a"], res["select_b"], labelled,
                                 relabel_to="foreground")
    assert terms_fg["noisy/relabel_a"].item() == pytest.approx(ref[0].item(), rel=1e-6)
    ref_any = ct.peer_relabel_losses(out["logits_a"], out["logits_b"], res["select_a"], res["select_b"], labelled)
    assert ref_any[0].item() > ref[0].item() * 1.01                  # the restriction matters on this batch


# ----------------------------------------------------------------------------- per-sample ranking by Dice
def _dice_loss_loop(probs, target):
    """1 − mean over foreground classes of (2·Σ p·y + 1) / (Σ p + Σ y + 1), over labelled pixels, a loop per pixel."""
    out = []
    for n in range(probs.shape[0]):
        dices = []
        for c in range(1, probs.shape[1]):
            inter = den = 0.0
            for i in range(target.shape[1]):
                for j in range(target.shape[2]):
                    if target[n, i, j] == 255:
                        continue
                    p, y = float(probs[n, c, i, j]), float(target[n, i, j] == c)
                    inter += p * y
                    den += p + y
            dices.append((2 * inter + 1) / (den + 1))
        out.append(1 - sum(dices) / len(dices))
    return torch.tensor(out)


def test_sample_rank_dice_selects_by_dice_and_trains_on_ce():
    """Per-sample selection: each network keeps the R·B images with the smallest per-image soft Dice loss (a loop
    here), and its PEER trains on their mean CE. The hand-built case is the failure of CE ranking: image 0's mask
    lost its object (all background) where both networks see one; by mean CE it is the easiest image (most of every
    image is background), by Dice the hardest."""
    torch.manual_seed(3)
    b, k, h, w = 4, 2, 6, 6
    target = torch.zeros(b, h, w, dtype=torch.long)
    target[1:, 1:4, 1:4] = 1                               # images 1-3 hold a 3x3 object; image 0's was dropped
    target[2, 0, 0] = 255
    obj = torch.zeros(b, h, w, dtype=torch.bool)
    obj[:, 1:4, 1:4] = True
    scene = torch.where(obj, 2.0, -3.0)                    # both networks find the object in every image ...
    scene[0] = torch.where(obj[0], -1.5, -5.0)             # ... image 0's faintly (p ≈ 0.18), on a clear background
    logits_a = torch.randn(b, k, h, w) * 0.1
    logits_b = torch.randn(b, k, h, w) * 0.1
    logits_a[:, 1] += scene
    logits_b[:, 1] += scene
    logits_a.requires_grad_(True)
    logits_b.requires_grad_(True)
    labelled = target != 255
    ce = {n: (F.cross_entropy(lg, target.clamp_max(1), reduction="none") * labelled).flatten(1).sum(1)
          / labelled.flatten(1).sum(1) for n, lg in (("a", logits_a), ("b", logits_b))}
    assert int(ce["a"].argmin()) == 0 and int(ce["b"].argmin()) == 0   # CE ranking would keep the wrong mask
    r = 0.5
    by_ce = coteaching_losses(logits_a, logits_b, target, None, r, selection="sample",
                              experimental={"sample_rank": "ce"})
    assert by_ce["select_a"][0] and by_ce["select_b"][0]
    out = coteaching_losses(logits_a, logits_b, target, None, r, selection="sample")
    for n, lg, key in (("a", logits_a, "select_a"), ("b", logits_b, "select_b")):
        ref = _dice_loss_loop(torch.softmax(lg.detach(), 1), target)
        assert int(ref.argmax()) == 0
        keep = torch.zeros(b, dtype=torch.bool)
        keep[torch.argsort(ref)[:2]] = True
        assert torch.equal(out[key], keep), (key, ref)
    # each network trains on the mean CE of its peer's picks
    torch.testing.assert_close(out["loss_a"], ce["a"][out["select_b"]].mean())
    torch.testing.assert_close(out["loss_b"], ce["b"][out["select_a"]].mean())
    out["loss_a"].backward()
    assert logits_b.grad is None and logits_a.grad[~out["select_b"]].abs().sum() == 0


def test_mixin_relabels_the_images_a_sample_selection_rejected(monkeypatch):
    """selection="sample" + experimental relabel_rejected: network a learns network b's arg-max on every labelled pixel
    of the images b's selection REJECTED, / all labelled pixels (a loop); the images b kept get no relabel gradient."""
    model = tiny_module(selection="sample", forget_rate=0.5, num_gradual=1, experimental={"relabel_rejected": True})
    model.train()
    monkeypatch.setattr(type(model), "current_epoch", property(lambda self: 1))
    batch = noisy_batch(B=4)
    out = model(batch["image"])
    terms = model.loss_terms(batch, out)
    res = ct.coteaching_losses(out["logits_a"], out["logits_b"], batch["noisy_mask"], batch["has_noisy_mask"],
                               model.current_keep_ratio(), selection="sample")
    assert res["select_b"].sum() == 2                               # R = 0.5 of 4 images
    target = batch["noisy_mask"]
    la, lb = out["logits_a"].detach(), out["logits_b"].detach()
    total, n = 0.0, 0
    for i in range(4):
        for y in range(target.shape[1]):
            for x in range(target.shape[2]):
                if target[i, y, x] == 255:
                    continue
                n += 1
                if not res["select_b"][i]:
                    total -= float(la[i, :, y, x].log_softmax(0)[lb[i, :, y, x].argmax()])
    assert terms["noisy/relabel_a"].item() == pytest.approx(total / n, rel=1e-5)
    grad = torch.autograd.grad(terms["noisy/relabel_a"], out["logits_a"])[0]
    reach = grad.abs().flatten(1).sum(1) > 0
    assert torch.equal(reach, ~res["select_b"])                     # only the images the PEER rejected


# ----------------------------------------------------------------------------- the clean-subset oracle (benchmark)
def test_clean_subset_oracle_trains_on_the_uncorrupted_images_only(bench_oracle):
    """benchmarks/oracle.py's OracleCleanSubsetSegModule: its loss is the mean, over the images whose noisy mask equals
    the clean one, of each image's mean CE over its labelled pixels (a loop here); a corrupted image has no gradient."""
    oracle = bench_oracle
    torch.manual_seed(0)
    b, k, h, w = 4, 3, 6, 5
    mask = torch.randint(0, k, (b, h, w))
    noisy = mask.clone()
    noisy[1, 2, 3] = (mask[1, 2, 3] + 1) % k          # image 1 corrupted by one pixel
    noisy[3] = 0                                       # image 3: every object dropped
    noisy[0, 0, :] = 255                               # image 0 clean, with unknown pixels (ignored in both)
    mask[0, 0, :] = 255
    logits = torch.randn(b, k, h, w, requires_grad=True)
    module = oracle.OracleCleanSubsetSegModule(num_classes=k, mask_key="noisy_mask")
    batch = {"image": torch.zeros(b, 3, h, w), "mask": mask, "noisy_mask": noisy,
             "has_noisy_mask": torch.tensor([True, True, True, False]), "has_mask": torch.ones(b, dtype=torch.bool)}
    terms = module.loss_terms(batch, {"logits": logits})
    ref = []
    for i in (0, 2):                                   # clean and labelled: 1 and 3 corrupted, 3 also unlabelled
        vals = [F.cross_entropy(logits[i, :, y, x][None], noisy[i, y, x][None])
                for y in range(h) for x in range(w) if noisy[i, y, x] != 255]
        ref.append(torch.stack(vals).mean())
    assert torch.allclose(terms["seg/ce"], torch.stack(ref).mean(), atol=1e-6)
    terms["seg/ce"].backward()
    assert logits.grad[[1, 3]].abs().sum() == 0 and logits.grad[[0, 2]].abs().sum() > 0
