"""Point supervision (Qu et al., MIDL 2019 / IEEE TMI 2020): one click per nucleus.

Terms (all over the samples that carry ``points``):

* ``point/voronoi`` — cross-entropy with ignore against the Voronoi label (edges → background, a disk around
  each point → the point's class). It depends only on point geometry, so it is computed *inside the step* from
  the batch's (augmented) points with batched tensor code: exact under any geometric augmentation.
* ``point/cluster`` — cross-entropy with ignore against ``batch["pseudo"]``. At fit start the mixin fills the
  data set's pseudo labels with the cluster labels of Qu et al. (k-means on colour and distance, computed once
  on the un-augmented base view, see :func:`~lightning_weakseg.pseudo.cluster_labels`); the data set augments
  them with the image. When a :class:`~lightning_weakseg.callbacks.PseudoLabelRefresh` runs, its self-training
  labels (:meth:`PointVoronoiMixin.point_pseudo_labels`, the ``"points"`` pseudo-label rule) replace them.
* ``point/crf`` — gated CRF loss (Obukhov et al. 2019) on the predicted probabilities, from
  ``point_crf_start_epoch`` on (the paper fine-tunes with a CRF loss after the CE stage).

Partial points (only some nuclei clicked): set ``point_bg_weight`` < 1 (background labels are less reliable:
Voronoi edges may cross unclicked nuclei) and ``point_cluster_kwargs={"partial": True}``.
"""
from __future__ import annotations

import numpy as np
import torch

from ..data.batch import IGNORE_INDEX, content_mask
from ..losses.crf import gated_crf_loss
from ..losses.partial import masked_cross_entropy
from ..module import WeakSegModule
from ._pseudo import PseudoLabelMixin, PseudoLabelRule

__all__ = ["PointVoronoiMixin", "PointSegModule", "voronoi_labels_torch"]


def voronoi_labels_torch(points: list[torch.Tensor], shape: tuple[int, int], point_radius: float = 2.0,
                         device=None) -> torch.Tensor:
    """Batched Voronoi labels, the same rule as :func:`lightning_weakseg.pseudo.voronoi_labels`.

    Args:
        points: B tensors (M_i, 3) ``[class, y, x]`` (the batch's ``points``).
        shape: (H, W).
    Returns:
        long (B, H, W): 0 on Voronoi edges, the point's class within ``point_radius`` of a point, else 255.
    """
    h, w = shape
    b = len(points)
    device = device if device is not None else (points[0].device if b else "cpu")
    out = torch.full((b, h, w), IGNORE_INDEX, dtype=torch.long, device=device)
    m = max((len(p) for p in points), default=0)
    if m == 0:
        return out
    far = float(4 * (h + w) + 10)  # padding points never win the argmin
    pts = torch.full((b, m, 2), far, dtype=torch.float32, device=device)
    cls = torch.zeros((b, m), dtype=torch.long, device=device)
    count = torch.zeros(b, dtype=torch.long, device=device)
    for i, p in enumerate(points):  # ragged → padded; O(B) tensor copies
        p = p.to(device)
        pts[i, :len(p)] = p[:, 1:3].round().float()
        cls[i, :len(p)] = p[:, 0].round().long()
        count[i] = len(p)
    ys = torch.arange(h, device=device, dtype=torch.float32)
    xs = torch.arange(w, device=device, dtype=torch.float32)
    # squared distances are separable: one (B, H, W, M) tensor (the sum), not a (B, HW, M, 2) difference
    dy2 = (ys[None, :, None] - pts[:, None, :, 0]).square_()            # (B, H, M)
    dx2 = (xs[None, :, None] - pts[:, None, :, 1]).square_()            # (B, W, M)
    dmin, owner = (dy2[:, :, None, :] + dx2[:, None, :, :]).min(-1)     # (B, H, W): first nearest point wins
    yy, xx = torch.meshgrid(ys, xs, indexing="ij")
    has = (count > 0)[:, None, None]
    lab = torch.where(has & (dmin <= point_radius ** 2), cls.gather(1, owner.flatten(1)).view(b, h, w), out)
    edge = torch.zeros((b, h, w), dtype=torch.bool, device=device)
    pos = torch.stack([yy, xx], 0)  # (2, H, W)
    for dy, dx in ((0, 1), (1, 0)):
        op, oq = owner[:, :h - dy, :w - dx], owner[:, dy:, dx:]
        diff = op != oq
        pa = torch.stack([pts[..., 0].gather(1, op.flatten(1)), pts[..., 1].gather(1, op.flatten(1))], 1)
        pb = torch.stack([pts[..., 0].gather(1, oq.flatten(1)), pts[..., 1].gather(1, oq.flatten(1))], 1)
        pa, pb = pa.view(b, 2, h - dy, w - dx), pb.view(b, 2, h - dy, w - dx)
        xp = pos[:, :h - dy, :w - dx][None]
        xq = pos[:, dy:, dx:][None]
        ab = (pa - pb).pow(2).sum(1).sqrt().clamp_min(1e-12)
        dp = ((xp - pb).pow(2).sum(1) - (xp - pa).pow(2).sum(1)) / (2 * ab)
        dq = ((xq - pa).pow(2).sum(1) - (xq - pb).pow(2).sum(1)) / (2 * ab)
        edge[:, :h - dy, :w - dx] |= diff & (dp <= dq + 1e-6)
        edge[:, dy:, dx:] |= diff & (dq <= dp + 1e-6)
    lab = torch.where(edge, torch.zeros_like(lab), lab)
    # the clicked pixel itself is always its class
    bi = torch.arange(b, device=device)[:, None].expand(b, m)
    real = torch.arange(m, device=device)[None] < count[:, None]
    py, px = pts[..., 0].long().clamp(0, h - 1), pts[..., 1].long().clamp(0, w - 1)
    lab[bi[real], py[real], px[real]] = cls[real]
    return lab


def _data_label_keys(dm) -> set[str] | None:
    """Label keys a WeakSegDataModule's training split carries (``None`` when it cannot be told)."""
    hp = getattr(dm, "hparams", None)
    if hp is None:
        return None
    fractions = hp.get("label_fractions")
    if fractions:
        return {k for name in fractions for k in str(name).split("+")}
    labels = hp.get("train_labels")
    return None if labels is None else set(labels)


class PointVoronoiMixin(PseudoLabelMixin):
    """Point regime of Qu et al.: Voronoi + cluster labels with CE, then a CRF loss. See the module docstring.

    Args:
        point_radius: radius of the Voronoi label's nucleus disk (paper: 2 px at 40×).
        point_bg_weight: weight of background pixels in both CE terms (< 1 for partial points).
        point_cluster_kwargs: options of :func:`~lightning_weakseg.pseudo.cluster_labels` (e.g. ``scale``).
        point_precompute: compute the cluster labels at fit start for the training samples that carry points and
            have no pseudo label yet (labels already there, e.g. restored by a PseudoLabelRefresh on resume, are
            kept). A data module whose training labels do not include points gets no pass over its data.
        point_crf_kernel_radius, point_crf_sigma_xy, point_crf_sigma_rgb, point_crf_downscale: gated CRF loss.
        point_crf_start_epoch: first epoch with the ``point/crf`` term.
        point_refine: ``"crf"`` (dense CRF on the prediction) or ``"none"`` for :meth:`point_pseudo_labels`.
        point_refine_kwargs: options of :func:`~lightning_weakseg.pseudo.dense_crf`.
        point_confidence: self-training pixels whose refined probability is below this become unknown.
    """

    default_loss_weights = {"point/voronoi": 1.0, "point/cluster": 1.0, "point/crf": 0.1}
    pseudo_label_rule = PseudoLabelRule("points", key="points", make="point_pseudo_labels", priority=10)

    def __init__(self, *, point_radius: float = 2.0, point_bg_weight: float = 1.0,
                 point_cluster_kwargs: dict | None = None, point_precompute: bool = True,
                 point_crf_kernel_radius: int = 5, point_crf_sigma_xy: float = 6.0, point_crf_sigma_rgb: float = 0.1,
                 point_crf_downscale: int = 1, point_crf_start_epoch: int = 0, point_refine: str = "crf",
                 point_refine_kwargs: dict | None = None, point_confidence: float = 0.7, **kwargs):
        super().__init__(**kwargs)
        if point_refine not in ("crf", "none"):
            raise ValueError(f"point_refine must be 'crf' or 'none', got {point_refine!r}")
        if not 0 < point_bg_weight:
            raise ValueError(f"point_bg_weight must be > 0, got {point_bg_weight}")
        self.point_radius, self.point_bg_weight = float(point_radius), float(point_bg_weight)
        self.point_cluster_kwargs = dict(point_cluster_kwargs or {})
        self.point_precompute = point_precompute
        self.point_crf = dict(kernel_radius=point_crf_kernel_radius, sigma_xy=point_crf_sigma_xy,
                              sigma_rgb=point_crf_sigma_rgb, downscale=point_crf_downscale)
        self.point_crf_start_epoch = int(point_crf_start_epoch)
        self.point_refine, self.point_refine_kwargs = point_refine, dict(point_refine_kwargs or {})
        self.point_confidence = float(point_confidence)

    # ------------------------------------------------------------------ terms
    def _class_weight(self, logits):
        if self.point_bg_weight == 1.0:
            return None
        w = torch.ones(logits.shape[1], dtype=logits.dtype, device=logits.device)
        w[0] = self.point_bg_weight
        return w

    def loss_terms(self, batch, out):
        terms = super().loss_terms(batch, out)
        if "points" not in batch or not batch["has_points"].any():
            return terms
        has = batch["has_points"]
        logits = out["logits"]
        weight = self._class_weight(logits)
        vor = voronoi_labels_torch(batch["points"], tuple(logits.shape[-2:]), self.point_radius, logits.device)
        valid = content_mask(batch)
        if valid is not None:  # padding of a letterboxed image carries no label
            valid = valid.to(logits.device)
            vor = torch.where(valid, vor, torch.full_like(vor, IGNORE_INDEX))
        terms["point/voronoi"] = self.batch_mean(
            masked_cross_entropy(logits, vor, IGNORE_INDEX, weight=weight, reduction="none"), has)
        if "pseudo" in batch and batch["has_pseudo"].any():
            cluster = masked_cross_entropy(logits, batch["pseudo"], IGNORE_INDEX, weight=weight, reduction="none")
            terms["point/cluster"] = self.batch_mean(cluster, batch["has_pseudo"] & has)
        if self.current_epoch >= self.point_crf_start_epoch:
            crf = gated_crf_loss(out["probs"], batch["image"], reduction="none", valid=valid, **self.point_crf)
            terms["point/crf"] = self.batch_mean(crf, has)
        return terms

    # ------------------------------------------------------------------ offline labels
    @staticmethod
    def _uint8_image(image: torch.Tensor) -> np.ndarray:
        img = (image.detach().float().clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()
        return img[..., 0] if img.shape[2] == 1 else img

    def cluster_label_maps(self, loader, only: set[int] | None = None) -> dict[int, np.ndarray]:
        """Cluster labels (uint8, base view) by raw index for every sample with points in ``loader`` (restricted to
        the raw indices in ``only`` when given); with more than two classes a nucleus pixel takes the class of its
        Voronoi cell's point."""
        from ..pseudo.points import cluster_labels, voronoi_cells

        labels = {}
        for batch in loader:
            if "points" not in batch:
                continue
            for i in range(batch["image"].shape[0]):
                if not bool(batch["has_points"][i]):
                    continue
                if only is not None and int(batch["index"][i]) not in only:
                    continue
                img = self._uint8_image(batch["image"][i])
                p = batch["points"][i].cpu().numpy()
                lab = cluster_labels(img, p[:, 1:3], **self.point_cluster_kwargs)
                if len(p) and self.hparams.num_classes > 2:
                    cells, _ = voronoi_cells(p[:, 1:3], img.shape[:2])
                    cls = np.rint(p[:, 0]).astype(np.uint8)
                    lab = np.where(lab == 1, cls[cells], lab).astype(np.uint8)
                labels[int(batch["index"][i])] = lab
        return labels

    def on_fit_start(self):
        super().on_fit_start()
        dm = getattr(self.trainer, "datamodule", None)
        ds = getattr(dm, "train_dataset", None)
        if not self.point_precompute or ds is None or not hasattr(dm, "train_eval_dataloader"):
            return
        keys = _data_label_keys(dm)
        if keys is not None and "points" not in keys:
            return  # no training sample carries points: no pass over the training set
        # only samples that carry points get cluster labels; in a mixed data set the others never have one, so
        # "every sample has a label" would never hold and a resume would overwrite restored self-training labels
        keys_for = getattr(ds, "keys_for", None)
        raw = [int(ds.raw_index(i)) for i in range(len(ds))]
        wanted = {r for r in raw if keys_for is None or "points" in keys_for(r)}
        missing = wanted - set(ds.pseudo_labels)
        if not missing:
            return  # restored (resume, PseudoLabelRefresh) or provided by the user
        labels = dict(ds.pseudo_labels)  # existing labels win: fill in only the missing ones
        for k, v in self.cluster_label_maps(dm.train_eval_dataloader(), only=missing).items():
            labels.setdefault(k, v)
        ds.set_pseudo_labels(labels)

    def point_pseudo_labels(self, batch) -> torch.Tensor:
        """The ``"points"`` pseudo-label rule: the prediction refined by a dense CRF, unknown where not confident,
        then constrained by the Voronoi label (edges → background, point disks → their class). long (B, H, W)."""
        from ..pseudo.dense_crf import dense_crf

        image = batch["image"].to(self.device)
        with torch.no_grad():
            probs = self(image)["probs"].float()
        if self.point_refine == "crf":
            probs = torch.stack([torch.from_numpy(dense_crf(self._uint8_image(image[i]), probs[i].cpu().numpy(),
                                                            **self.point_refine_kwargs))
                                 for i in range(image.shape[0])]).to(probs.device)
        conf, lab = probs.max(1)
        lab = torch.where(conf >= self.point_confidence, lab, torch.full_like(lab, IGNORE_INDEX))
        if "points" in batch:
            vor = voronoi_labels_torch(batch["points"], tuple(lab.shape[-2:]), self.point_radius, lab.device)
            has = batch["has_points"].to(lab.device)[:, None, None]
            lab = torch.where(has & (vor != IGNORE_INDEX), vor, lab)
        return lab.long()


class PointSegModule(PointVoronoiMixin, WeakSegModule):
    """Ready-made point-supervised module (for LightningCLI configs)."""
