"""Mixed supervision: per-sample composition of terms, exact zero gradients across label types, a short fit, and
the annotation-cost benchmark on fake result files."""
import json

import lightning as L
import numpy as np
import pytest
import torch

from lightning_weakseg.callbacks import LogBarrierSchedule
from lightning_weakseg.data import WeakSegDataModule
from lightning_weakseg.data.batch import collate
from lightning_weakseg.regimes import MixedSegModule

MIX = {"mask": 0.2, "scribble": 0.2, "boxes": 0.2, "points": 0.2, "tags": 0.2}
# which samples a term may touch: its label's has-flag (and has_pseudo for the pseudo-label terms)
OWNER = {"seg": ("mask",), "scribble": ("scribble",), "box": ("boxes",), "point": ("points",), "tags": ("tags",),
         "scribble/pseudo": ("scribble", "pseudo"), "point/cluster": ("points", "pseudo"),
         "tags/pseudo": ("tags", "pseudo")}


def owner_mask(name, batch):
    keys = OWNER.get(name, OWNER[name.split("/")[0]])
    b = batch["image"].shape[0]
    m = torch.ones(b, dtype=torch.bool)
    for k in keys:
        m &= batch.get(f"has_{k}", torch.zeros(b, dtype=torch.bool))
    return m


@pytest.fixture(scope="module")
def setup():
    dm = WeakSegDataModule(synthetic_kind="organ", n_samples=14, image_size=32, batch_size=8, label_fractions=MIX,
                           augment="none", val_fraction=0.2, seed=0)
    dm.setup("fit")
    ds = dm.train_dataset
    rng = np.random.default_rng(0)
    # pseudo labels on every other sample: the pseudo-label terms must still follow their own label type
    ds.set_pseudo_labels({i: rng.integers(0, dm.num_classes, (32, 32)).astype(np.uint8) for i in ds.indices[::2]})
    samples = [ds[i] for i in range(10)]
    model = MixedSegModule(in_channels=dm.in_channels, num_classes=dm.num_classes, dice_weight=0.5,
                           scribble_terms=("pce", "crf", "entropy", "tv"), scribble_self_training=True,
                           scribble_crf_kernel_radius=2, point_crf_kernel_radius=2,
                           loss_weights={"box/size": 0.3, "scribble/crf": 0.2})
    model.eval()
    batch = collate(samples)
    with torch.no_grad():
        out = model(batch["image"])
    return model, samples, batch, out


def total(model, terms):
    return sum(model.term_weight(k) * v for k, v in terms.items())


def test_mixed_batch_loss_is_the_mean_of_its_single_sample_losses(setup):
    model, samples, batch, out = setup
    for k in ("mask", "scribble", "boxes", "points", "tags", "pseudo"):
        assert batch[f"has_{k}"].any() and not batch[f"has_{k}"].all(), k  # a real mix
    terms = model.loss_terms(batch, out)
    expected_names = {"seg/ce", "seg/dice", "scribble/pce", "scribble/crf", "scribble/entropy", "scribble/tv",
                      "box/tightness", "box/emptiness", "box/size", "point/voronoi", "point/crf", "tags/mil",
                      "tags/pseudo"}
    assert expected_names <= set(terms)
    b = len(samples)
    parts = []
    for i, s in enumerate(samples):
        single = collate([s])  # a one-sample batch: only the keys this sample carries
        parts.append(model.loss_terms(single, {k: v[i:i + 1] for k, v in out.items()}))
    for name, value in terms.items():
        summed = sum(float(p.get(name, 0.0)) for p in parts) / b
        assert abs(float(value) - summed) < 1e-6, (name, float(value), summed)
    whole = float(total(model, terms))
    by_sample = sum(float(total(model, p)) for p in parts) / b
    assert abs(whole - by_sample) < 1e-6
    # per labelled sample the scale does not depend on the mix: a batch of the mask samples alone has the same
    # Σ_i v_i, only divided by its own size
    idx = [i for i, s in enumerate(samples) if "mask" in s]
    only = model.loss_terms(collate([samples[i] for i in idx]), {k: v[idx] for k, v in out.items()})
    assert abs(float(only["seg/ce"]) * len(idx) - float(terms["seg/ce"]) * b) < 1e-5


def test_terms_give_exactly_zero_gradient_to_samples_without_their_label(setup):
    model, _, batch, out = setup
    z = out["logits"].clone().requires_grad_(True)
    terms = model.loss_terms(batch, {"logits": z, "probs": z.softmax(1)})
    for name, value in terms.items():
        (grad,) = torch.autograd.grad(value, z, retain_graph=True)
        mine = owner_mask(name, batch)
        per_sample = grad.flatten(1).abs().sum(1)
        assert (per_sample[~mine] == 0).all(), f"{name} leaks gradient into samples {(~mine).nonzero().tolist()}"
        assert (per_sample[mine] > 0).all(), f"{name} gives no gradient to its own samples"


def test_short_fit_on_a_label_mix(tmp_path):
    L.seed_everything(0)
    dm = WeakSegDataModule(synthetic_kind="organ", n_samples=10, image_size=32, batch_size=4,
                           label_fractions={"mask": 0.2, "boxes": 0.4, "scribble": 0.4}, seed=0)
    model = MixedSegModule(in_channels=dm.in_channels, num_classes=dm.num_classes, lr=3e-3,
                           scribble_terms=("pce", "crf"))
    trainer = L.Trainer(accelerator="cpu", max_epochs=1, limit_train_batches=2, limit_val_batches=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, default_root_dir=tmp_path, callbacks=[LogBarrierSchedule()])
    trainer.fit(model, dm)
    m = trainer.callback_metrics
    assert torch.isfinite(m["train/loss_epoch"]) and torch.isfinite(m["val/dice"])
    assert any(k.startswith("train/box/") for k in m) and any(k.startswith("train/scribble/") for k in m)
    assert dm.train_dataset.pseudo_labels == {}  # no points in the mix: no cluster-label pass at fit start
    plan = [dm.train_dataset.keys_for(i) for i in dm.train_dataset.indices]
    assert sorted(plan) == sorted([("mask",)] * 2 + [("boxes",)] * 3 + [("scribble",)] * 3)


# ---------------------------------------------------------------- annotation cost benchmark
def test_annotation_cost_on_fake_results(tmp_path, capsys, load_benchmark):
    ac = load_benchmark("annotation_cost")
    rows = [{"dataset": "acdc", "regime": "full", "labels": "mask", "dice": 0.80},
            {"dataset": "acdc", "regime": "pce_crf", "labels": "scribble", "dice": 0.72},
            {"dataset": "acdc", "regime": "mask10_boxes90", "labels": "mask+boxes", "dice": 0.76},
            {"dataset": "acdc", "regime": "custom", "labels": "mask+tags", "dice": 0.70,
             "label_fractions": {"mask": 0.5, "tags": 0.5}},
            {"dataset": "kvasir", "regime": "full", "labels": "mask", "dice": 0.9}]
    res = tmp_path / "acdc.json"
    res.write_text(json.dumps({"rows": rows, "settings": {}}))
    out = tmp_path / "cost.png"
    table = ac.main([str(res), "--dataset", "acdc", "--out", str(out)])
    assert out.stat().st_size > 1000 and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    by = {r["regime"]: r for r in table}
    assert set(by) == {"full", "pce_crf", "mask10_boxes90", "custom"}  # kvasir filtered out
    c, n = ac.DATASET_STATS["acdc"]  # 3 classes, 2.71 structures per slice
    assert by["full"]["seconds_per_image"] == pytest.approx(79.2 * n)
    assert by["pce_crf"]["seconds_per_image"] == pytest.approx(1.0 * c + 10.0 * n)
    # the mix comes from the benchmark registry: 0.1 mask + 0.9 boxes
    assert by["mask10_boxes90"]["seconds_per_image"] == pytest.approx(0.1 * 79.2 * n + 0.9 * 7.0 * n)
    assert by["custom"]["seconds_per_image"] == pytest.approx(0.5 * 79.2 * n + 0.5 * 1.0 * c)
    assert by["pce_crf"]["ratio"] == pytest.approx(0.9)
    assert "| acdc | mask10_boxes90 | mask 10%, boxes 90% |" in capsys.readouterr().out
    # overrides and errors
    assert ac.label_seconds("boxes", 1, 2.0, {"box": 34.5}) == pytest.approx(69.0)
    assert ac.label_seconds("mask+tags", 2, 1.0) == pytest.approx(79.2 + 2.0)
    with pytest.raises(ValueError, match="sum to 1"):
        ac.regime_seconds({"mask": 0.5}, 1, 1.0)
    with pytest.raises(ValueError, match="noisy_mask"):
        ac.label_seconds("noisy_mask", 1, 1.0)
