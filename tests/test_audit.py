"""Label audit (lightning_weakseg.audit): scores against slow per-pixel references, the ranking on hand-corrupted
masks, streaming = all in memory, 1 vs 2 processes, k-fold through Trainer.fit, and ``weakseg audit``."""
from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from lightning_weakseg.audit import (METHODS, LabelQualityScorer, audit, cross_val_audit, kfold_indices,
                                     label_quality_scores, pixel_issues, pixel_label_quality, suspected_error_types)

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------ slow references, one pixel at a time
def ref_pixel(probs, labels):
    n, k, h, w = probs.shape
    out = torch.ones(n, h, w, dtype=probs.dtype)
    for i in range(n):
        for y in range(h):
            for x in range(w):
                c = int(labels[i, y, x])
                if c != 255:
                    out[i, y, x] = probs[i, c, y, x]
    return out


def ref_image(probs, labels, method, temperature=0.1):
    n, k, h, w = probs.shape
    scores = []
    for i in range(n):
        vals, pairs = [], []
        for y in range(h):
            for x in range(w):
                c = int(labels[i, y, x])
                if c != 255:
                    vals.append(float(probs[i, c, y, x]))
                    pairs.append((y, x, c))
        if not vals:
            scores.append(1.0)
            continue
        if method == "self_confidence":
            scores.append(sum(vals) / len(vals))
        elif method == "softmin":
            e = [math.exp((1 - v) / temperature) for v in vals]  # cleanlab's softmax(1 - s)
            z = sum(e)
            scores.append(sum(v * ei / z for v, ei in zip(vals, e)))
        else:  # dice over the foreground classes in the label or in the arg-max prediction
            dices = []
            for c in range(1, k):
                inter = psum = gsum = 0.0
                present = False
                for y in range(h):
                    for x in range(w):
                        lab = int(labels[i, y, x])
                        if lab == 255:
                            continue
                        p = float(probs[i, c, y, x])
                        g = 1.0 if lab == c else 0.0
                        inter, psum, gsum = inter + p * g, psum + p, gsum + g
                        if g or int(probs[i, :, y, x].argmax()) == c:
                            present = True
                if present:
                    dices.append(2 * inter / (psum + gsum) if psum + gsum > 0 else 1.0)
            scores.append(sum(dices) / len(dices) if dices else 1.0)
    return torch.tensor(scores, dtype=torch.float64)


def random_case(n=4, k=3, h=5, w=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    probs = torch.randn(n, k, h, w, generator=g, dtype=torch.float64).mul(2).softmax(1)
    labels = torch.randint(0, k, (n, h, w), generator=g)
    labels[0, 0, :3] = 255
    labels[1, 2:, :] = 255
    labels[3] = 255  # an image without any labelled pixel
    return probs, labels


@pytest.mark.parametrize("method", METHODS)
def test_scores_match_the_per_pixel_reference(method):
    probs, labels = random_case()
    image, pixel = label_quality_scores(probs, labels, method)
    torch.testing.assert_close(pixel, ref_pixel(probs, labels))
    torch.testing.assert_close(image, ref_image(probs, labels, method), rtol=1e-10, atol=1e-12)
    assert image[3] == 1.0


def test_softmin_temperature_and_hand_computed_case():
    probs = torch.tensor([[[[0.9, 0.2]], [[0.1, 0.8]]]], dtype=torch.float64)
    labels = torch.tensor([[[0, 0]]])
    s = torch.tensor([0.9, 0.2], dtype=torch.float64)
    for t in (0.1, 1.0):
        w = (-s / t).softmax(0)
        assert label_quality_scores(probs, labels, "softmin", temperature=t)[0].item() == pytest.approx(
            float((w * s).sum()))
    # dice: class 1 present in the prediction (pixel 2), absent from the label: 2·0 / (0.9 + 0) = 0
    assert label_quality_scores(probs, labels, "dice")[0].item() == 0.0
    assert pixel_issues(probs, labels).tolist() == [[[False, True]]]


def test_ignored_pixels_do_not_count():
    probs, labels = random_case(seed=1)
    mask = (labels == 255).unsqueeze(1).expand_as(probs)
    other = torch.where(mask, torch.full_like(probs, 0.5).softmax(1), probs)  # only the ignored pixels change
    for m in METHODS:
        a, pa = label_quality_scores(probs, labels, m)
        b, pb = label_quality_scores(other, labels, m)
        torch.testing.assert_close(a, b)
        torch.testing.assert_close(pa, pb)


def test_softmin_equals_cleanlab():
    rank = pytest.importorskip("cleanlab.segmentation.rank")
    probs, labels = random_case(seed=2)
    labels = labels.clamp_max(probs.shape[1] - 1)  # cleanlab has no ignore index
    ours, pix = label_quality_scores(probs, labels, "softmin")
    theirs, their_pix = rank.get_label_quality_scores(labels.numpy(), probs.numpy(), method="softmin", verbose=False)
    np.testing.assert_allclose(ours.numpy(), theirs, rtol=1e-6)
    np.testing.assert_allclose(pix.numpy(), their_pix, rtol=1e-6)


def test_input_validation():
    probs, labels = random_case()
    with pytest.raises(ValueError, match="expected shape"):
        label_quality_scores(probs, labels[:, :4])
    with pytest.raises(ValueError, match="classes in"):
        label_quality_scores(probs, labels.clamp_min(0) + 3)
    with pytest.raises(ValueError, match="method"):
        label_quality_scores(probs, labels, "entropy")


# ------------------------------------------------------------------ a synthetic data set with hand-corrupted masks
def disk(h, w, cy, cx, r):
    yy, xx = np.mgrid[:h, :w]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r


class Corrupted(torch.utils.data.Dataset):
    """Images whose first channel is the clean mask (plus noise); ``noisy_mask`` = the clean mask for even samples,
    a hand-corrupted one for odd samples: the object dropped, an object added, or the outline dilated."""
    kinds = ("missing object", "extra object", "boundary")

    def __init__(self, n=24, size=32, seed=0):
        rng = np.random.default_rng(seed)
        self.items = []
        for i in range(n):
            clean = disk(size, size, rng.integers(10, 22), rng.integers(10, 22), rng.integers(4, 7))
            noisy = clean.copy()
            kind = None
            if i % 2:
                kind = self.kinds[(i // 2) % 3]
                if kind == "missing object":
                    noisy[:] = False
                elif kind == "extra object":
                    cy, cx = (4, 4) if not clean[:8, :8].any() else (27, 27)
                    noisy |= disk(size, size, cy, cx, 3)
                else:
                    from scipy import ndimage as ndi
                    noisy = ndi.binary_dilation(clean, iterations=3)
            image = clean.astype(np.float32) + 0.1 * rng.standard_normal((size, size)).astype(np.float32)
            label = noisy.astype(np.int64)
            label[:2, :] = 255  # padding rows: ignored
            self.items.append({"image": torch.from_numpy(image)[None], "noisy_mask": torch.from_numpy(label),
                               "index": 100 + i, "id": f"img{i:02d}", "corrupted": kind})

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        item = dict(self.items[i])
        item.pop("corrupted")
        return item


class Oracle(torch.nn.Module):
    """A 'trained model' that reads the clean object off the image: logits ±6·(x − 0.5)."""

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor(6.0))

    def forward(self, x):
        z = self.scale * (x[:, :1] - 0.5)
        return torch.cat([-z, z], 1)


def auroc(scores, positive):
    """P(score of a corrupted < score of a clean), ties halved: low score = flagged."""
    pos = [s for s, p in zip(scores, positive) if p]
    neg = [s for s, p in zip(scores, positive) if not p]
    wins = sum((a < b) + 0.5 * (a == b) for a in pos for b in neg)
    return wins / (len(pos) * len(neg))


def test_ranking_puts_corrupted_masks_first_and_names_the_error(tmp_path):
    ds = Corrupted()
    result = audit(Oracle(), ds, label_key="noisy_mask", batch_size=5, num_worst=4,
                   issue_map_dir=tmp_path / "maps")
    corrupted = {100 + i: it["corrupted"] for i, it in enumerate(ds.items)}
    assert len(result.rows) == len(ds)
    for m in ("dice", "softmin", "self_confidence"):
        rows = result.rows
        a = auroc([r[f"score_{m}"] for r in rows], [corrupted[r["index"]] is not None for r in rows])
        assert a >= (0.99 if m == "dice" else 0.7), (m, a)
    # the default ranking: every corrupted mask above every clean one
    top = [corrupted[r["index"]] is not None for r in result.rows[:len(ds) // 2]]
    assert all(top)
    for r in result.rows:
        kind = corrupted[r["index"]]
        if kind is not None:
            assert r["error_type"] == kind, (r["id"], r["error_type"], kind)
        else:
            assert r["error_type"] in ("boundary", "none")
    paths = result.write(tmp_path / "out")
    with open(paths["csv"]) as f:
        table = list(csv.DictReader(f))
    assert [t["id"] for t in table] == [r["id"] for r in result.rows]
    assert list(table[0])[:4] == ["rank", "id", "score", "error_type"]
    assert len(paths["gallery"]) == 4 and paths["grid"].exists()
    assert len(list((tmp_path / "maps").glob("*.png"))) == len(ds)
    grid = result.gallery()
    assert grid.shape == (4 * 32, 4 * 32, 3)


def test_suspected_error_types_hand_cases():
    pred = np.zeros((3, 16, 16), np.int64)
    pred[:, 4:10, 4:10] = 1
    label = pred.copy()
    label[0] = 0                     # the label lacks the object
    label[1, 12:16, 12:16] = 1       # the label has one more
    label[2, 4:11, 4:11] = 1         # the outline is a pixel off
    assert suspected_error_types(pred, label) == ["missing object", "extra object", "boundary"]
    assert suspected_error_types(pred[:1], pred[:1]) == ["none"]


def test_streaming_equals_all_in_memory():
    ds = Corrupted(n=13, seed=3)
    model = Oracle()
    with torch.no_grad():
        probs = torch.cat([model(torch.stack([ds[i]["image"] for i in range(len(ds))]))]).softmax(1)
    labels = torch.stack([ds[i]["noisy_mask"] for i in range(len(ds))])
    expected = {}
    for m in METHODS:
        expected[m] = label_quality_scores(probs, labels, m)[0]
    order = sorted(range(len(ds)), key=lambda i: (float(expected["dice"][i]), i))
    for bs in (1, 4, 13):
        result = audit(model, ds, label_key="noisy_mask", batch_size=bs, num_worst=3)
        assert [r["key"] for r in result.rows] == order
        for m in METHODS:
            got = torch.tensor([r[f"score_{m}"] for r in sorted(result.rows, key=lambda r: r["key"])],
                               dtype=expected[m].dtype)
            torch.testing.assert_close(got, expected[m], rtol=1e-6, atol=1e-7)
        assert [w["row"]["key"] for w in result.worst] == order[:3]
    # and the scorer fed by hand, with a repeated sample (a distributed sampler's filler) dropped
    scorer = LabelQualityScorer("softmin")
    scorer.update(probs[:7], labels[:7], list(range(7)))
    scorer.update(probs[6:], labels[6:], list(range(6, 13)))
    rows = scorer.compute().rows
    assert sorted(r["key"] for r in rows) == list(range(13))
    assert [r["key"] for r in rows] == sorted(range(13), key=lambda i: (float(expected["softmin"][i]), i))


def test_one_and_two_processes_agree(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "ddp_audit_check.py"), "--out", str(tmp_path)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"ddp_audit_check failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    one = json.loads((tmp_path / "d1.json").read_text())
    assert len(one["rows"]) == 23
    for variant in ("d2_dataset", "d2_loader"):
        two = json.loads((tmp_path / f"{variant}.json").read_text())
        assert [r["index"] for r in two["rows"]] == [r["index"] for r in one["rows"]], variant
        for a, b in zip(one["rows"], two["rows"]):
            assert a["id"] == b["id"] and a["error_type"] == b["error_type"]
            for k in ("score_dice", "score_softmin", "score_self_confidence", "flagged_fraction"):
                assert a[k] == pytest.approx(b[k], rel=1e-9, abs=1e-12), (variant, k)
        idx = {r["key"]: r["index"] for r in one["rows"]}
        assert len(two["worst"]) == 3
        if variant == "d2_dataset":
            assert two["worst"] == one["worst"]
        else:  # the loader's rows are keyed by the sample's raw index
            assert two["worst"] == [idx[k] for k in one["worst"]]


# ------------------------------------------------------------------ out of sample: k folds through Trainer.fit
SMALL = dict(arch="Unet", encoder="tu-resnet18", model_kwargs={"encoder_depth": 3, "decoder_channels": [16, 8, 4]})


def test_kfold_indices_partition():
    folds = kfold_indices(11, 3, seed=1)
    assert sorted(i for f in folds for i in f) == list(range(11))
    assert [len(f) for f in folds] == [4, 4, 3]
    with pytest.raises(ValueError):
        kfold_indices(3, 4)


def test_cross_val_audit_trains_each_fold_and_scores_held_out_samples():
    import lightning as L

    from lightning_weakseg import WeakSegModule
    from lightning_weakseg.data import WeakSegDataModule

    dm = WeakSegDataModule(source="synthetic", n_samples=15, image_size=32, batch_size=4,
                           train_labels=["noisy_mask"], weakify={"noise_rate": 1.0, "noise_fraction": 0.5},
                           check=False)
    dm.setup("fit")
    trained, seen = [], []

    def make_model():
        torch.manual_seed(0)
        return WeakSegModule(in_channels=dm.in_channels, num_classes=dm.num_classes, mask_key="noisy_mask", **SMALL)

    def on_fold_end(f, model):
        trained.append((f, model.trainer.global_step))

    def make_trainer():
        return L.Trainer(max_epochs=1, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)

    n = len(dm.train_dataset)
    result = cross_val_audit(make_model, make_trainer, dm.train_dataset, folds=2, label_key="noisy_mask",
                             batch_size=4, num_worst=2, on_fold_end=on_fold_end,
                             extra=lambda b: seen.append(b["audit_key"].tolist()) or {})
    held = kfold_indices(n, 2, seed=0)
    assert [f for f, _ in trained] == [0, 1]
    assert all(steps == math.ceil(len(held[1 - f]) / 4) for f, steps in trained)  # trained on the other fold
    assert seen and sorted(sum(seen, [])) == list(range(n))  # each sample scored once, by the fold without it
    assert [s for s in sum(seen, [])][:len(held[0])] == held[0]
    assert sorted(r["key"] for r in result.rows) == list(range(n))
    assert all(0.0 <= r["score"] <= 1.0 for r in result.rows)


# ------------------------------------------------------------------ weakseg audit
def test_cli_audit_writes_table_maps_and_gallery(tmp_path, capsys):
    from lightning_weakseg import WeakSegModule
    from lightning_weakseg.cli import main

    cfg = tmp_path / "audit.yaml"
    cfg.write_text(f"""
model:
  class_path: lightning_weakseg.WeakSegModule
  init_args:
    arch: Unet
    encoder: tu-resnet18
    mask_key: noisy_mask
    model_kwargs: {json.dumps(SMALL['model_kwargs'])}
data:
  source: synthetic
  n_samples: 12
  image_size: 32
  batch_size: 4
  train_labels: [noisy_mask]
  weakify: {{noise_rate: 1.0, noise_fraction: 0.5}}
trainer:
  logger: false
  accelerator: cpu
""")
    torch.manual_seed(0)
    model = WeakSegModule(in_channels=1, num_classes=4, mask_key="noisy_mask", **SMALL)  # the organ set
    ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": model.state_dict()}, ckpt)
    out = tmp_path / "out"
    main(["audit", "--config", str(cfg), "--ckpt_path", str(ckpt), "--output_dir", str(out), "--num_worst", "3"])
    with open(out / "audit.csv") as f:
        rows = list(csv.DictReader(f))
    n = len(rows)
    assert n > 0 and [int(r["rank"]) for r in rows] == list(range(1, n + 1))
    scores = [float(r["score"]) for r in rows]
    assert scores == sorted(scores)
    assert {r["error_type"] for r in rows} <= {"missing object", "extra object", "boundary", "none"}
    assert len(list((out / "issue_maps").glob("*.png"))) == n
    assert len(list((out / "gallery").glob("*.png"))) == 3 and (out / "gallery.png").exists()
    assert "ranked by dice" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["audit", "--config", str(cfg), "--output_dir", str(out)])  # neither --ckpt_path nor --folds
