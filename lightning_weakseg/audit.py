"""Label audit: which dense labels (masks, noisy masks, pseudo masks) are most likely wrong, and where.

A model's *out-of-sample* class probabilities are compared with the given label map: per image a label-quality
score (higher = better label), per pixel a score and an issue map, per image a suspected kind of error (a missing
object, an extra object, or a boundary). This follows Lad & Mueller, "Estimating label quality and errors in
semantic segmentation data via any model" (2023), the method of cleanlab's segmentation module, and adds a Dice
disagreement score. Everything is streamed batch by batch on the model's device: no (N,K,H,W) array is ever held.

Three layers:

* the functional core, tensors in, tensors out: :func:`pixel_label_quality`, :func:`label_quality_scores`,
  :func:`pixel_issues`, :func:`suspected_error_types`;
* :class:`LabelQualityScorer`, which accumulates one row per image batch by batch (and the worst images for a
  gallery, a bounded number), and gathers the rows of every ``torch.distributed`` rank into one ranked table;
* :func:`audit` (a trained model over a data set or loader) and :func:`cross_val_audit` (k folds, each model
  trained by ``Trainer.fit``, each fold scored by the model that did not see it), returning an
  :class:`AuditResult` that writes the ranked CSV, the per-pixel issue maps and the gallery.

Where the probabilities come from matters: a model scores the labels it trained on as good (it memorised them).
:func:`cross_val_audit` gives out-of-sample probabilities. ``audit(..., network="peer")`` on a co-teaching module
scores with the peer network: both networks saw the same images, each trained on the images its peer selected, so
the peer's view is *out-of-selection*, not out-of-sample; it costs no extra training and ranks the masks the
selection kept rejecting as the worst, but a noisy mask both networks memorised is scored as clean.
"""
from __future__ import annotations

import csv
import heapq
import math
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .data.batch import IGNORE_INDEX
from .inference import class_map

__all__ = ["METHODS", "DEFAULT_METHOD", "ERROR_TYPES", "pixel_label_quality", "label_quality_scores",
           "pixel_issues", "suspected_error_types", "LabelQualityScorer", "AuditResult", "audit",
           "cross_val_audit", "kfold_indices", "probabilities"]

#: image-score methods of :func:`label_quality_scores`
METHODS = ("dice", "softmin", "self_confidence")
#: the default: best on the Kvasir and ACDC benchmarks (benchmarks/audit.py, docs/audit.md)
DEFAULT_METHOD = "dice"
ERROR_TYPES = ("missing object", "extra object", "boundary", "none")


# ---------------------------------------------------------------------------------------------------------- core
def _check(probs: Tensor, labels: Tensor, ignore_index: int) -> Tensor:
    if not torch.is_tensor(probs) or probs.ndim != 4 or not probs.is_floating_point():
        raise ValueError(f"probs: expected a float tensor (N,K,H,W) of class probabilities, got "
                         f"{getattr(probs, 'dtype', type(probs).__name__)} {tuple(getattr(probs, 'shape', ()))}")
    if not torch.is_tensor(labels) or labels.ndim != 3 or labels.is_floating_point():
        raise ValueError(f"labels: expected an integer tensor (N,H,W), got "
                         f"{getattr(labels, 'dtype', type(labels).__name__)} {tuple(getattr(labels, 'shape', ()))}")
    n, k, h, w = probs.shape
    if tuple(labels.shape) != (n, h, w):
        raise ValueError(f"labels: expected shape {(n, h, w)} to match probs {tuple(probs.shape)}, got "
                         f"{tuple(labels.shape)}")
    valid = labels != ignore_index
    lab = labels[valid]
    if lab.numel() and (int(lab.min()) < 0 or int(lab.max()) >= k):
        raise ValueError(f"labels: expected classes in [0, {k - 1}] or {ignore_index} (ignore), got values in "
                         f"[{int(lab.min())}, {int(lab.max())}]")
    return valid


def pixel_label_quality(probs: Tensor, labels: Tensor, ignore_index: int = IGNORE_INDEX) -> Tensor:
    r"""Per-pixel label quality: the self-confidence :math:`s_{n,x} = p_{n, y_{n,x}, x}`, the predicted probability
    of the given class (Lad & Mueller 2023; cleanlab's pixel score). Ignored pixels (``ignore_index``) get 1.

    Args:
        probs: float (N,K,H,W), class probabilities (softmax over K).
        labels: long (N,H,W), classes 0..K−1 or ``ignore_index``.

    Returns:
        float (N,H,W) in [0, 1]; low = the model doubts the given class.

    Example:
        >>> p = torch.tensor([[[[0.9, 0.2]], [[0.1, 0.8]]]])      # N=1, K=2, H=1, W=2
        >>> pixel_label_quality(p, torch.tensor([[[0, 0]]]))
        tensor([[[0.9000, 0.2000]]])
    """
    valid = _check(probs, labels, ignore_index)
    idx = torch.where(valid, labels, torch.zeros_like(labels)).long().unsqueeze(1)
    s = probs.gather(1, idx).squeeze(1)
    return torch.where(valid, s, torch.ones_like(s))


def _softmin(s: Tensor, valid: Tensor, temperature: float) -> Tensor:
    """Σ_x s_x · softmax(−s/T)_x over the valid pixels of each image; 1 for an image without any."""
    flat, v = s.flatten(1), valid.flatten(1)
    logits = torch.where(v, -flat / temperature, torch.full_like(flat, -math.inf))
    any_valid = v.any(1)
    logits = torch.where(any_valid[:, None], logits, torch.zeros_like(logits))
    w = logits.softmax(1)
    out = (w * torch.where(v, flat, torch.zeros_like(flat))).sum(1)
    return torch.where(any_valid, out, torch.ones_like(out))


def _soft_dice(probs: Tensor, labels: Tensor, valid: Tensor, include_background: bool) -> Tensor:
    """Mean over the present classes of 2·Σ p_c·[y=c] / (Σ p_c + Σ [y=c]), valid pixels only."""
    n, k = probs.shape[:2]
    v = valid.unsqueeze(1).to(probs.dtype)
    onehot = torch.zeros_like(probs).scatter_(1, torch.where(valid, labels, torch.zeros_like(labels)).long()
                                              .unsqueeze(1), 1.0) * v
    p = probs * v
    inter = (p * onehot).flatten(2).sum(2)
    denom = p.flatten(2).sum(2) + onehot.flatten(2).sum(2)
    dice = torch.where(denom > 0, 2 * inter / denom.clamp_min(torch.finfo(probs.dtype).tiny), torch.ones_like(denom))
    pred = class_map(probs)
    pred_has = torch.zeros_like(probs).scatter_(1, pred.unsqueeze(1), 1.0).mul(v).flatten(2).amax(2) > 0
    present = (onehot.flatten(2).amax(2) > 0) | pred_has
    if not include_background:
        present[:, 0] = False
    cnt = present.sum(1)
    score = (dice * present).sum(1) / cnt.clamp_min(1)
    return torch.where(cnt > 0, score, torch.ones_like(score))


def label_quality_scores(probs: Tensor, labels: Tensor, method: str = DEFAULT_METHOD, *, temperature: float = 0.1,
                         ignore_index: int = IGNORE_INDEX, include_background: bool = False) -> tuple[Tensor, Tensor]:
    r"""Per-image and per-pixel label-quality scores of dense labels from (out-of-sample) class probabilities;
    higher = better label (Lad & Mueller, "Estimating label quality and errors in semantic segmentation data via
    any model", 2023).

    Pixel scores are the self-confidence :math:`s_x = p_{y_x}(x)` (:func:`pixel_label_quality`), 1 on ignored
    pixels. Image scores, over the valid pixels :math:`V` (label ≠ ``ignore_index``) of each image:

    * ``"dice"`` (default) — Dice disagreement between the mask and the prediction: the soft Dice
      :math:`\frac{2\sum_{x\in V} p_c(x)[y_x=c]}{\sum_{x\in V} p_c(x) + \sum_{x\in V}[y_x=c]}` averaged over the
      classes :math:`c` present in the label or in the arg-max prediction (foreground classes only unless
      ``include_background``); 1 when no such class. A dropped or invented object, a shifted or eroded outline all
      lower it, in proportion to the object's size rather than the image's.
    * ``"softmin"`` — cleanlab's image score: :math:`\sum_{x\in V} s_x\,w_x` with
      :math:`w = \mathrm{softmax}(-s/T)` over V (equivalently softmax((1 − s)/T)), T = ``temperature``
      (cleanlab: 0.1): a soft minimum of the pixel scores.
    * ``"self_confidence"`` — the mean of :math:`s_x` over V.

    An image without any valid pixel scores 1 under every method.

    Args:
        probs: float (N,K,H,W), class probabilities.
        labels: long (N,H,W), classes 0..K−1 or ``ignore_index`` (excluded from every score).
        method: one of :data:`METHODS`.

    Returns:
        ``(image_scores (N,), pixel_scores (N,H,W))``, both in [0, 1].

    Example:
        >>> p = torch.zeros(1, 2, 4, 4); p[:, 0] = 1.0; p[:, 1, :2, :2], p[:, 0, :2, :2] = 1.0, 0.0
        >>> y = torch.zeros(1, 4, 4, dtype=torch.long); y[:, :2, :2] = 1
        >>> label_quality_scores(p, y)[0]                # the label agrees with the prediction
        tensor([1.])
        >>> label_quality_scores(p, torch.zeros_like(y))[0]   # the object is missing from the label
        tensor([0.])
    """
    if method not in METHODS:
        raise ValueError(f"method: expected one of {METHODS}, got {method!r}")
    if not temperature > 0:
        raise ValueError(f"temperature: expected > 0, got {temperature}")
    valid = _check(probs, labels, ignore_index)
    s = pixel_label_quality(probs, labels, ignore_index)
    if method == "softmin":
        image = _softmin(s, valid, temperature)
    elif method == "self_confidence":
        cnt = valid.flatten(1).sum(1)
        image = torch.where(cnt > 0, (s * valid).flatten(1).sum(1) / cnt.clamp_min(1), torch.ones_like(s[:, 0, 0]))
    else:
        image = _soft_dice(probs, labels, valid, include_background)
    return image, s


def pixel_issues(probs: Tensor, labels: Tensor, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """Per-pixel issue flags: bool (N,H,W), True where the arg-max prediction differs from the given class (ignored
    pixels are never flagged)."""
    valid = _check(probs, labels, ignore_index)
    return valid & (class_map(probs) != labels)


def suspected_error_types(pred: Tensor | np.ndarray, labels: Tensor | np.ndarray, ignore_index: int = IGNORE_INDEX,
                          min_overlap: float = 0.2, min_size: float = 0.002) -> list[str]:
    """Per image, the kind of error the label most likely has, from connected components (SciPy; not for a
    training step):

    * ``"missing object"`` — a predicted foreground component that the label lacks (less than ``min_overlap`` of
      its pixels carry its class in the label);
    * ``"extra object"`` — a label component the prediction lacks (the same test the other way round);
    * ``"boundary"`` — neither, but label and prediction disagree somewhere; ``"none"`` — they agree everywhere.

    When both kinds occur, the one with more pixels wins. Components smaller than ``min_size`` × the image's valid
    pixels (at least 4) are left out. ``pred`` and ``labels``: integer (N,H,W).
    """
    from scipy import ndimage as ndi

    pred = pred.detach().cpu().numpy() if torch.is_tensor(pred) else np.asarray(pred)
    labels = labels.detach().cpu().numpy() if torch.is_tensor(labels) else np.asarray(labels)
    out = []
    for p, y in zip(pred, labels):
        valid = y != ignore_index
        smallest = max(4, int(min_size * valid.sum()))
        missing = extra = 0
        for c in np.unique(np.concatenate([np.unique(p[valid]), np.unique(y[valid])])):
            if c == 0:
                continue
            for region, other, kind in (((p == c) & valid, y == c, "missing"), ((y == c) & valid, p == c, "extra")):
                comp, n = ndi.label(region)
                if n == 0:
                    continue
                sizes = np.bincount(comp.ravel(), minlength=n + 1)[1:]
                hit = np.bincount(comp[other & region].ravel(), minlength=n + 1)[1:]
                lost = (sizes >= smallest) & (hit < min_overlap * sizes)
                if kind == "missing":
                    missing += int(sizes[lost].sum())
                else:
                    extra += int(sizes[lost].sum())
        if missing or extra:
            out.append("missing object" if missing >= extra else "extra object")
        else:
            out.append("boundary" if bool(((p != y) & valid).any()) else "none")
    return out


# ------------------------------------------------------------------------------------------------------ streaming
def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", str(name)) or "image"


class LabelQualityScorer:
    """Accumulates one row per image, batch by batch, and gathers them across ranks into one ranked table.

    Each :meth:`update` scores a batch (:func:`label_quality_scores` for every method of ``methods``, the
    suspected error type, the share of flagged pixels) on the batch's device and keeps only the per-image rows
    (a few numbers each); with ``num_worst > 0`` it also keeps, per rank, the ``num_worst`` lowest-scoring images
    with their label, prediction and issue map (a bounded heap) for the gallery. :meth:`compute` all-gathers the
    rows (and the candidates) of every ``torch.distributed`` rank, drops duplicates (samples that a distributed
    sampler repeated to even out the shards, by ``key``), and sorts by the score of ``method``, worst first: the
    same table as one process scoring everything, whatever the batching or sharding.

    Args:
        method: the score that ranks (:data:`METHODS`); every method of ``methods`` is also in each row.
        issue_map_dir: write each image's issue map, ``<id>.png`` uint8 = round(255 · (1 − pixel score)), 0 on
            ignored pixels, as it is scored (each rank writes its own images).
    """

    def __init__(self, method: str = DEFAULT_METHOD, methods: Sequence[str] = METHODS, *, temperature: float = 0.1,
                 ignore_index: int = IGNORE_INDEX, num_worst: int = 0, error_types: bool = True,
                 issue_map_dir: str | Path | None = None):
        if method not in METHODS:
            raise ValueError(f"method: expected one of {METHODS}, got {method!r}")
        self.method = method
        self.methods = tuple(dict.fromkeys([method, *methods]))
        bad = [m for m in self.methods if m not in METHODS]
        if bad:
            raise ValueError(f"methods: expected names from {METHODS}, got {bad}")
        self.temperature, self.ignore_index = temperature, ignore_index
        self.num_worst, self.error_types = int(num_worst), error_types
        self.issue_map_dir = Path(issue_map_dir) if issue_map_dir is not None else None
        self.reset()

    def reset(self) -> None:
        self.rows: list[dict[str, Any]] = []
        self._worst: list[tuple[float, int, dict]] = []  # a max-heap of the lowest scores, by (-score, -key)
        self._seen: set = set()

    @torch.no_grad()
    def update(self, probs: Tensor, labels: Tensor, keys: Sequence[int], ids: Sequence[str] | None = None,
               images: Tensor | None = None, extra: dict[str, Sequence] | None = None) -> None:
        """Score one batch: ``probs`` (B,K,H,W), ``labels`` (B,H,W), ``keys`` B unique sample numbers (the table's
        identity and tie-break), ``ids`` names, ``images`` (B,C,H,W) for the gallery, ``extra`` per-image columns."""
        labels = labels.to(probs.device).long()
        keys = [int(k) for k in (keys.tolist() if torch.is_tensor(keys) else keys)]
        ids = [str(i) for i in ids] if ids is not None else [str(k) for k in keys]
        scores = {}
        pixel = None
        for m in self.methods:
            img, pixel = label_quality_scores(probs, labels, m, temperature=self.temperature,
                                              ignore_index=self.ignore_index)
            scores[m] = img.double().cpu().tolist()
        valid = labels != self.ignore_index
        pred = class_map(probs)
        flagged = (valid & (pred != labels)).flatten(1).sum(1).double()
        frac = (flagged / valid.flatten(1).sum(1).clamp_min(1).double()).cpu().tolist()
        kinds = suspected_error_types(pred, labels, self.ignore_index) if self.error_types else [""] * len(keys)
        issue = None
        if self.issue_map_dir is not None or self.num_worst > 0:
            issue = torch.where(valid, 1.0 - pixel, torch.zeros_like(pixel))
        if self.issue_map_dir is not None:
            self._write_issue_maps(ids, issue)
        for b, key in enumerate(keys):
            if key in self._seen:  # a sample a distributed sampler repeated
                continue
            self._seen.add(key)
            row = {"key": key, "id": ids[b], "score": scores[self.method][b],
                   **{f"score_{m}": scores[m][b] for m in self.methods},
                   "error_type": kinds[b], "flagged_fraction": frac[b]}
            for name, values in (extra or {}).items():
                v = values[b]
                row[name] = v.item() if torch.is_tensor(v) else v
            self.rows.append(row)
            if self.num_worst > 0:
                item = (-row["score"], -key)
                if len(self._worst) < self.num_worst or item > self._worst[0][:2]:
                    payload = {"row": row, "label": labels[b].cpu(), "pred": pred[b].cpu(),
                               "issue": issue[b].float().cpu(),
                               "image": images[b].float().cpu() if images is not None else None}
                    entry = (item[0], item[1], payload)
                    if len(self._worst) < self.num_worst:
                        heapq.heappush(self._worst, entry)
                    else:
                        heapq.heapreplace(self._worst, entry)

    def _write_issue_maps(self, ids: Sequence[str], issue: Tensor) -> None:
        import cv2

        self.issue_map_dir.mkdir(parents=True, exist_ok=True)
        maps = (issue.clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
        for name, m in zip(ids, maps):
            cv2.imwrite(str(self.issue_map_dir / f"{_safe_name(name)}.png"), m)

    def compute(self) -> "AuditResult":
        """The ranked table of all ranks (worst first) and the global worst ``num_worst`` images; the same on every
        rank."""
        rows = list(self.rows)
        worst = [e[2] for e in self._worst]
        if torch.distributed.is_available() and torch.distributed.is_initialized() and \
                torch.distributed.get_world_size() > 1:
            gathered: list = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(gathered, (rows, worst))
            rows = [r for part in gathered for r in part[0]]
            worst = [w for part in gathered for w in part[1]]
        unique: dict[int, dict] = {}
        for r in rows:
            unique.setdefault(r["key"], r)
        ranked = sorted(unique.values(), key=lambda r: (r["score"], r["key"]))
        for i, r in enumerate(ranked, start=1):
            r["rank"] = i
        seen, chosen = set(), []
        for w in sorted(worst, key=lambda w: (w["row"]["score"], w["row"]["key"])):
            if w["row"]["key"] not in seen:
                seen.add(w["row"]["key"])
                chosen.append(w)
        return AuditResult(ranked, chosen[:self.num_worst], self.method)


# -------------------------------------------------------------------------------------------------------- results
@dataclass
class AuditResult:
    """The ranked table (``rows``, worst first: ``rank``, ``id``, ``key``, ``score``, ``score_<method>``,
    ``error_type``, ``flagged_fraction`` and any extra columns) and the worst images with their label, prediction
    and issue map (``worst``)."""
    rows: list[dict[str, Any]]
    worst: list[dict[str, Any]] = field(default_factory=list)
    method: str = DEFAULT_METHOD

    def scores(self) -> dict[int, float]:
        """key → score of the ranking method."""
        return {r["key"]: r["score"] for r in self.rows}

    def to_csv(self, path: str | Path) -> Path:
        """Write the ranked table: ``rank, image, score, error_type, ...``."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        first = ["rank", "id", "score", "error_type"]
        cols = first + [c for c in (self.rows[0] if self.rows else {}) if c not in first]
        with path.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
            w.writeheader()
            for r in self.rows:
                w.writerow({k: (f"{v:.6f}" if isinstance(v, float) else v) for k, v in r.items()})
        return path

    def gallery(self) -> np.ndarray | None:
        """One uint8 (n·H, 4·W, 3) grid, a row per worst image: image | given mask | predicted mask | issue map."""
        rows = [self.panel(w) for w in self.worst]
        if not rows:
            return None
        width = max(r.shape[1] for r in rows)
        rows = [np.pad(r, ((0, 0), (0, width - r.shape[1]), (0, 0))) for r in rows]
        return np.concatenate(rows, axis=0)

    @staticmethod
    def panel(item: dict) -> np.ndarray:
        import cv2

        from .callbacks.image_logger import panel

        label, pred, issue = item["label"], item["pred"], item["issue"]
        image = item.get("image")
        if image is None:
            image = torch.zeros(3, *label.shape)
        heat = cv2.applyColorMap((issue.clamp(0, 1).numpy() * 255).round().astype(np.uint8), cv2.COLORMAP_INFERNO)
        row = np.concatenate([panel(image, label, pred), heat[..., ::-1]], axis=1)
        return np.ascontiguousarray(row)

    def write(self, output_dir: str | Path, csv_name: str = "audit.csv") -> dict[str, Any]:
        """``audit.csv`` and ``gallery/<rank>_<id>.png`` (one panel per worst image) plus ``gallery.png`` (all)."""
        import cv2

        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        paths: dict[str, Any] = {"csv": self.to_csv(out / csv_name), "gallery": []}
        if self.worst:
            (out / "gallery").mkdir(exist_ok=True)
            for w in self.worst:
                p = out / "gallery" / f"{w['row']['rank']:04d}_{_safe_name(w['row']['id'])}.png"
                cv2.imwrite(str(p), self.panel(w)[..., ::-1])
                paths["gallery"].append(p)
            grid = self.gallery()
            cv2.imwrite(str(out / "gallery.png"), grid[..., ::-1])
            paths["grid"] = out / "gallery.png"
        return paths

    def log_gallery(self, loggers: Iterable, tag: str = "audit/worst", step: int = 0) -> bool:
        """Give the gallery to Lightning loggers: TensorBoard's ``add_image`` or any logger's ``log_image``.
        Returns whether one took it."""
        grid = self.gallery()
        if grid is None:
            return False
        from .callbacks.image_logger import log_image
        return log_image(loggers, tag, grid, step)


# ------------------------------------------------------------------------------------------------------- running
def probabilities(model: torch.nn.Module, images: Tensor, network: str = "module") -> Tensor:
    """Class probabilities (B,K,H,W) of ``model`` for ``images``: ``"module"`` — the module's own prediction
    (``out["probs"]`` of a :class:`~lightning_weakseg.WeakSegModule`, or the softmax of a plain network's logits);
    ``"model"`` / ``"peer"`` — the softmax of ``model.model`` / ``model.peer_model`` alone (a co-teaching pair)."""
    if network == "module":
        out = model(images)
    elif network in ("model", "peer"):
        attr = "model" if network == "model" else "peer_model"
        net = getattr(model, attr, None)
        if net is None:
            raise ValueError(f"network={network!r}: the module has no {attr!r} (a co-teaching module has both)")
        out = net(images)
    else:
        raise ValueError(f"network: expected 'module', 'model' or 'peer', got {network!r}")
    if isinstance(out, dict):
        return out["probs"] if "probs" in out else out["logits"].softmax(1)
    if isinstance(out, (tuple, list)):
        out = out[0]
    return out.softmax(1)


class _Positions(torch.utils.data.Dataset):
    """The samples ``positions`` of ``dataset``, each tagged with its position (the table's key)."""

    def __init__(self, dataset, positions: Sequence[int]):
        self.dataset, self.positions = dataset, list(positions)

    def __len__(self):
        return len(self.positions)

    def __getitem__(self, i):
        pos = self.positions[i]
        sample = dict(self.dataset[pos])
        sample["audit_key"] = pos
        return sample


def _collate(samples):
    from .data.batch import collate

    keys = torch.tensor([s.pop("audit_key") for s in samples])
    batch = collate(samples)
    batch["audit_key"] = keys
    return batch


def _rank_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _shard_loader(dataset, positions: Sequence[int], batch_size: int, num_workers: int = 0):
    rank, world = _rank_world()
    mine = list(positions)[rank::world]  # each sample on exactly one rank: nothing to de-duplicate
    return torch.utils.data.DataLoader(_Positions(dataset, mine), batch_size=batch_size, shuffle=False,
                                       num_workers=num_workers, collate_fn=_collate)


@torch.no_grad()
def _score_loader(model, loader, scorer: LabelQualityScorer, label_key: str, network: str, device,
                  extra: Callable[[dict], dict] | None = None) -> None:
    was_training = model.training
    model.eval()
    try:
        for batch in loader:
            if label_key not in batch:
                raise KeyError(f"audit: the batch has no {label_key!r} label map (keys: {sorted(batch)}); pass "
                               "label_key= the dense label to audit")
            images = batch["image"].to(device, torch.float32 if not torch.is_floating_point(batch["image"]) else
                                       next(model.parameters()).dtype)
            labels = batch[label_key]
            keep = torch.ones(images.shape[0], dtype=torch.bool)
            if f"has_{label_key}" in batch:
                keep &= batch[f"has_{label_key}"].bool().cpu()
            if "pad" in batch:
                keep &= ~batch["pad"].bool().cpu()
            if not keep.any():
                continue
            idx = keep.nonzero().squeeze(1)
            probs = probabilities(model, images[idx.to(device)], network)
            keys = batch["audit_key"] if "audit_key" in batch else batch.get("index")
            if keys is None:
                raise KeyError("audit: a loader's batches need an 'index' (sample number) to key the table")
            keys = torch.as_tensor(keys)[idx]
            ids = batch.get("id")
            ids = [str(ids[i]) for i in idx.tolist()] if ids is not None else None
            cols = {}
            if "index" in batch:
                cols["index"] = torch.as_tensor(batch["index"])[idx].tolist()
            if extra is not None:
                cols.update({k: [v[i] for i in idx.tolist()] for k, v in extra(batch).items()})
            scorer.update(probs, labels[idx].to(probs.device), keys, ids, images=images[idx.to(device)].cpu()
                          if scorer.num_worst else None, extra=cols)
    finally:
        model.train(was_training)


def audit(model: torch.nn.Module, data, *, label_key: str = "noisy_mask", method: str = DEFAULT_METHOD,
          network: str = "module", batch_size: int = 16, device: torch.device | str | None = None,
          num_worst: int = 16, issue_map_dir: str | Path | None = None, temperature: float = 0.1,
          scorer: LabelQualityScorer | None = None, num_workers: int = 0,
          extra: Callable[[dict], dict] | None = None) -> AuditResult:
    """Score the ``label_key`` label maps of ``data`` with ``model``'s probabilities, streamed batch by batch.

    Args:
        model: a :class:`~lightning_weakseg.WeakSegModule` (or any network returning logits); used in eval mode on
            its own device (``device`` overrides).
        data: a map-style ``Dataset`` (under ``torch.distributed`` each rank scores every world-size-th sample) or
            a ``DataLoader`` whose batches carry ``index`` (already sharded by whoever built it; filler samples
            flagged ``pad`` are skipped, repeated ones dropped by key).
        label_key: the dense label to audit (``mask``, ``noisy_mask``, ``pseudo`` ...); samples without it
            (``has_<key>`` False) are skipped.
        network: ``"module"``, ``"model"`` or ``"peer"`` (:func:`probabilities`). For the peer of a co-teaching
            pair the scores are out-of-selection, not out-of-sample (module docstring).
        extra: ``batch → {column: per-sample values}`` added to each row.

    Returns:
        :class:`AuditResult`, the same on every rank.
    """
    if device is None:
        device = next(model.parameters()).device
    if scorer is None:
        scorer = LabelQualityScorer(method, temperature=temperature, num_worst=num_worst,
                                    issue_map_dir=issue_map_dir)
    loader = data if isinstance(data, torch.utils.data.DataLoader) else \
        _shard_loader(data, range(len(data)), batch_size, num_workers)
    _score_loader(model.to(device), loader, scorer, label_key, network, device, extra)
    return scorer.compute()


def kfold_indices(n: int, folds: int, seed: int = 0) -> list[list[int]]:
    """``folds`` disjoint held-out position lists covering 0..n−1 (a seeded permutation dealt round-robin)."""
    if not 2 <= folds <= n:
        raise ValueError(f"folds: expected 2 <= folds <= {n} (the number of samples), got {folds}")
    perm = np.random.default_rng(seed).permutation(n).tolist()
    return [sorted(perm[f::folds]) for f in range(folds)]


def _eval_view(dataset):
    """The data set without augmentation, when it can say so (the library's data sets); else itself."""
    if hasattr(dataset, "subset") and hasattr(dataset, "indices") and hasattr(dataset, "augment"):
        return dataset.subset(dataset.indices if dataset.indices is not None else range(len(dataset)),
                              augment="none")
    return dataset


def cross_val_audit(make_model: Callable[[], torch.nn.Module], make_trainer: Callable[[], Any], dataset, *,
                    folds: int = 5, label_key: str = "noisy_mask", method: str = DEFAULT_METHOD, seed: int = 0,
                    batch_size: int = 16, eval_batch_size: int | None = None, network: str = "module",
                    num_worst: int = 16, issue_map_dir: str | Path | None = None, temperature: float = 0.1,
                    eval_dataset=None, num_workers: int = 0, extra: Callable[[dict], dict] | None = None,
                    on_fold_end: Callable[[int, torch.nn.Module], None] | None = None) -> AuditResult:
    """Out-of-sample audit by k-fold cross-validation: the training set is split into ``folds`` folds
    (:func:`kfold_indices`); for each fold a fresh ``make_model()`` is trained with ``make_trainer().fit`` on the
    other folds (the normal fit path: the module's loss terms, its callbacks, any strategy the trainer has), then
    the held-out fold is scored and streamed into one :class:`LabelQualityScorer`. Every image is scored by a
    model that never saw it (Lad & Mueller 2023 use out-of-sample probabilities the same way).

    Args:
        dataset: the training samples (with their augmentation); the held-out folds are scored on
            ``eval_dataset`` (default: ``dataset`` without augmentation when it is one of the library's data sets).
            Keys of the table are positions in ``dataset``.
        on_fold_end: called with ``(fold, trained model)``.
    """
    from .data.batch import collate

    eval_dataset = _eval_view(dataset) if eval_dataset is None else eval_dataset
    if len(eval_dataset) != len(dataset):
        raise ValueError(f"eval_dataset: expected {len(dataset)} samples like dataset, got {len(eval_dataset)}")
    scorer = LabelQualityScorer(method, temperature=temperature, num_worst=num_worst, issue_map_dir=issue_map_dir)
    held = kfold_indices(len(dataset), folds, seed)
    for f, held_out in enumerate(held):
        train_pos = sorted(set(range(len(dataset))) - set(held_out))
        loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, train_pos), batch_size=batch_size,
                                             shuffle=True, collate_fn=collate, num_workers=num_workers,
                                             generator=torch.Generator().manual_seed(seed + f))
        model = make_model()
        trainer = make_trainer()
        trainer.fit(model, train_dataloaders=loader)
        device = trainer.strategy.root_device if hasattr(trainer, "strategy") else next(model.parameters()).device
        _score_loader(model.to(device), _shard_loader(eval_dataset, held_out, eval_batch_size or 2 * batch_size,
                                                      num_workers),
                      scorer, label_key, network, device, extra)
        if on_fold_end is not None:
            on_fold_end(f, model)
    return scorer.compute()
