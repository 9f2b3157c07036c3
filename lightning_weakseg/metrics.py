"""Segmentation metrics: per-class Dice / IoU (torchmetrics) and a batched HD95 ``torchmetrics.Metric``; per-volume
3D Dice and HD95 (:mod:`~lightning_weakseg.volume_metrics`, re-exported here)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torchmetrics import Metric


def boundary(mask: torch.Tensor) -> torch.Tensor:
    """Inner boundary of a bool (B,H,W) mask: pixels of the mask with a 4-neighbour outside it (or the border)."""
    m = mask.bool()
    p = F.pad(m.unsqueeze(1).to(torch.uint8), (1, 1, 1, 1), value=0).squeeze(1).bool()
    # erosion by the 4-neighbour cross (scipy's default structure, as MONAI's edges use)
    eroded = m & p[:, :-2, 1:-1] & p[:, 2:, 1:-1] & p[:, 1:-1, :-2] & p[:, 1:-1, 2:]
    return m & ~eroded


def hd95(pred: torch.Tensor, target: torch.Tensor, spacing: float = 1.0) -> torch.Tensor:
    """95th-percentile symmetric Hausdorff distance between bool masks (B,H,W), batched.

    HD95 = max(P95 of d(∂P → ∂G), P95 of d(∂G → ∂P)) over boundary pixels, as MONAI defines it.
    Returns (B,) distances in pixels × ``spacing``; NaN where either mask is empty.
    Boundary point sets are padded to a common length and compared with one ``cdist`` per batch.
    """
    bp, bg = boundary(pred), boundary(target)
    B, H, W = pred.shape
    out = torch.full((B,), float("nan"), dtype=torch.float32, device=pred.device)
    ok = bp.flatten(1).any(1) & bg.flatten(1).any(1)
    if not ok.any():
        return out
    bp, bg = bp[ok], bg[ok]

    def coords(b):
        n = b.flatten(1).sum(1)
        L = int(n.max())
        idx = torch.argsort(b.flatten(1).to(torch.uint8), dim=1, descending=True, stable=True)[:, :L]
        yx = torch.stack([idx // W, idx % W], -1).float()
        valid = torch.arange(L, device=b.device)[None] < n[:, None]
        return yx, valid

    p, pv = coords(bp)
    g, gv = coords(bg)
    d = torch.cdist(p, g)  # (b, Lp, Lg)
    inf = torch.finfo(d.dtype).max
    d_pg = d.masked_fill(~gv[:, None, :], inf).amin(2).masked_fill(~pv, float("nan"))
    d_gp = d.masked_fill(~pv[:, :, None], inf).amin(1).masked_fill(~gv, float("nan"))
    h = torch.maximum(torch.nanquantile(d_pg, 0.95, dim=1), torch.nanquantile(d_gp, 0.95, dim=1))
    out[ok] = h * spacing
    return out


class HD95(Metric):
    """Mean HD95 per foreground class over the samples where prediction and target both hold that class.

    States are sums and counts, so ``sync_dist`` over DDP ranks is exact. ``compute()`` returns (K-1,) with NaN
    for classes never present in both."""

    full_state_update = False

    def __init__(self, num_classes: int, **kwargs):
        super().__init__(**kwargs)
        self.num_classes = num_classes
        self.add_state("total", torch.zeros(num_classes - 1, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros(num_classes - 1, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        for c in range(1, self.num_classes):
            h = hd95(preds == c, target == c)
            ok = ~torch.isnan(h)
            self.total[c - 1] += h[ok].double().sum()
            self.count[c - 1] += ok.sum()

    def compute(self) -> torch.Tensor:
        return (self.total / self.count).float()


class DiceIoU(Metric):
    """Per-class Dice and IoU from per-sample scores, averaged over the samples where the class is present in
    the target or the prediction (a class absent from both is not counted). Pixels equal to ``ignore_index`` in
    the target are excluded. ``compute()`` returns ``(dice (K-1,), iou (K-1,))`` over foreground classes.

    This is torchmetrics' ``DiceScore(aggregation_level="samplewise")`` arithmetic with ignore support;
    tests compare the two."""

    full_state_update = False

    def __init__(self, num_classes: int, ignore_index: int = 255, **kwargs):
        super().__init__(**kwargs)
        self.num_classes, self.ignore_index = num_classes, ignore_index
        for name in ("dice_sum", "iou_sum", "count"):
            self.add_state(name, torch.zeros(num_classes - 1, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        valid = target != self.ignore_index
        classes = torch.arange(1, self.num_classes, device=preds.device)[None, :, None]
        p = (preds.flatten(1)[:, None] == classes) & valid.flatten(1)[:, None]
        t = (target.flatten(1)[:, None] == classes) & valid.flatten(1)[:, None]
        inter = (p & t).sum(-1).double()
        ps, ts = p.sum(-1).double(), t.sum(-1).double()
        union = ps + ts - inter
        present = (ps + ts) > 0
        self.dice_sum += torch.where(present, 2 * inter / (ps + ts).clamp_min(1), 0).sum(0)
        self.iou_sum += torch.where(present, inter / union.clamp_min(1), 0).sum(0)
        self.count += present.sum(0)

    def compute(self):
        return (self.dice_sum / self.count).float(), (self.iou_sum / self.count).float()


from .volume_metrics import VolumeScores, score_volumes, surface_distances, volume_dice, volume_hd95  # noqa: E402,F401
