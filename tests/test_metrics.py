"""Dice/IoU against torchmetrics and hand cases; HD95 against a brute-force reference."""
import numpy as np
import torch
from scipy.spatial.distance import cdist
from torchmetrics.segmentation import DiceScore, MeanIoU

from lightning_weakseg.metrics import DiceIoU, HD95, boundary, hd95


def test_dice_iou_match_torchmetrics_samplewise():
    g = torch.Generator().manual_seed(0)
    pred = torch.randint(0, 3, (6, 16, 16), generator=g)
    target = torch.randint(0, 3, (6, 16, 16), generator=g)
    target[0][target[0] == 2] = 1  # class 2 absent in one target
    ours = DiceIoU(3)
    ours.update(pred, target)
    dice, iou = ours.compute()
    ref = DiceScore(3, include_background=False, average="none", input_format="index")(pred, target)
    ref_iou = MeanIoU(3, include_background=False, per_class=True, input_format="index")(pred, target)
    assert torch.allclose(dice, ref.float(), atol=1e-6)
    assert torch.allclose(iou, ref_iou.float(), atol=1e-6)


def test_dice_hand_case_with_ignore():
    pred = torch.tensor([[[1, 1, 0, 0]]])
    target = torch.tensor([[[1, 0, 255, 0]]])
    m = DiceIoU(2)
    m.update(pred, target)
    dice, iou = m.compute()
    assert abs(dice.item() - 2 / 3) < 1e-6 and abs(iou.item() - 0.5) < 1e-6


def brute_hd95(p, g):
    bp = np.argwhere(boundary(torch.from_numpy(p)[None])[0].numpy())
    bg = np.argwhere(boundary(torch.from_numpy(g)[None])[0].numpy())
    d = cdist(bp, bg)
    return max(np.percentile(d.min(1), 95), np.percentile(d.min(0), 95))


def test_hd95_against_brute_force():
    rng = np.random.default_rng(0)
    preds, targets = [], []
    for _ in range(4):
        p = np.zeros((24, 24), bool)
        g = np.zeros((24, 24), bool)
        y, x = rng.integers(2, 10, 2)
        p[y:y + rng.integers(4, 12), x:x + rng.integers(4, 12)] = True
        y, x = rng.integers(2, 10, 2)
        g[y:y + rng.integers(4, 12), x:x + rng.integers(4, 12)] = True
        g[20, 20] = True
        preds.append(p), targets.append(g)
    got = hd95(torch.from_numpy(np.stack(preds)), torch.from_numpy(np.stack(targets)))
    want = [brute_hd95(p, g) for p, g in zip(preds, targets)]
    assert np.allclose(got.numpy(), want, atol=1e-4)


def test_hd95_hand_case_and_empty():
    p = torch.zeros(2, 10, 10, dtype=torch.bool)
    g = torch.zeros(2, 10, 10, dtype=torch.bool)
    p[0, 2, 2] = True
    g[0, 2, 7] = True
    g[1, 1, 1] = True  # empty prediction: not counted
    h = hd95(p, g)
    assert h[0].item() == 5.0 and torch.isnan(h[1])
    m = HD95(2)
    m.update(p.long(), g.long())
    assert m.compute().item() == 5.0
