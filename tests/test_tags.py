"""Image-level tag regime: terms against slow references, untagged samples contribute nothing, pseudo-masks are
the composition CAM → refinement → thresholds, and a short fit with one PseudoLabelRefresh round on 32-px
synthetic organ data."""
import math

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lightning_weakseg.callbacks import PseudoLabelRefresh
from lightning_weakseg.cam import GradCAM
from lightning_weakseg.data import WeakSegDataModule
from lightning_weakseg.pseudo.cam_refine import affinity_random_walk, cam_to_pseudo
from lightning_weakseg.regimes import TagSegModule

K = 4


def module(**kw):
    torch.manual_seed(0)
    return TagSegModule(arch="Unet", encoder="resnet18", in_channels=1, num_classes=K, **kw)


def fake(b=3, size=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = (2 * torch.randn(b, K, size, size, generator=g)).requires_grad_()
    cls = torch.randn(b, K, generator=g).requires_grad_()
    out = {"logits": logits, "probs": logits.softmax(1), "cls_logits": cls}
    batch = {"image": torch.rand(b, 1, size, size, generator=g),
             "tags": torch.tensor([[1, 1, 0, 1], [1, 0, 1, 0], [1, 1, 1, 1]], dtype=torch.float32)[:b],
             "has_tags": torch.tensor([True, False, True])[:b]}
    return out, batch


def bce(z, t):
    return -(t * math.log(1 / (1 + math.exp(-z))) + (1 - t) * math.log(1 - 1 / (1 + math.exp(-z))))


def slow_mil(logits, tags, has, pooling, r=5.0, k=3):
    """Per pixel log-odds s_c − log Σ_{j≠c} e^{s_j}, pooled, BCE over classes 1..K-1, Σ has·v / B."""
    b, kk = tags.shape
    total = 0.0
    for i in range(b):
        if not has[i]:
            continue
        losses = []
        for c in range(1, kk):
            vals = []
            for y in range(logits.shape[2]):
                for x in range(logits.shape[3]):
                    s = [float(logits[i, j, y, x]) for j in range(kk)]
                    vals.append(s[c] - math.log(sum(math.exp(s[j]) for j in range(kk) if j != c)))
            if pooling == "max":
                z = max(vals)
            elif pooling == "mean":
                z = sum(vals) / len(vals)
            elif pooling == "lse":
                z = math.log(sum(math.exp(r * v) for v in vals) / len(vals)) / r
            else:  # topk
                z = sum(sorted(vals, reverse=True)[:k]) / k
            losses.append(bce(z, float(tags[i, c])))
        total += sum(losses) / len(losses)
    return total / b


@pytest.mark.parametrize("pooling,kw", [("max", {}), ("mean", {}), ("lse", {"r": 2.0}), ("topk", {"k": 3})])
def test_mil_term_matches_slow_reference(pooling, kw):
    model = module(tag_mil=pooling, tag_mil_kwargs=kw, tag_cls=False, tag_pseudo_source="mil")
    out, batch = fake()
    terms = model.loss_terms(batch, out)
    want = slow_mil(out["logits"].detach(), batch["tags"], batch["has_tags"], pooling, **kw)
    assert set(terms) == {"tags/mil"}
    assert terms["tags/mil"].item() == pytest.approx(want, rel=1e-4, abs=1e-5)


def test_cls_and_pseudo_terms_match_references():
    model = module(tag_mil=None, tag_cls=True, tag_background=True)
    out, batch = fake()
    batch["pseudo"] = torch.randint(0, K, (3, 6, 6))
    batch["pseudo"][0, :3] = 255
    batch["has_pseudo"] = torch.tensor([True, True, False])
    terms = model.loss_terms(batch, out)
    z, t = out["cls_logits"].detach(), batch["tags"]
    want_cls = sum(sum(bce(float(z[i, c]), float(t[i, c])) for c in range(K)) / K for i in (0, 2)) / 3
    assert terms["tags/cls"].item() == pytest.approx(want_cls, rel=1e-5)
    ce = [F.cross_entropy(out["logits"][i:i + 1], batch["pseudo"][i:i + 1], ignore_index=255).item() for i in (0, 1)]
    assert terms["tags/pseudo"].item() == pytest.approx(sum(ce) / 3, rel=1e-5)


def slow_gated_crf(p, img, r, sxy, srgb):
    """Σ_i Σ_{j in window, j≠i} K_ij (1 − Σ_a p_i^a p_j^a) / number of pairs, written out for one sample."""
    k, h, w = p.shape
    num = den = 0.0
    for y in range(h):
        for x in range(w):
            for dy in range(-r, r + 1):
                for dx in range(-r, r + 1):
                    yy, xx = y + dy, x + dx
                    if (dy, dx) == (0, 0) or not (0 <= yy < h and 0 <= xx < w):
                        continue
                    kern = math.exp(-(dy * dy + dx * dx) / (2 * sxy ** 2)
                                    - float(((img[:, y, x] - img[:, yy, xx]) ** 2).sum()) / (2 * srgb ** 2))
                    num += kern * (1 - float((p[:, y, x] * p[:, yy, xx]).sum()))
                    den += 1
    return num / den


def test_crf_term_is_the_gated_crf_loss_of_the_tagged_samples():
    model = module(tag_mil=None, tag_cls=False, tag_pseudo_source="mil", tag_crf=True,
                   tag_crf_kwargs={"kernel_radius": 2, "sigma_xy": 3.0, "sigma_rgb": 0.3})
    out, batch = fake()
    terms = model.loss_terms(batch, out)
    assert set(terms) == {"tags/crf"} and model.term_weight("tags/crf") == 0.1
    p, img = out["probs"].detach(), batch["image"]
    want = sum(slow_gated_crf(p[i], img[i], 2, 3.0, 0.3) for i in (0, 2)) / 3   # sample 1 has no tags
    assert terms["tags/crf"].item() == pytest.approx(want, rel=1e-5)
    terms["tags/crf"].backward()
    assert out["logits"].grad[1].abs().max() == 0 and out["logits"].grad[0].abs().max() > 0


def slow_log_barrier(z, t):
    if z <= -1 / t ** 2:
        return -math.log(-z) / t
    return t * z - math.log(1 / t ** 2) / t + 1 / t


@pytest.mark.parametrize("t", [1.0, 5.0])
def test_size_term_is_the_log_barrier_on_the_tagged_classes_sizes(t):
    """tags/size = mean over the batch (untagged samples count 0) of (1/N) Σ_{tagged c ≥ 1} ψ_t(aN − S_c) +
    ψ_t(S_c − bN), S_c = Σ_pixels p_c — from a loop over samples, classes and pixels."""
    model = module(tag_mil=None, tag_cls=False, tag_pseudo_source="mil", tag_size_bounds=(0.2, 0.3))
    model.barrier_t = t                                           # what LogBarrierSchedule sets each epoch
    out, batch = fake()
    terms = model.loss_terms(batch, out)
    assert set(terms) == {"tags/size"}
    p, n = out["probs"].detach(), 36
    want = 0.0
    for i in (0, 2):                                              # sample 1 has no tags
        for c in range(1, K):
            if batch["tags"][i, c] > 0.5:
                s_c = sum(float(p[i, c, y, x]) for y in range(6) for x in range(6))
                want += (slow_log_barrier(0.2 * n - s_c, t) + slow_log_barrier(s_c - 0.3 * n, t)) / n
    assert terms["tags/size"].item() == pytest.approx(want / 3, rel=1e-5)
    terms["tags/size"].backward()
    assert out["logits"].grad[1].abs().max() == 0 and out["logits"].grad[0].abs().max() > 0
    with pytest.raises(ValueError, match="tag_size_bounds"):
        module(tag_size_bounds=(0.5, 0.2))


def test_untagged_samples_contribute_nothing():
    model = module(tag_mil="lse", tag_cls=True)
    out, batch = fake()
    terms = model.loss_terms(batch, out)
    # the untagged sample's tags may say anything
    other = dict(batch, tags=batch["tags"].clone())
    other["tags"][1] = 1 - other["tags"][1]
    for name, v in model.loss_terms(other, out).items():
        assert torch.equal(v, terms[name]), name
    # ... and its outputs get no gradient
    sum(terms.values()).backward()
    assert out["logits"].grad[1].abs().max() == 0 and out["cls_logits"].grad[1].abs().max() == 0
    assert out["logits"].grad[0].abs().max() > 0 and out["cls_logits"].grad[2].abs().max() > 0
    # a batch without any tagged sample adds no tag term
    none = dict(batch, has_tags=torch.zeros(3, dtype=torch.bool))
    assert model.loss_terms(none, out) == {}


def test_options_are_checked():
    with pytest.raises(ValueError, match="tag_mil"):
        module(tag_mil="median")
    with pytest.raises(ValueError, match="classification head"):
        module(tag_cls=False, tag_pseudo_source="cam")
    with pytest.raises(ValueError, match="tag_cam"):
        module(tag_cam="GuidedBackprop")
    with pytest.raises(ValueError, match="threshold"):
        module(tag_fg_threshold=0.1, tag_bg_threshold=0.3)
    assert module(tag_cls=True, cls_head=False).hparams.cls_head  # the head follows tag_cls


def _pseudo_batch():
    g = torch.Generator().manual_seed(4)
    return {"image": torch.rand(3, 1, 32, 32, generator=g),
            "tags": torch.tensor([[1, 1, 0, 1], [1, 0, 1, 0], [1, 1, 1, 1]], dtype=torch.float32),
            "has_tags": torch.tensor([True, True, False])}


def test_make_pseudo_labels_is_cam_then_refine_then_thresholds():
    model = module(tag_cam="GradCAM", tag_cam_layer="model.encoder.layer3", tag_refine="none",
                   tag_fg_threshold=0.5, tag_bg_threshold=0.2).eval()
    batch = _pseudo_batch()
    got = model.make_pseudo_labels(batch)
    assert got.shape == (3, 32, 32) and got.dtype == torch.long
    assert (got[2] == 255).all()  # no tags, no labels
    # reference: one Grad-CAM call per (sample, tagged class), then the threshold rule
    scores = torch.zeros(3, K, 32, 32)
    method = GradCAM(model, "model.encoder.layer3")
    for b in (0, 1):
        for c in range(1, K):
            if batch["tags"][b, c] > 0.5:
                scores[b, c] = method(batch["image"][b:b + 1], c)[0]
    tags = batch["tags"] * batch["has_tags"][:, None]
    want = cam_to_pseudo(scores, tags, 0.5, 0.2)
    assert (got == want).float().mean() > 0.995
    assert {1, 3} <= set(got[0].unique().tolist()) and {0, 2} <= set(got[1].unique().tolist()) <= {0, 2, 255}
    # with the random walk: the same scores, propagated
    model.tag_refine, model.tag_refine_kwargs = "random_walk", {"iterations": 5, "downscale": 2}
    got_rw = model.make_pseudo_labels(batch)
    want_rw = cam_to_pseudo(affinity_random_walk(scores, batch["image"], tags=tags, iterations=5, downscale=2),
                            tags, 0.5, 0.2)
    assert (got_rw == want_rw).float().mean() > 0.995
    # the MIL source thresholds the segmentation softmax of the tagged classes
    model.tag_pseudo_source, model.tag_refine = "mil", "none"
    with torch.no_grad():
        probs = model(batch["image"])["probs"]
    keep = (tags > 0.5).float()
    keep[:, 0] = 0
    assert torch.equal(model.make_pseudo_labels(batch), cam_to_pseudo(probs * keep[:, :, None, None], tags, 0.5, 0.2))


def test_short_fit_with_a_refresh_round(tmp_path):
    dm = WeakSegDataModule(synthetic_kind="organ", n_samples=15, image_size=32, batch_size=4, train_labels=["tags"],
                           augment="none", val_fraction=0.2, seed=0)
    model = module(lr=1e-3, tag_cam_layer="model.encoder.layer3",
                   tag_refine_kwargs={"iterations": 8, "downscale": 2})
    cb = PseudoLabelRefresh(every_n_epochs=1, start_epoch=0)
    trainer = L.Trainer(max_epochs=2, accelerator="cpu", callbacks=[cb], logger=False, limit_train_batches=2,
                        limit_val_batches=1, num_sanity_val_steps=0, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, default_root_dir=str(tmp_path))
    trainer.fit(model, dm)
    assert cb.round == 2
    ds = dm.train_dataset
    raw = sorted(int(ds.raw_index(i)) for i in range(len(ds)))
    assert sorted(ds.pseudo_labels) == raw == cb.indices.tolist()
    labels = cb.labels.long()
    assert set(labels.unique().tolist()) <= {0, 1, 2, 3, 255}
    assert (labels != 255).float().mean() > 0.2 and (labels == 0).any()
    # the second epoch trained on the first round's labels; every term was finite
    metrics = trainer.callback_metrics
    for name in ("tags/mil", "tags/cls", "tags/pseudo"):
        assert torch.isfinite(metrics[f"train/{name}_epoch"]), name
    # the stored labels are what make_pseudo_labels gives for the final model
    model.eval()
    got = torch.cat([model.make_pseudo_labels(b) for b in dm.train_eval_dataloader()])
    assert (got.to(torch.uint8) == cb.labels).float().mean() > 0.995
    assert np.array_equal(ds.pseudo_labels[raw[0]], cb.labels[0].numpy())
