"""Box regime: tightness prior / emptiness / size against slow references and hand-computed cases,
the mixin and the log-barrier schedule inside Lightning, and the data-boundary validation of boxes."""
import math
import os

import pytest
import torch

from lightning_weakseg.losses.boxes import (
    box_coverage, box_size_constraint, emptiness_ce, emptiness_constraint, tightness_prior,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")


# ----------------------------------------------------------------------------- slow references
def psi(z, t):
    """ψ_t on a 0-d tensor, branch chosen in Python (independent of the library's torch.where)."""
    if z.item() <= -1.0 / t**2:
        return -torch.log(-z) / t
    return t * z - math.log(1.0 / t**2) / t + 1.0 / t


def rounded(box, H, W):
    x0, y0, x1, y1 = (float(v) for v in box)
    return (min(max(math.floor(x0), 0), W), min(max(math.floor(y0), 0), H),
            min(max(math.ceil(x1), 0), W), min(max(math.ceil(y1), 0), H))


def tightness_ref(probs, boxes, t, w, penalty="log_barrier"):
    """Explicit loop over images, boxes and bands; one dense mask per band (as the original code does)."""
    pen = (lambda z: psi(z, t)) if penalty == "log_barrier" else (lambda z: torch.relu(z) ** 2)
    total = probs.new_zeros(())
    multi = probs.ndim == 4
    H, W = probs.shape[-2:]
    for i, bx in enumerate(boxes):
        for row in bx:
            c = int(row[0]) if multi else None
            x0, y0, x1, y1 = rounded(row[-4:], H, W)
            p = probs[i, c] if multi else probs[i]
            for xs in range(x0, x1, w):
                xe = min(xs + w, x1)
                m = torch.zeros(H, W, dtype=torch.bool)
                m[y0:y1, xs:xe] = True
                total = total + pen((xe - xs) - p[m].sum())
            for ys in range(y0, y1, w):
                ye = min(ys + w, y1)
                m = torch.zeros(H, W, dtype=torch.bool)
                m[ys:ye, x0:x1] = True
                total = total + pen((ye - ys) - p[m].sum())
    return total


def random_boxes(gen, H, W, n, classes=None):
    rows = []
    for _ in range(n):
        x0 = torch.rand((), generator=gen).item() * (W - 4)
        y0 = torch.rand((), generator=gen).item() * (H - 4)
        x1 = x0 + 2 + torch.rand((), generator=gen).item() * (W - x0 - 2)
        y1 = y0 + 2 + torch.rand((), generator=gen).item() * (H - y0 - 2)
        row = [x0, y0, x1, y1]
        if classes:
            row = [float(torch.randint(1, classes, (), generator=gen))] + row
        rows.append(row)
    return rows


def make_case(multi: bool, seed=0):
    gen = torch.Generator().manual_seed(seed)
    B, K, H, W = 3, 3, 23, 31
    c = [1.0] if multi else []
    boxes = [
        # overlapping boxes, one touching the top-left corner, one the right/bottom border,
        # widths 17 and 7 not multiples of w = 5, float coordinates
        [c + [0.0, 0.0, 17.0, 9.0], c + [10.3, 4.6, 17.2, 12.9], c + [20.0, 11.0, 31.0, 23.0]],
        [c + [3.0, 2.0, 4.0, 22.0]] + random_boxes(gen, H, W, 3, K if multi else None),   # 1-pixel-wide box
        [],                                                                                 # no box
    ]
    if multi:
        boxes[0][1][0] = 2.0
    boxes = [torch.tensor(b, dtype=torch.float64).reshape(-1, 5 if multi else 4) for b in boxes]
    shape = (B, K, H, W) if multi else (B, H, W)
    logits = torch.randn(shape, generator=gen, dtype=torch.float64)
    probs = logits.softmax(1) if multi else logits.sigmoid()
    return probs.detach().requires_grad_(True), boxes


# ----------------------------------------------------------------------------- tightness
@pytest.mark.parametrize("multi", [False, True])
@pytest.mark.parametrize("w,t,penalty", [(5, 5.0, "log_barrier"), (3, 0.7, "log_barrier"), (4, 1.0, "quadratic")])
def test_tightness_matches_slow_reference(multi, w, t, penalty):
    probs, boxes = make_case(multi)
    fast = tightness_prior(probs, boxes, t, band_width=w, penalty=penalty)
    (g_fast,) = torch.autograd.grad(fast, probs)
    ref = tightness_ref(probs, boxes, t, w, penalty)
    (g_ref,) = torch.autograd.grad(ref, probs)
    assert fast.item() == pytest.approx(ref.item(), rel=1e-5, abs=1e-5)
    torch.testing.assert_close(g_fast, g_ref, rtol=1e-5, atol=1e-5)
    per_image = tightness_prior(probs, boxes, t, band_width=w, penalty=penalty, reduction="none")
    assert per_image.shape == (3,) and per_image[2].item() == 0.0
    assert per_image.sum().item() == pytest.approx(fast.item(), rel=1e-9)


def test_tightness_float32_close_to_reference():
    probs, boxes = make_case(False, seed=3)
    fast = tightness_prior(probs.float(), [b.float() for b in boxes], 5.0)
    ref = tightness_ref(probs.detach(), boxes, 5.0, 5)
    assert fast.dtype == torch.float32
    assert fast.item() == pytest.approx(ref.item(), rel=1e-5)


def test_filled_box_has_no_violation():
    H, W = 20, 24
    boxes = [torch.tensor([[2.0, 3.0, 19.0, 17.0], [0.0, 10.0, 24.0, 20.0]])]
    probs = torch.zeros(1, H, W)
    probs[0, 3:17, 2:19] = 1.0
    probs[0, 10:20, :] = 1.0
    assert tightness_prior(probs, boxes, 5.0, penalty="quadratic").item() == 0.0   # every z <= 0
    assert abs(tightness_prior(probs, boxes, 1e6).item()) < 1e-4                   # barrier -> indicator
    # empty prediction: every band violated by its width; quadratic = Σ width² (hand-computed)
    # box 1: 17 cols -> bands 5,5,5,2 ; 14 rows -> 5,5,4 ; box 2: 24 cols -> 5*4+4 ; 10 rows -> 5,5
    expected = (3 * 25 + 4) + (2 * 25 + 16) + (4 * 25 + 16) + 2 * 25
    assert tightness_prior(torch.zeros(1, H, W), boxes, 5.0, penalty="quadratic").item() == expected


def test_tightness_checks_inputs():
    with pytest.raises(ValueError, match=r"expected boxes\[0\] of shape \(N,4\)"):
        tightness_prior(torch.rand(1, 8, 8), [torch.zeros(1, 5)], 5.0)
    with pytest.raises(ValueError, match="list of B=2"):
        tightness_prior(torch.rand(2, 8, 8), [torch.zeros(1, 4)], 5.0)
    with pytest.raises(ValueError, match="band_width"):
        tightness_prior(torch.rand(1, 8, 8), [torch.zeros(1, 4)], 5.0, band_width=0)


# ----------------------------------------------------------------------------- coverage / emptiness / size
def test_box_coverage_matches_dense_masks():
    probs, boxes = make_case(True, seed=1)
    cov = box_coverage(probs, boxes)
    ref = torch.zeros_like(cov)
    for i, bx in enumerate(boxes):
        for row in bx:
            x0, y0, x1, y1 = rounded(row[1:], *probs.shape[-2:])
            ref[i, int(row[0]), y0:y1, x0:x1] += 1
    assert torch.equal(cov, ref)


def test_emptiness_constraint_hand_computed():
    # image 0: box class 1 covers the left half; p1 = 0.25 outside it on 8 pixels -> sum 2.0
    # image 1: no box at all -> the whole class-1 mass (16 * 0.1 = 1.6) is outside
    p = torch.zeros(2, 2, 4, 4)
    p[0, 1, :, 2:] = 0.25
    p[0, 1, :, :2] = 0.9                     # inside the box: free
    p[1, 1] = 0.1
    p[:, 0] = 1 - p[:, 1]
    boxes = [torch.tensor([[1.0, 0.0, 0.0, 2.0, 4.0]]), torch.zeros(0, 5)]
    v = emptiness_constraint(p, boxes, t=2.0, penalty="quadratic", reduction="none")
    assert v.tolist() == pytest.approx([(8 * 0.25) ** 2, 1.6**2])
    t = 2.0
    lin = lambda z: t * z - math.log(1 / t**2) / t + 1 / t         # z >= 0: linear branch of ψ_t
    assert emptiness_constraint(p, boxes, t=t).item() == pytest.approx(lin(2.0) + lin(1.6), rel=1e-6)
    # single-class form (B,H,W) + (N,4)
    v1 = emptiness_constraint(p[:, 1], [b[:, 1:] for b in boxes], t=2.0, penalty="quadratic", reduction="none")
    assert v1.tolist() == pytest.approx(v.tolist())


def test_emptiness_multiclass_uses_own_class_boxes():
    # class 2 mass inside a class-1 box but outside every class-2 box is penalised
    p = torch.zeros(1, 3, 2, 3)
    p[0, 2, 0, 0] = 0.5                       # inside box of class 1 only
    p[0, 2, 1, 2] = 0.3                       # inside the class-2 box
    p[0, 1, 0, 1] = 0.2                       # inside box of class 1
    boxes = [torch.tensor([[1.0, 0.0, 0.0, 2.0, 1.0], [2.0, 2.0, 1.0, 3.0, 2.0]])]
    v = emptiness_constraint(p, boxes, t=1.0, penalty="quadratic")
    assert v.item() == pytest.approx(0.5**2)


def test_emptiness_ce_hand_computed():
    logits = torch.zeros(1, 3, 1, 3, requires_grad=True)
    with torch.no_grad():
        logits[0, :, 0, 0] = torch.tensor([0.0, 1.0, 2.0])   # outside all boxes: -log p0
        logits[0, :, 0, 1] = torch.tensor([1.0, 0.0, 3.0])   # inside class-1 box: -log(p0 + p1)
        logits[0, :, 0, 2] = torch.tensor([0.0, 0.0, 0.0])   # inside class-1 and class-2 boxes: free
    boxes = [torch.tensor([[1.0, 1.0, 0.0, 3.0, 1.0], [2.0, 2.0, 0.0, 3.0, 1.0]])]
    e = math.exp
    l0 = -math.log(1 / (1 + e(1) + e(2)))
    l1 = -math.log((e(1) + 1) / (e(1) + 1 + e(3)))
    v = emptiness_ce(logits, boxes)
    assert v.item() == pytest.approx((l0 + l1) / 2, rel=1e-6)     # mean over the 2 constrained pixels
    v.backward()
    assert torch.isfinite(logits.grad).all() and logits.grad[0, :, 0, 2].abs().max() == 0


def test_box_size_hand_computed():
    # box 4x2 = 8 px (after outward rounding of 0.4..3.6 x 1.2..2.8 -> 0..4 x 1..3), a=0.5, b=0.9
    p = torch.zeros(2, 4, 5)
    p[0, 1:3, 0:4] = 0.25                      # sum 2 < 4 -> lower violated by 2
    p[1, 1:3, 0:4] = 1.0                       # sum 8 > 7.2 -> upper violated by 0.8
    boxes = [torch.tensor([[0.4, 1.2, 3.6, 2.8]]), torch.tensor([[0.0, 1.0, 4.0, 3.0]])]
    v = box_size_constraint(p, boxes, t=5.0, penalty="quadratic", reduction="none")
    assert v.tolist() == pytest.approx([4.0, 0.64], rel=1e-5)
    t = 5.0
    lin = lambda z: t * z - math.log(1 / t**2) / t + 1 / t
    logb = lambda z: -math.log(-z) / t
    vb = box_size_constraint(p, boxes, t=t, reduction="none")
    assert vb.tolist() == pytest.approx([lin(2.0) + logb(2.0 - 7.2), logb(4.0 - 8.0) + lin(0.8)], rel=1e-5)


# ----------------------------------------------------------------------------- mixin / schedule in Lightning
import lightning as L  # noqa: E402
import numpy as np  # noqa: E402

from lightning_weakseg.callbacks import LogBarrierSchedule  # noqa: E402
from lightning_weakseg.data import WeakSegDataModule, collate, validate_sample  # noqa: E402
from lightning_weakseg.errors import WeakSegDataError  # noqa: E402
from lightning_weakseg.regimes import BoxSegModule  # noqa: E402


def _tiny_dm(**kw):
    return WeakSegDataModule(n_samples=20, image_size=32, batch_size=8, train_labels=["boxes"], augment="none",
                             **kw)


def _trainer(tmp_path, callbacks, **kw):
    return L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                     limit_val_batches=0, num_sanity_val_steps=0, default_root_dir=tmp_path, callbacks=callbacks,
                     **kw)


def test_loss_terms_match_the_functions():
    model = BoxSegModule(num_classes=3, in_channels=1, encoder="resnet18", box_band_width=3)
    model.barrier_t = 7.0
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 16, 16, generator=g)
    out = {"logits": logits, "probs": logits.softmax(1)}
    boxes = [torch.tensor([[1.0, 2.0, 3.0, 9.5, 12.0], [2.0, 0.0, 8.0, 16.0, 16.0]]), torch.zeros(0, 5)]
    batch = {"image": torch.rand(2, 1, 16, 16), "boxes": boxes, "has_boxes": torch.tensor([True, False])}
    terms = model.loss_terms(batch, out)
    assert set(terms) == {"box/tightness", "box/emptiness", "box/size"}
    p, b0 = out["probs"][:1], boxes[:1]
    # sample 1 has no box label: it contributes 0, normalisation by the batch size B = 2
    assert terms["box/tightness"].item() == pytest.approx(tightness_prior(p, b0, 7.0, 3).item() / 256 / 2, rel=1e-5)
    assert terms["box/emptiness"].item() == pytest.approx(emptiness_ce(logits[:1], b0).item() / 2, rel=1e-5)
    assert terms["box/size"].item() == pytest.approx(box_size_constraint(p, b0, 7.0).item() / 256 / 2, rel=1e-5)


def test_mixin_trains_and_logs_terms(tmp_path):
    L.seed_everything(0)
    dm = _tiny_dm()
    model = BoxSegModule(num_classes=dm.num_classes, in_channels=dm.in_channels, lr=3e-3)
    before = [p.detach().clone() for p in model.parameters()]
    trainer = _trainer(tmp_path, [LogBarrierSchedule(t0=5.0, mu=1.1)], max_epochs=2, enable_checkpointing=False)
    trainer.fit(model, dm)
    m = trainer.callback_metrics
    for name in ("box/tightness", "box/emptiness", "box/size"):
        assert torch.isfinite(m[f"train/{name}_epoch"])
    assert "train/seg/ce_epoch" not in m                       # boxes only: no mask term
    assert m["train/barrier_t"].item() == pytest.approx(5.5)   # epoch 1: 5 * 1.1
    assert model.barrier_t == pytest.approx(5.5)
    assert any(not torch.equal(a, b.detach()) for a, b in zip(before, model.parameters()))


class _RecordT(L.Callback):
    def __init__(self):
        self.seen = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.seen.setdefault(trainer.current_epoch, pl_module.barrier_t)


def test_resume_restores_barrier_t(tmp_path):
    L.seed_everything(0)
    dm = _tiny_dm()
    ckpt_cb = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path, save_last=True)
    model = BoxSegModule(num_classes=dm.num_classes, in_channels=dm.in_channels)
    sched = LogBarrierSchedule(t0=5.0, mu=1.1)
    _trainer(tmp_path, [sched, ckpt_cb], max_epochs=2, limit_train_batches=1).fit(model, dm)
    ckpt = torch.load(tmp_path / "last.ckpt", weights_only=False)
    state = next(v for k, v in ckpt["callbacks"].items() if "LogBarrierSchedule" in k)
    assert state["t"] == pytest.approx(5.5) and state["t0"] == 5.0 and state["mu"] == 1.1
    # a fresh callback built with other arguments: the checkpoint's schedule wins and t continues
    fresh, rec = LogBarrierSchedule(t0=1.0, mu=2.0), _RecordT()
    model2 = BoxSegModule(num_classes=dm.num_classes, in_channels=dm.in_channels)
    _trainer(tmp_path, [fresh, rec], max_epochs=4, limit_train_batches=1, enable_checkpointing=False).fit(
        model2, dm, ckpt_path=tmp_path / "last.ckpt")
    assert (fresh.t0, fresh.mu) == (5.0, 1.1)
    assert sorted(rec.seen) == [2, 3]
    assert rec.seen[2] == pytest.approx(5.0 * 1.1**2) and rec.seen[3] == pytest.approx(5.0 * 1.1**3)


def test_schedule_arguments_checked():
    with pytest.raises(ValueError, match="t0 > 0"):
        LogBarrierSchedule(t0=0.0)
    with pytest.raises(ValueError, match="mu >= 1"):
        LogBarrierSchedule(mu=0.9)
    assert LogBarrierSchedule(t0=5, mu=2, t_max=12).t_at(3) == 12


# ----------------------------------------------------------------------------- bad boxes at the data boundary
@pytest.mark.parametrize("row,what", [
    ([1, -3.0, 2.0, 10.0, 12.0], "outside"),
    ([1, 4.0, 2.0, 40.0, 12.0], "outside"),
    ([1, 5.0, 2.0, 5.0, 12.0], "degenerate"),
    ([1, 9.0, 2.0, 5.0, 12.0], "degenerate"),
    ([1, float("nan"), 2.0, 5.0, 12.0], "NaN"),
    ([3, 1.0, 2.0, 5.0, 12.0], "class ids"),
])
def test_bad_boxes_rejected_by_validator(row, what):
    sample = {"image": torch.rand(3, 16, 32), "boxes": torch.tensor([row]), "id": "img7"}
    with pytest.raises(WeakSegDataError, match=what) as e:
        validate_sample(sample, num_classes=3)
    assert e.value.field == "boxes" and "img7" in str(e.value)


def test_bad_box_in_folder_data_names_file_and_field(tmp_path):
    import cv2
    import json
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    for i in range(3):
        cv2.imwrite(str(tmp_path / "images" / f"im{i}.png"), np.zeros((16, 16, 3), np.uint8))
        cv2.imwrite(str(tmp_path / "masks" / f"im{i}.png"), np.zeros((16, 16), np.uint8))
    (tmp_path / "boxes.json").write_text(json.dumps(
        {"im0": [[1, 1, 5, 5]], "im1": [[2, 2, 30, 8]], "im2": [[1, 2, 3, 4]]}))
    dm = WeakSegDataModule(source="folder", root=str(tmp_path), boxes_json="boxes.json", num_classes=2,
                           in_channels=3, image_size=16, train_labels=["boxes"], val_fraction=0.0, augment="none",
                           shuffle=False)
    with pytest.raises(WeakSegDataError, match="outside") as e:  # the up-front check finds it
        dm.setup("fit")
    assert e.value.field == "boxes" and e.value.sample == "im1" and "boxes.json" in str(e.value)
    dm = WeakSegDataModule(source="folder", root=str(tmp_path), boxes_json="boxes.json", num_classes=2,
                           in_channels=3, image_size=16, train_labels=["boxes"], val_fraction=0.0, augment="none",
                           shuffle=False, check=False)
    dm.setup("fit")
    with pytest.raises(WeakSegDataError, match="outside") as e:  # without it: when the sample is read
        collate([dm.train_dataset[i] for i in range(len(dm.train_dataset))])
    assert e.value.field == "boxes" and "im1" in str(e.value)


# ----------------------------------------------------------------------------- box-as-mask and GrabCut
def test_box_masks_and_grabcut():
    from lightning_weakseg.pseudo import box_masks, grabcut_mask
    yy, xx = np.mgrid[:48, :64]
    disk = (yy - 24) ** 2 + (xx - 30) ** 2 <= 12**2
    rng = np.random.default_rng(0)
    img = np.where(disk[..., None], [200, 60, 60], [30, 90, 40]) + rng.integers(-10, 10, (48, 64, 3))
    img = img.clip(0, 255).astype(np.uint8)
    box = np.array([[1, 17.6, 11.2, 43.0, 37.0]])            # floats, rounded outward to 17..43 x 11..37
    filled = box_masks(box, (48, 64))
    assert filled.sum() == 26 * 26 and filled[11:37, 17:43].all() and filled.max() == 1
    gc, fallbacks = grabcut_mask(img, box)
    dice = 2 * (gc.astype(bool) & disk).sum() / (gc.astype(bool).sum() + disk.sum())
    assert fallbacks == 0 and dice > 0.9 and not gc[:11].any()
    whole, fallbacks = grabcut_mask(img, np.array([[2, 0, 0, 64, 48]]))   # no background sample: filled
    assert fallbacks == 1 and (whole == 2).all()
