"""Noisy masks: co-teaching (Han et al., NeurIPS 2018) and co-teaching+ (Yu et al., ICML 2019) for segmentation.

Two networks see the same batch. Each ranks its own per-pixel (or per-image) cross-entropy on the noisy mask,
keeps the fraction R(T) with the smallest loss, and its PEER is trained on that selection. The selection is
global over DDP ranks (:func:`lightning_weakseg.losses.small_loss_selection`): two processes select what one
process selects on the concatenated batch.

Optimisation: the peer is a registered submodule (``self.peer_model``), so the base module's single AdamW covers
both networks under automatic optimisation. The two terms touch disjoint parameters and AdamW is
per-parameter, so this equals two optimisers with the same settings (one exception: gradient clipping by
global norm would see both networks together).
"""
from __future__ import annotations

from typing import Any

import segmentation_models_pytorch as smp
import torch

from ..losses.coteaching import coteaching_keep_ratio, coteaching_losses, peer_relabel_losses
from ..module import WeakSegModule
from ..nn import replace_batchnorm

__all__ = ["CoTeachingMixin", "CoTeachingSegModule"]


class CoTeachingMixin:
    """Co-teaching on ``batch[noisy_key]`` with a peer network; adds ``noisy/coteach_a`` and ``noisy/coteach_b``.

    Args:
        noisy_key: the dense noisy label map (255 = ignore) the two networks learn from.
        forget_rate: τ, the fraction finally dropped (≈ the noise rate); with ``class_balanced`` also a list of
            ``num_classes`` rates, one per noisy-label class (≈ the fraction of wrong labels among the pixels
            labelled c; ``benchmarks/noise_stats.py`` prints it for the simulator).
        num_gradual: T_k, epochs over which the forget rate ramps up; exponent: c.
            R(T) = 1 − min(T^c / T_k · τ, τ) with T the 0-based epoch. A
            :class:`~lightning_weakseg.callbacks.ForgetRateSchedule` callback, when present, sets
            ``self.keep_ratio`` each epoch instead (and checkpoints the schedule).
        selection: ``"pixel"`` (rank pixels) or ``"sample"`` (rank images by their mean CE).
        sample_rank: sample selection only: rank the images by ``"ce"`` (their mean CE, the paper's rule) or
            ``"dice"`` (each network's per-image soft Dice loss against the noisy mask; the selected images
            still train on CE). Mean CE favours masks with little foreground, also those that lost their
            object, and drifts to all-background; see :func:`~lightning_weakseg.losses.coteaching_losses`.
        coteach_plus: co-teaching+: only pixels where the networks' argmax disagree are candidates,
            from epoch ``plus_start_epoch`` on (plain co-teaching before, as in the authors' code).
        plus_min_disagreement: co-teaching+ only: a class (with ``class_balanced``; else all pixels) whose
            disagreement pixels are fewer than this fraction of its labelled pixels uses plain co-teaching in
            that step (0 = the paper's rule, which collapses to all-background on polyps; see
            :func:`~lightning_weakseg.losses.coteaching_losses`).
        inference: ``"average"`` (mean of the two softmaxes), ``"a"`` (the main model) or ``"b"`` (the peer);
            used by validation, test and predict through ``out["logits"]``/``out["probs"]``.
        peer_arch, peer_encoder, peer_model_kwargs: the peer's SMP architecture (default: the same as the
            main model), built with ``smp.create_model`` and its own random initialisation.
        selection_method: ``"radix"`` or ``"gather"`` for the DDP threshold (same result).
        class_balanced: keep R(T) of the candidate pixels of each noisy-label class rather than of all pixels
            (pixel selection only): the plain rule drops the minority foreground first (see
            :func:`~lightning_weakseg.losses.coteaching_losses`).
        relabel_rejected: add ``noisy/relabel_a|b`` — each network learns its peer's arg-max on the labelled
            pixels the peer's selection rejected (:func:`~lightning_weakseg.losses.peer_relabel_losses`), from
            epoch ``relabel_start_epoch`` (``None``: ``num_gradual``, when the forget rate has reached τ). With
            sample selection the rejected images' pixels are relabelled: the peer's prediction replaces a mask
            the peer judged wrong, so the images of the dropped masks still train (self-training by the
            peer; with half of the masks corrupted it lost 5.6-10 Dice points to plain sample selection,
            docs/regimes/noisy.md).
        relabel_to: ``"any"`` (the peer's arg-max whatever its class) or ``"foreground"`` (only where the peer
            predicts a class ≥ 1: recovers objects the noisy mask lost, cannot teach a class away).
    """

    default_loss_weights = {"noisy/coteach_a": 1.0, "noisy/coteach_b": 1.0, "noisy/relabel_a": 1.0,
                            "noisy/relabel_b": 1.0}

    def __init__(self, *, noisy_key: str = "noisy_mask", forget_rate: float | list[float] = 0.3,
                 num_gradual: int = 10,
                 exponent: float = 1.0, selection: str = "pixel", coteach_plus: bool = False,
                 plus_start_epoch: int = 0, plus_min_disagreement: float = 0.1, inference: str = "average",
                 peer_arch: str | None = None,
                 peer_encoder: str | None = None, peer_model_kwargs: dict[str, Any] | None = None,
                 selection_method: str = "radix", class_balanced: bool = False, relabel_rejected: bool = False,
                 relabel_start_epoch: int | None = None, relabel_to: str = "any", sample_rank: str = "ce",
                 **kwargs):
        if selection not in ("pixel", "sample"):
            raise ValueError(f"selection: expected 'pixel' or 'sample', got {selection!r}")
        if sample_rank not in ("ce", "dice"):
            raise ValueError(f"sample_rank: expected 'ce' or 'dice', got {sample_rank!r}")
        if sample_rank != "ce" and selection != "sample":
            raise ValueError("sample_rank='dice' needs selection='sample'")
        if inference not in ("average", "a", "b"):
            raise ValueError(f"inference: expected 'average', 'a' or 'b', got {inference!r}")
        if class_balanced and selection != "pixel":
            raise ValueError("class_balanced=True needs selection='pixel'")
        if relabel_to not in ("any", "foreground"):
            raise ValueError(f"relabel_to: expected 'any' or 'foreground', got {relabel_to!r}")
        if selection_method not in ("radix", "gather"):
            raise ValueError(f"selection_method: expected 'radix' or 'gather', got {selection_method!r}")
        if not 0.0 <= float(plus_min_disagreement) <= 1.0:
            raise ValueError(f"plus_min_disagreement: expected a fraction in [0, 1], got {plus_min_disagreement}")
        coteaching_keep_ratio(0, forget_rate, num_gradual, exponent)  # validates the schedule
        per_class = isinstance(forget_rate, (list, tuple))
        if per_class and not class_balanced:
            raise ValueError(f"forget_rate: one rate per class ({list(forget_rate)}) needs class_balanced=True")
        super().__init__(**kwargs)
        h = self.hparams
        if per_class and len(forget_rate) != h.num_classes:
            raise ValueError(f"forget_rate: expected one rate per class (num_classes={h.num_classes}), got "
                             f"{len(forget_rate)}: {list(forget_rate)}")
        model_kwargs = dict(h.model_kwargs or {}) if peer_model_kwargs is None else dict(peer_model_kwargs)
        if h.cls_head:
            model_kwargs.setdefault("aux_params", {"classes": h.num_classes, "dropout": 0.0})
        self.peer_model = smp.create_model(peer_arch or h.arch, encoder_name=peer_encoder or h.encoder,
                                           encoder_weights=h.encoder_weights, in_channels=h.in_channels,
                                           classes=h.num_classes, **model_kwargs)
        replace_batchnorm(self.peer_model, h.norm)
        # set by ForgetRateSchedule (a float, or a tuple per class); None = the mixin's own schedule
        self.keep_ratio: float | tuple[float, ...] | None = None

    # ------------------------------------------------------------------ schedule
    def current_keep_ratio(self) -> float | tuple[float, ...]:
        if self.keep_ratio is not None:
            r = self.keep_ratio
            return tuple(float(v) for v in r) if isinstance(r, (list, tuple)) else float(r)
        h = self.hparams
        return coteaching_keep_ratio(self.current_epoch, h.forget_rate, h.num_gradual, h.exponent)

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        out = super().forward(x)
        inference = self.hparams.inference
        if not self.training and inference == "a":
            return out
        y = self.peer_model(x)
        logits_b = y[0] if isinstance(y, (tuple, list)) else y
        out["logits_a"], out["logits_b"] = out["logits"], logits_b
        if inference == "b":
            out["logits"], out["probs"] = logits_b, logits_b.softmax(1)
            if isinstance(y, (tuple, list)):
                out["cls_logits"] = y[1]
        elif inference == "average":
            probs = 0.5 * (out["probs"] + logits_b.softmax(1))
            # log of the averaged probabilities: its softmax is the average, so argmax/CE stay consistent
            out["logits"], out["probs"] = probs.clamp_min(1e-12).log(), probs
        return out

    # ------------------------------------------------------------------ loss terms
    def loss_terms(self, batch: dict, out: dict) -> dict[str, torch.Tensor]:
        terms = super().loss_terms(batch, out)
        key = self.hparams.noisy_key
        present = key in batch and bool(batch[f"has_{key}"].any())
        distributed = self._trainer is not None and self._trainer.world_size > 1
        if not present and not distributed:
            return terms
        logits_a, logits_b = out["logits_a"], out["logits_b"]
        if key in batch:
            target, has = batch[key], batch[f"has_{key}"]
        else:  # under DDP every rank must join the selection's collectives, even without noisy masks
            b, _, hh, ww = logits_a.shape
            target = torch.full((b, hh, ww), self.ignore_index, dtype=torch.long, device=logits_a.device)
            has = torch.zeros(b, dtype=torch.bool, device=logits_a.device)
        h = self.hparams
        plus = bool(h.coteach_plus) and self.current_epoch >= h.plus_start_epoch
        ratio = self.current_keep_ratio()
        res = coteaching_losses(logits_a, logits_b, target, has, ratio, selection=h.selection,
                                disagreement=plus, ignore_index=self.ignore_index, method=h.selection_method,
                                balance=bool(h.get("class_balanced", False)),
                                min_disagreement=float(h.get("plus_min_disagreement", 0.0)) if plus else 0.0,
                                sample_rank=h.get("sample_rank", "ce"))
        terms["noisy/coteach_a"] = res["loss_a"]
        terms["noisy/coteach_b"] = res["loss_b"]
        if h.get("relabel_rejected", False):
            start = h.get("relabel_start_epoch")
            if self.current_epoch >= (h.num_gradual if start is None else start):
                labelled = (target != self.ignore_index) & has.view(-1, 1, 1)
                sel_a, sel_b = res["select_a"], res["select_b"]
                if h.selection == "sample":  # an image's selection covers its labelled pixels
                    sel_a, sel_b = labelled & sel_a.view(-1, 1, 1), labelled & sel_b.view(-1, 1, 1)
                terms["noisy/relabel_a"], terms["noisy/relabel_b"] = peer_relabel_losses(
                    logits_a, logits_b, sel_a, sel_b, labelled,
                    relabel_to=h.get("relabel_to", "any"))
        if self._trainer is not None:
            bs = logits_a.shape[0]
            cand = res["candidates"].sum().clamp_min(1)
            self.log("train/coteach_kept", res["select_a"].sum() / cand, on_step=False, on_epoch=True, batch_size=bs)
            if plus:
                labelled = (target != self.ignore_index) & has.view(-1, 1, 1)
                frac = res["candidates"].float().mean() if h.selection == "sample" else \
                    res["candidates"].sum() / labelled.sum().clamp_min(1)
                self.log("train/coteach_disagreement", frac, on_step=False, on_epoch=True, batch_size=bs)
        return terms


class CoTeachingSegModule(CoTeachingMixin, WeakSegModule):
    """Ready-made co-teaching module for LightningCLI configs (``configs/noisy.yaml``)."""
