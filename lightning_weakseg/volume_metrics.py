"""Per-volume scores: 3D Dice and HD95 of each volume and class, and :class:`VolumeScores`, which assembles slice
predictions into volumes (any batch order, any DDP shard) and scores them once per epoch.

The numbers are those of the WSL4MIS benchmark (Luo et al., github.com/HiLab-git/WSL4MIS; ACDC scribbles table:
mean 3D Dice per volume over RV / Myo / LV, HD95 per volume), which scores each predicted volume against its label
volume with ``medpy.metric.binary.dc`` and ``medpy.metric.binary.hd95``:

* **Dice** of class ``c`` in one volume: ``2 |P ∩ G| / (|P| + |G|)`` over all its voxels (voxels labelled
  ``ignore_index`` in the target left out).
* **HD95** (medpy's convention): the surface of a mask is its voxels with a face neighbour outside it (the mask
  minus its erosion by the 6-neighbour cross, :func:`scipy.ndimage.generate_binary_structure` ``(3, 1)``, the
  volume's outside counting as background); ``d(P → G)`` are the distances from each surface voxel of ``P`` to the
  nearest surface voxel of ``G``, in mm (the voxel spacing scales each axis; SciPy's exact Euclidean distance
  transform); HD95 is the 95th percentile of both directed sets **pooled together**,
  ``percentile(d(P → G) ∪ d(G → P), 95)``.

  MONAI's ``compute_hausdorff_distance(percentile=95)`` (and the 2D :func:`~lightning_weakseg.metrics.hd95` of this
  library) take the **larger of the two directed 95th percentiles** instead,
  ``max(percentile(d(P → G), 95), percentile(d(G → P), 95))``, which is never smaller than the pooled value and
  larger when one surface is much bigger than the other (an over-segmentation's spurious blob counts fully in its
  own direction). The pooled convention is the default here because the published volume tables were computed with
  it; ``hd95_convention="max"`` gives MONAI's.

Edge cases: a class absent from both prediction and target is not scored (NaN, left out of the means); present in
one only, Dice is 0 and HD95 is NaN (undefined: there is no surface to measure against; WSL4MIS scores such a
volume's HD95 as 0, which would reward a missed structure). The mean over volumes is taken per class, ignoring
NaN; ``volume_dice`` is the mean of the per-class means.
"""
from __future__ import annotations

import warnings
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from scipy import ndimage

__all__ = ["HD95_CONVENTIONS", "volume_dice", "surface_distances", "volume_hd95", "score_volumes", "VolumeScores",
           "slice_predictions"]

HD95_CONVENTIONS = ("pooled", "max")


def _check_volumes(pred: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pred, target = np.asarray(pred), np.asarray(target)
    if pred.shape != target.shape:
        raise ValueError(f"prediction {pred.shape} and target {target.shape} must have the same shape")
    if pred.ndim not in (2, 3):
        raise ValueError(f"expected label volumes (D,H,W) (or (H,W)), got shape {pred.shape}")
    return pred, target


def _spacing(spacing, ndim: int) -> np.ndarray:
    s = np.ones(ndim) if spacing is None else np.asarray(spacing, np.float64).reshape(-1)
    if s.size != ndim or not np.all(np.isfinite(s)) or np.any(s <= 0):
        raise ValueError(f"spacing must be {ndim} positive numbers (one per axis), got {spacing!r}")
    return s


def volume_dice(pred: np.ndarray, target: np.ndarray, num_classes: int, ignore_index: int | None = 255) -> np.ndarray:
    """3D Dice per foreground class of one volume: float64 (num_classes - 1,), NaN where the class is in neither.

    >>> p = np.zeros((4, 4, 4), int); g = p.copy(); p[:2] = 1; g[1:3] = 1
    >>> volume_dice(p, g, 2)
    array([0.5])
    """
    pred, target = _check_volumes(pred, target)
    valid = np.ones(target.shape, bool) if ignore_index is None else target != ignore_index
    out = np.full(num_classes - 1, np.nan)
    for c in range(1, num_classes):
        p, g = (pred == c) & valid, (target == c) & valid
        ps, gs = int(p.sum()), int(g.sum())
        if ps + gs:
            out[c - 1] = 2.0 * int((p & g).sum()) / (ps + gs)
    return out


def _surface(mask: np.ndarray) -> np.ndarray:
    structure = ndimage.generate_binary_structure(mask.ndim, 1)
    return mask & ~ndimage.binary_erosion(mask, structure=structure, border_value=0)


def surface_distances(a: np.ndarray, b: np.ndarray, spacing: Sequence[float] | None = None) -> np.ndarray:
    """Distances (mm) from each surface voxel of bool mask ``a`` to the nearest surface voxel of ``b`` (medpy's
    ``__surface_distances`` with connectivity 1); both masks must be non-empty.

    Only the bounding box of ``a ∪ b`` (one voxel of margin) is transformed: the surfaces lie inside it, and the
    Euclidean distance between two voxels does not depend on the grid around them."""
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    if not a.any() or not b.any():
        raise ValueError("surface distances need two non-empty masks")
    s = _spacing(spacing, a.ndim)
    box = ndimage.find_objects((a | b).astype(np.uint8))[0]
    a, b = np.pad(a[box], 1), np.pad(b[box], 1)  # zero margin: erosion sees background beyond the box
    dt = ndimage.distance_transform_edt(~_surface(b), sampling=s)
    return dt[_surface(a)]


def volume_hd95(pred: np.ndarray, target: np.ndarray, num_classes: int, spacing: Sequence[float] | None = None,
                convention: str = "pooled") -> np.ndarray:
    """HD95 per foreground class of one volume (mm with ``spacing``, one number per axis; voxels without):
    float64 (num_classes - 1,), NaN where the class is missing from the prediction or the target.

    ``convention="pooled"`` — medpy / WSL4MIS: the 95th percentile of both directed surface-distance sets together;
    ``"max"`` — MONAI: the larger of the two directed 95th percentiles (see the module docstring).

    >>> p = np.zeros((1, 6, 6), int); g = p.copy(); p[0, 1:4, 1:4] = 1; g[0, 1:5, 1:5] = 1
    >>> volume_hd95(p, g, 2), volume_hd95(p, g, 2, convention="max").round(3)
    (array([1.]), array([1.104]))
    """
    if convention not in HD95_CONVENTIONS:
        raise ValueError(f"convention must be one of {HD95_CONVENTIONS}, got {convention!r}")
    pred, target = _check_volumes(pred, target)
    s = _spacing(spacing, pred.ndim)
    out = np.full(num_classes - 1, np.nan)
    for c in range(1, num_classes):
        p, g = pred == c, target == c
        if not p.any() or not g.any():
            continue
        d_pg, d_gp = surface_distances(p, g, s), surface_distances(g, p, s)
        if convention == "pooled":
            out[c - 1] = np.percentile(np.concatenate([d_pg, d_gp]), 95)
        else:
            out[c - 1] = max(np.percentile(d_pg, 95), np.percentile(d_gp, 95))
    return out


def _nanmean(rows: np.ndarray) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a class never scored stays NaN
        return np.nanmean(rows, 0) if len(rows) else np.full(rows.shape[1:], np.nan)


def score_volumes(volumes: Mapping[str, tuple[np.ndarray, np.ndarray, Sequence[float] | None]], num_classes: int,
                  ignore_index: int | None = 255, hd95_convention: str = "pooled") -> dict[str, Any]:
    """Score ``{name: (pred, target, spacing)}`` label volumes.

    Returns ``dice`` and ``hd95`` (num_classes - 1,) — per class, the mean over volumes (NaN left out) — their
    means over classes ``mean_dice`` / ``mean_hd95``, ``per_volume`` ``{name: {"dice": [...], "hd95": [...]}}``
    and ``n_volumes``."""
    names = sorted(volumes)
    dice = np.full((len(names), num_classes - 1), np.nan)
    hd = np.full((len(names), num_classes - 1), np.nan)
    for j, name in enumerate(names):
        pred, target, spacing = volumes[name]
        dice[j] = volume_dice(pred, target, num_classes, ignore_index)
        t = target if ignore_index is None else np.where(target == ignore_index, 0, target)
        hd[j] = volume_hd95(pred, t, num_classes, spacing, hd95_convention)
    d, h = _nanmean(dice), _nanmean(hd)
    return {"dice": d, "hd95": h, "mean_dice": float(_nanmean(d[:, None])[0]),
            "mean_hd95": float(_nanmean(h[:, None])[0]), "n_volumes": len(names),
            "per_volume": {n: {"dice": dice[j].tolist(), "hd95": hd[j].tolist()} for j, n in enumerate(names)}}


def _numpy_u8(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        return (x.to(torch.uint8) if x.dtype != torch.uint8 else x).numpy()
    return np.asarray(x).astype(np.uint8, copy=False)


def _dist() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size(), torch.distributed.get_rank()
    return 1, 0


class VolumeScores:
    """Collects slice predictions with their volume name and slice index, and scores whole volumes.

    Each process keeps only its own slices (uint8 label maps, a few kB each); :meth:`compute` gathers them on rank 0
    (``torch.distributed.gather_object``), stacks each volume's slices in slice order (whatever order the batches
    and shards came in), scores every volume once (:func:`score_volumes`) and broadcasts the result, so every rank
    returns the same numbers. A slice seen twice is an error (DDP filler samples, flagged ``pad``, must be left out
    before :meth:`update`). Slices of one volume must share their height × width.

    Args:
        num_classes: classes including background (scores are over the foreground classes).
        ignore_index: target value left out of Dice (and counted as background for HD95).
        hd95_convention: ``"pooled"`` (medpy / WSL4MIS, default) or ``"max"`` (MONAI).

    Example::

        scores = VolumeScores(4)
        scores.update(["p1", "p1"], [1, 0], [pred_1, pred_0], [gt_1, gt_0], [(1.5, 1.5, 8.0)] * 2)
        scores.compute()["mean_dice"]
    """

    def __init__(self, num_classes: int, ignore_index: int | None = 255, hd95_convention: str = "pooled"):
        if hd95_convention not in HD95_CONVENTIONS:
            raise ValueError(f"hd95_convention must be one of {HD95_CONVENTIONS}, got {hd95_convention!r}")
        if num_classes > 255:
            raise ValueError("VolumeScores stores uint8 label maps: at most 255 classes")
        self.num_classes, self.ignore_index, self.hd95_convention = num_classes, ignore_index, hd95_convention
        self.records: list[tuple[str, int, np.ndarray, np.ndarray, tuple[float, ...]]] = []

    def __len__(self) -> int:
        return len(self.records)

    def reset(self) -> None:
        self.records = []

    def update(self, volumes: Sequence[str], slices: Sequence[int], preds: Sequence, targets: Sequence,
               spacings: Sequence | None = None) -> None:
        """Add slices: ``preds`` / ``targets`` are (H,W) label maps (tensors or arrays), ``spacings`` one (3,)
        voxel spacing per slice in the order (slice axis, H, W) (``None``: 1 voxel)."""
        n = len(volumes)
        if not (len(slices) == len(preds) == len(targets) == n) or (spacings is not None and len(spacings) != n):
            raise ValueError("volumes, slices, preds, targets (and spacings) must have one entry per slice")
        for j in range(n):
            p, t = _numpy_u8(preds[j]), _numpy_u8(targets[j])
            if p.ndim != 2 or p.shape != t.shape:
                raise ValueError(f"volume {volumes[j]} slice {int(slices[j])}: expected two (H,W) maps of one size, "
                                 f"got {p.shape} and {t.shape}")
            s = (1.0, 1.0, 1.0) if spacings is None else tuple(float(v) for v in np.asarray(
                spacings[j].detach().cpu() if isinstance(spacings[j], torch.Tensor) else spacings[j]).reshape(-1))
            self.records.append((str(volumes[j]), int(slices[j]), p, t, s))

    def gather(self) -> list | None:
        """All ranks' records on rank 0 (``None`` on the others); this rank's own records in one process."""
        world, rank = _dist()
        if world == 1:
            return list(self.records)
        parts = [None] * world if rank == 0 else None
        torch.distributed.gather_object(self.records, parts, dst=0)
        return None if rank != 0 else [r for part in parts for r in part]

    def assemble(self, records: Sequence) -> dict[str, tuple[np.ndarray, np.ndarray, tuple[float, ...]]]:
        """``{name: (pred (D,H,W), target (D,H,W), spacing)}`` from slice records, each volume in slice order."""
        by_volume: dict[str, dict[int, tuple]] = {}
        for name, k, p, t, s in records:
            slices = by_volume.setdefault(name, {})
            if k in slices:
                raise ValueError(f"volume {name}: slice {k} was predicted twice (DDP filler samples must carry "
                                 "pad=True and be left out)")
            slices[k] = (p, t, s)
        out = {}
        for name, slices in by_volume.items():
            order = sorted(slices)
            shapes = {slices[k][0].shape for k in order}
            if len(shapes) > 1:
                raise ValueError(f"volume {name}: slices of different sizes {sorted(shapes)}")
            spacing = slices[order[0]][2]
            pred = np.stack([slices[k][0] for k in order])
            target = np.stack([slices[k][1] for k in order])
            out[name] = (pred, target, spacing)
        return out

    def compute(self) -> dict[str, Any]:
        """Gather, assemble and score (:func:`score_volumes`); the same dict on every rank. Collective under DDP:
        every rank must call it."""
        records = self.gather()
        world, rank = _dist()
        result = None
        if rank == 0:
            result = score_volumes(self.assemble(records), self.num_classes, self.ignore_index, self.hd95_convention)
        if world > 1:
            box = [result]
            torch.distributed.broadcast_object_list(box, src=0)
            result = box[0]
        return result


def slice_predictions(batch: Mapping[str, Any], probs: torch.Tensor, ignore_index: int = 255) -> dict[str, list]:
    """The slices of an evaluation batch as :meth:`VolumeScores.update` takes them: ``volumes``, ``slices``,
    ``preds``, ``targets``, ``spacings`` of the samples that are not DDP filler (``pad``) and carry a mask.

    With ``native_mask`` (evaluation views of :class:`~lightning_weakseg.data.volumes.VolumeDataset`) the
    prediction is the argmax of the probabilities mapped back to the slice's own grid
    (:func:`~lightning_weakseg.inference.to_native`: letterbox crop, bilinear resize), scored against the label slice
    as stored, at the header's spacing. Without it the base view is scored, cropped to ``content``, with the
    in-plane spacing scaled by the resize (``orig_size / content``)."""
    from .inference import to_native

    B = probs.shape[0]
    pad, has_mask = batch.get("pad"), batch.get("has_mask")
    native, has_native = batch.get("native_mask"), batch.get("has_native_mask")
    spacing = batch.get("spacing")
    content, orig = batch.get("content"), batch.get("orig_size")
    out: dict[str, list] = {"volumes": [], "slices": [], "preds": [], "targets": [], "spacings": []}
    idx = [i for i in range(B) if (pad is None or not bool(pad[i])) and (has_mask is None or bool(has_mask[i]))]
    if not idx:
        return out
    base = torch.ones(3) if spacing is None else None
    native_idx = [i for i in idx if native is not None and (has_native is None or bool(has_native[i]))]
    maps = {}
    if native_idx:
        mapped = to_native(probs[native_idx], None if content is None else content[native_idx],
                           None if orig is None else orig[native_idx])
        maps = {i: (p.argmax(0), native[i].to(p.device)) for i, p in zip(native_idx, mapped)}
    labels = probs.argmax(1)
    for i in idx:
        s = (base if spacing is None else spacing[i].detach().float().cpu()).clone()
        if i in maps:
            pred, target = maps[i]
            if tuple(pred.shape) != tuple(target.shape):
                raise ValueError(f"sample {batch.get('id', [None] * B)[i]}: native_mask is {tuple(target.shape)} but "
                                 f"the prediction maps back to {tuple(pred.shape)} (orig_size / content)")
        else:
            pred, target = labels[i], batch["mask"][i]
            if content is not None:
                top, left, h, w = (int(v) for v in content[i])
                pred, target = pred[top:top + h, left:left + w], target[top:top + h, left:left + w]
                if orig is not None:
                    s[1] *= float(orig[i][0]) / h
                    s[2] *= float(orig[i][1]) / w
        out["volumes"].append(str(batch["volume"][i]))
        out["slices"].append(int(batch["slice"][i]))
        out["preds"].append(pred)
        out["targets"].append(target.long().clamp(0, 255) if target.dtype != torch.uint8 else target)
        out["spacings"].append(s)
    return out
