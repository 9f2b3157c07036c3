"""Scribble regime: partial CE, entropy, TV against slow references; the mixin's terms, gradients, self-training."""
import math

import lightning as L
import pytest
import torch

from lightning_weakseg.callbacks import PseudoLabelRefresh
from lightning_weakseg.data import WeakSegDataModule
from lightning_weakseg.losses import (EntropyLoss, PartialCrossEntropyLoss, TotalVariationLoss, entropy_loss,
                                      gated_crf_loss, partial_cross_entropy, total_variation_loss)
from lightning_weakseg.regimes import ScribbleSegModule


def ref_pce(z, y, ignore=255):
    """CE restricted to labelled pixels, one pixel at a time: -z_y + log Σ_k exp z_k, averaged per sample."""
    out = []
    for b in range(z.shape[0]):
        vals = []
        for i in range(z.shape[2]):
            for j in range(z.shape[3]):
                c = int(y[b, i, j])
                if c == ignore:
                    continue
                col = [float(z[b, k, i, j]) for k in range(z.shape[1])]
                vals.append(-col[c] + math.log(sum(math.exp(v) for v in col)))
        out.append(sum(vals) / len(vals) if vals else 0.0)
    return torch.tensor(out, dtype=torch.float64)


def test_partial_ce_equals_ce_on_labelled_pixels():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(3, 4, 5, 6, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 4, (3, 5, 6), generator=g)
    y[torch.rand(3, 5, 6, generator=g) < 0.7] = 255
    y[2] = 255  # a sample without any labelled pixel
    ref = ref_pce(z.detach(), y)
    torch.testing.assert_close(partial_cross_entropy(z, y, reduction="none"), ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(partial_cross_entropy(z, y), ref.sum(), rtol=0, atol=1e-12)  # default: "sum"
    # "mean" is over the batch: the sample without labelled pixels counts as 0
    torch.testing.assert_close(partial_cross_entropy(z, y, reduction="mean"), ref.mean(), rtol=0, atol=1e-12)
    torch.testing.assert_close(PartialCrossEntropyLoss(reduction="sum")(z, y), ref.sum(), rtol=0, atol=1e-12)
    # unlabelled pixels (and the empty sample) get no gradient; labelled ones do
    partial_cross_entropy(z, y).backward()
    labelled = (y != 255).unsqueeze(1).expand_as(z)
    assert (z.grad[~labelled] == 0).all() and (z.grad[labelled] != 0).all()
    with pytest.raises(ValueError, match="target of shape"):
        partial_cross_entropy(z, y[:, :4])
    with pytest.raises(ValueError, match="reduction"):
        partial_cross_entropy(z, y, reduction="avg")


def test_entropy_against_slow_reference():
    g = torch.Generator().manual_seed(1)
    p = torch.randn(2, 3, 3, 4, generator=g, dtype=torch.float64).softmax(1)
    valid = torch.rand(2, 3, 4, generator=g) < 0.5
    valid[1] = False  # no valid pixel: 0
    ref_all, ref_valid = [], []
    for b in range(2):
        ents = [[-sum(float(p[b, k, i, j]) * math.log(float(p[b, k, i, j]) + 1e-8) for k in range(3))
                 for j in range(4)] for i in range(3)]
        flat = [e for row in ents for e in row]
        ref_all.append(sum(flat) / len(flat))
        sel = [ents[i][j] for i in range(3) for j in range(4) if valid[b, i, j]]
        ref_valid.append(sum(sel) / len(sel) if sel else 0.0)
    torch.testing.assert_close(entropy_loss(p, reduction="none"), torch.tensor(ref_all, dtype=torch.float64))
    torch.testing.assert_close(entropy_loss(p, valid, reduction="none"), torch.tensor(ref_valid, dtype=torch.float64))
    torch.testing.assert_close(EntropyLoss()(p), torch.tensor(ref_all, dtype=torch.float64).sum())
    torch.testing.assert_close(EntropyLoss("mean")(p), torch.tensor(ref_all, dtype=torch.float64).mean())
    # bounds: uniform → log K, one-hot → 0
    assert math.isclose(float(entropy_loss(torch.full((1, 4, 2, 2), 0.25))), math.log(4), rel_tol=1e-6)
    onehot = torch.zeros(1, 4, 2, 2)
    onehot[:, 1] = 1
    assert float(entropy_loss(onehot)) < 1e-6


def test_total_variation_against_slow_reference():
    g = torch.Generator().manual_seed(2)
    p = torch.randn(2, 3, 4, 5, generator=g, dtype=torch.float64).softmax(1)
    ref = []
    for b in range(2):
        s = 0.0
        for k in range(3):
            for i in range(4):
                for j in range(5):
                    if i + 1 < 4:
                        s += abs(float(p[b, k, i + 1, j] - p[b, k, i, j]))
                    if j + 1 < 5:
                        s += abs(float(p[b, k, i, j + 1] - p[b, k, i, j]))
        ref.append(s / 20)
    ref = torch.tensor(ref, dtype=torch.float64)
    torch.testing.assert_close(total_variation_loss(p, reduction="none"), ref)
    torch.testing.assert_close(TotalVariationLoss(reduction="sum")(p), ref.sum())
    # a vertical edge across a 4×4 two-class map: 2 classes × 4 rows / 16 px
    q = torch.zeros(1, 2, 4, 4)
    q[:, 0, :, :2] = 1
    q[:, 1, :, 2:] = 1
    assert float(total_variation_loss(q)) == 0.5


@pytest.fixture(scope="module")
def model():
    return ScribbleSegModule(arch="Unet", encoder="resnet18", in_channels=1, num_classes=3,
                             scribble_terms=("pce", "crf", "entropy", "tv"), scribble_self_training=True,
                             scribble_crf_kernel_radius=2)


def scribble_batch(seed=3, b=3, k=3, h=16, w=16):
    g = torch.Generator().manual_seed(seed)
    scr = torch.randint(0, k, (b, h, w), generator=g)
    scr[torch.rand(b, h, w, generator=g) < 0.8] = 255
    return {"image": torch.rand(b, 1, h, w, generator=g), "scribble": scr,
            "has_scribble": torch.tensor([True, False, True]),
            "pseudo": torch.randint(0, k, (b, h, w), generator=g),
            "has_pseudo": torch.tensor([True, True, False])}


def test_terms_values_and_zero_gradient_for_samples_without_scribbles(model):
    batch = scribble_batch()
    z = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(4), requires_grad=True)
    terms = model.loss_terms(batch, {"logits": z, "probs": z.softmax(1)})
    assert set(terms) == {"scribble/pce", "scribble/crf", "scribble/entropy", "scribble/tv", "scribble/pseudo"}
    # values: Σ over samples with scribbles / B (sample 1's scribble map is full of labels, but it is not "has")
    zd, pd, keep = z.detach(), z.detach().softmax(1), [0, 2]
    expect = {"scribble/pce": partial_cross_entropy(zd[keep], batch["scribble"][keep], reduction="sum") / 3,
              "scribble/crf": gated_crf_loss(pd[keep], batch["image"][keep], kernel_radius=2,
                                             reduction="none").sum() / 3,
              "scribble/entropy": entropy_loss(pd[keep], reduction="sum") / 3,
              "scribble/tv": total_variation_loss(pd[keep], reduction="sum") / 3,
              "scribble/pseudo": partial_cross_entropy(zd[:1], batch["pseudo"][:1], reduction="sum") / 3}
    for name, value in expect.items():
        torch.testing.assert_close(terms[name].detach(), value, rtol=1e-6, atol=1e-7, msg=name)
    for name, value in terms.items():
        (grad,) = torch.autograd.grad(value, z, retain_graph=True)
        assert (grad[1] == 0).all(), f"{name}: sample without scribbles got a gradient"
        assert grad[0].abs().sum() > 0, f"{name}: sample with scribbles got no gradient"
        if name == "scribble/pseudo":  # sample 2 has scribbles but no pseudo label
            assert (grad[2] == 0).all()


def test_switches_start_epoch_and_errors(model):
    batch = scribble_batch()
    z = torch.randn(3, 3, 16, 16)
    m = ScribbleSegModule(in_channels=1, num_classes=3, scribble_terms=["pce"], scribble_reg_start_epoch=1)
    assert set(m.loss_terms(batch, {"logits": z, "probs": z.softmax(1)})) == {"scribble/pce"}
    m = ScribbleSegModule(in_channels=1, num_classes=3, scribble_terms=["entropy"], scribble_reg_start_epoch=1)
    assert m.loss_terms(batch, {"logits": z, "probs": z.softmax(1)}) == {}  # epoch 0 < start epoch
    nobody = dict(batch, has_scribble=torch.zeros(3, dtype=torch.bool))
    assert model.loss_terms(nobody, {"logits": z, "probs": z.softmax(1)}) == {}
    assert model.term_weight("scribble/crf") == 0.1
    with pytest.raises(ValueError, match="scribble_terms"):
        ScribbleSegModule(num_classes=2, scribble_terms=["pce", "dense"])
    with pytest.raises(ValueError, match="scribble_entropy_on"):
        ScribbleSegModule(num_classes=2, scribble_entropy_on="some")


def test_make_pseudo_labels_keeps_scribbles_and_thresholds(model):
    batch = scribble_batch()
    model.eval()
    with torch.no_grad():
        probs = model(batch["image"])["probs"]
    scribbled = batch["has_scribble"][:, None, None] & (batch["scribble"] != 255)
    model.scribble_confidence = 0.0  # every pixel: the prediction, scribbles win
    lab = model.make_pseudo_labels(batch)
    assert torch.equal(lab, torch.where(scribbled, batch["scribble"], probs.argmax(1)))
    model.scribble_confidence = 1.0  # nothing is that confident: only the scribbles remain
    lab = model.make_pseudo_labels(batch)
    assert torch.equal(lab, torch.where(scribbled, batch["scribble"], torch.full_like(lab, 255)))
    model.scribble_confidence = 0.9
    model.train()


def test_short_fit_with_self_training_refresh(tmp_path):
    L.seed_everything(0)
    dm = WeakSegDataModule(synthetic_kind="organ", n_samples=10, image_size=32, batch_size=4,
                           train_labels=["scribble"], augment="none", seed=0)
    model = ScribbleSegModule(in_channels=dm.in_channels, num_classes=dm.num_classes, lr=3e-3,
                              scribble_terms=("pce", "crf", "entropy", "tv"), scribble_self_training=True)
    trainer = L.Trainer(accelerator="cpu", max_epochs=2, limit_train_batches=2, limit_val_batches=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, default_root_dir=tmp_path,
                        callbacks=[PseudoLabelRefresh(every_n_epochs=1)])
    trainer.fit(model, dm)
    m = trainer.callback_metrics
    for name in ("pce", "crf", "entropy", "tv", "pseudo"):  # pseudo labels exist from the second epoch on
        assert torch.isfinite(m[f"train/scribble/{name}_epoch"]), name
    assert torch.isfinite(m["val/dice"])
    ds = dm.train_dataset
    assert sorted(ds.pseudo_labels) == sorted(ds.indices)
    # the refreshed labels keep every scribbled pixel's class
    view = ds.subset(ds.indices, augment="none")
    s = view[0]
    scr, pl = s["scribble"].numpy(), ds.pseudo_labels[int(s["index"])]
    assert ((pl == scr) | (scr == 255)).all() and (scr != 255).any()
