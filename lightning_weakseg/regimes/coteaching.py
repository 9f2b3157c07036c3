"""Noisy masks: co-teaching (Han et al., NeurIPS 2018) for segmentation, co-teaching+ (Yu et al., ICML 2019) as an
experimental option.

Two networks see the same batch. Each ranks its own per-image (or per-pixel) loss on the noisy mask, keeps the
fraction R(T) with the smallest loss, and its PEER is trained on that selection. The selection is global over DDP
ranks (:func:`lightning_weakseg.losses.small_loss_selection`): two processes select what one process selects on
the concatenated batch.

Optimisation: the peer (:class:`~lightning_weakseg.regimes._peer.PeerNetworkMixin`, shared with cross pseudo
supervision) is a registered submodule (``self.peer_model``), so the base module's single AdamW covers
both networks under automatic optimisation. The two terms touch disjoint parameters and AdamW is
per-parameter, so this equals two optimisers with the same settings (one exception: gradient clipping by
global norm would see both networks together).
"""
from __future__ import annotations

from typing import Any

import torch

from ..losses.coteaching import (EXPERIMENTAL_SELECTION, coteaching_keep_ratio, coteaching_losses,
                                 experimental_options, peer_relabel_losses)
from ..module import WeakSegModule
from ._peer import PeerNetworkMixin

__all__ = ["CoTeachingMixin", "CoTeachingSegModule", "EXPERIMENTAL_COTEACHING"]


def _is_epoch(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


# the selection's options (losses.coteaching.EXPERIMENTAL_SELECTION) and the mixin's own; not recommended
EXPERIMENTAL_COTEACHING = {
    **EXPERIMENTAL_SELECTION,
    # co-teaching+ from this epoch on (plain co-teaching before, as in the authors' code)
    "plus_start_epoch": (0, _is_epoch, "an epoch >= 0"),
    # add noisy/relabel_a|b: each network learns its peer's arg-max where the peer's selection rejected the label
    "relabel_rejected": (False, lambda v: isinstance(v, bool), "a bool"),
    # from this epoch (None: num_gradual, when the forget rate reaches τ)
    "relabel_start_epoch": (None, lambda v: v is None or _is_epoch(v), "None or an epoch >= 0"),
    # "foreground": relabel only where the peer predicts a class >= 1
    "relabel_to": ("any", lambda v: v in ("any", "foreground"), "'any' or 'foreground'"),
}


class CoTeachingMixin(PeerNetworkMixin):
    """Co-teaching on ``batch[noisy_key]`` with a peer network; adds ``noisy/coteach_a`` and ``noisy/coteach_b``,
    which replace the base ``seg/ce`` term (``replaces_base_term``).

    Args:
        noisy_key: the dense noisy label map (255 = ignore) the two networks learn from.
        forget_rate: τ, the fraction finally dropped: the share of wrong masks for ``selection="sample"``; for
            ``"pixel"`` the fraction of wrong labels, also a list of ``num_classes`` rates, one per noisy-label
            class (``benchmarks/noise_stats.py`` measures them for the simulator).
        num_gradual: T_k, epochs over which the forget rate ramps up; exponent: c.
            R(T) = 1 − min(T^c / T_k · τ, τ) with T the 0-based epoch. A
            :class:`~lightning_weakseg.callbacks.ForgetRateSchedule` callback, when present, sets
            ``self.keep_ratio`` each epoch instead (and checkpoints the schedule).
        selection: ``"sample"`` (default: images ranked by each network's soft Dice loss against the noisy mask,
            the kept ones train on CE — for data where some masks are wrong and the others right) or ``"pixel"``
            (pixels ranked by CE, R of each noisy-label class kept — for masks that are all wrong along their
            borders); see :func:`~lightning_weakseg.losses.coteaching_losses`.
        inference: ``"average"`` (mean of the two softmaxes), ``"a"`` (the main model) or ``"b"`` (the peer);
            used by validation, test and predict through ``out["logits"]``/``out["probs"]``.
        peer_arch, peer_encoder, peer_model_kwargs: the peer's SMP architecture (default: the same as the
            main model), built with ``smp.create_model`` and its own random initialisation.
        selection_method: ``"radix"`` or ``"gather"`` for the DDP threshold (same result).
        experimental: variants that are **not recommended** (each lost to the defaults or collapsed in the
            benchmarks, docs/regimes/noisy.md), kept to reproduce them; names and values are checked against
            :data:`EXPERIMENTAL_COTEACHING`: ``sample_rank="ce"`` (the paper's ranking by mean CE),
            ``class_balanced=False`` (one pixel ranking over all classes), ``coteach_plus=True`` with
            ``plus_start_epoch`` and ``plus_min_disagreement`` (co-teaching+; a class — or the batch, per sample
            — with fewer disagreement items than that fraction of its labelled ones uses plain co-teaching),
            ``relabel_rejected=True`` with ``relabel_start_epoch`` and ``relabel_to`` (``noisy/relabel_a|b``,
            :func:`~lightning_weakseg.losses.peer_relabel_losses`; with sample selection every labelled pixel of a
            rejected image is relabelled).
    """

    default_loss_weights = {"noisy/coteach_a": 1.0, "noisy/coteach_b": 1.0, "noisy/relabel_a": 1.0,
                            "noisy/relabel_b": 1.0}
    replaces_base_term = True  # the two co-teaching terms replace plain CE on the base label map
    peer_average_in_training = True  # trains on logits_a / logits_b; out["logits"] is the average, as in eval
    peer_regime_name = "co-teaching"

    def __init__(self, *, noisy_key: str = "noisy_mask", forget_rate: float | list[float] = 0.3,
                 num_gradual: int = 10, exponent: float = 1.0, selection: str = "sample", inference: str = "average",
                 peer_arch: str | None = None, peer_encoder: str | None = None,
                 peer_model_kwargs: dict[str, Any] | None = None, selection_method: str = "radix",
                 experimental: dict[str, Any] | None = None, **kwargs):
        if selection not in ("pixel", "sample"):
            raise ValueError(f"selection: expected 'pixel' or 'sample', got {selection!r}")
        if inference not in ("average", "a", "b"):
            raise ValueError(f"inference: expected 'average', 'a' or 'b', got {inference!r}")
        if selection_method not in ("radix", "gather"):
            raise ValueError(f"selection_method: expected 'radix' or 'gather', got {selection_method!r}")
        options = experimental_options(experimental, EXPERIMENTAL_COTEACHING, "CoTeachingMixin")
        coteaching_keep_ratio(0, forget_rate, num_gradual, exponent)  # validates the schedule
        per_class = isinstance(forget_rate, (list, tuple))
        if per_class and (selection != "pixel" or not options["class_balanced"]):
            raise ValueError(f"forget_rate: one rate per class ({list(forget_rate)}) needs class-balanced pixel "
                             "selection (selection='pixel')")
        super().__init__(inference=inference, peer_arch=peer_arch, peer_encoder=peer_encoder,
                         peer_model_kwargs=peer_model_kwargs, **kwargs)
        h = self.hparams
        if per_class and len(forget_rate) != h.num_classes:
            raise ValueError(f"forget_rate: expected one rate per class (num_classes={h.num_classes}), got "
                             f"{len(forget_rate)}: {list(forget_rate)}")
        self._experimental = options
        # set by ForgetRateSchedule (a float, or a tuple per class); None = the mixin's own schedule
        self.keep_ratio: float | tuple[float, ...] | None = None

    # ------------------------------------------------------------------ schedule
    def current_keep_ratio(self) -> float | tuple[float, ...]:
        if self.keep_ratio is not None:
            r = self.keep_ratio
            return tuple(float(v) for v in r) if isinstance(r, (list, tuple)) else float(r)
        h = self.hparams
        return coteaching_keep_ratio(self.current_epoch, h.forget_rate, h.num_gradual, h.exponent)

    # ------------------------------------------------------------------ loss terms
    def loss_terms(self, batch: dict, out: dict) -> dict[str, torch.Tensor]:
        terms = super().loss_terms(batch, out)
        noisy = self._noisy_target(batch, out["logits_a"])
        if noisy is None:
            return terms
        target, has = noisy
        h, opts = self.hparams, self._experimental
        plus = opts["coteach_plus"] and self.current_epoch >= opts["plus_start_epoch"]
        res = coteaching_losses(out["logits_a"], out["logits_b"], target, has, self.current_keep_ratio(),
                                selection=h.selection, ignore_index=self.ignore_index, method=h.selection_method,
                                experimental=self._selection_options(plus))
        terms["noisy/coteach_a"], terms["noisy/coteach_b"] = res["loss_a"], res["loss_b"]
        start = h.num_gradual if opts["relabel_start_epoch"] is None else opts["relabel_start_epoch"]
        if opts["relabel_rejected"] and self.current_epoch >= start:
            terms["noisy/relabel_a"], terms["noisy/relabel_b"] = self._relabel_losses(out, target, has, res)
        if self._trainer is not None:
            self._log_selection(res, target, has, plus)
        return terms

    def _noisy_target(self, batch: dict, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The noisy mask and its flags; under DDP a rank without any noisy mask still joins the selection's
        collectives with an all-ignore target. None: nothing to select."""
        key = self.hparams.noisy_key
        present = key in batch and bool(batch[f"has_{key}"].any())
        if not present and not (self._trainer is not None and self._trainer.world_size > 1):
            return None
        if key in batch:
            return batch[key], batch[f"has_{key}"]
        b, _, hh, ww = logits.shape
        return (torch.full((b, hh, ww), self.ignore_index, dtype=torch.long, device=logits.device),
                torch.zeros(b, dtype=torch.bool, device=logits.device))

    def _selection_options(self, plus: bool) -> dict[str, Any] | None:
        """The experimental options :func:`coteaching_losses` reads, only those off their defaults."""
        opts = {**{k: self._experimental[k] for k in EXPERIMENTAL_SELECTION}, "coteach_plus": plus}
        changed = {k: v for k, v in opts.items() if v != EXPERIMENTAL_SELECTION[k][0]}
        if not plus:
            changed.pop("plus_min_disagreement", None)
        return changed or None

    def _relabel_losses(self, out: dict, target: torch.Tensor, has: torch.Tensor, res: dict):
        labelled = (target != self.ignore_index) & has.view(-1, 1, 1)
        sel_a, sel_b = res["select_a"], res["select_b"]
        if self.hparams.selection == "sample":  # an image's selection covers its labelled pixels
            sel_a, sel_b = labelled & sel_a.view(-1, 1, 1), labelled & sel_b.view(-1, 1, 1)
        return peer_relabel_losses(out["logits_a"], out["logits_b"], sel_a, sel_b, labelled,
                                   relabel_to=self._experimental["relabel_to"])

    def _log_selection(self, res: dict, target: torch.Tensor, has: torch.Tensor, plus: bool) -> None:
        bs = target.shape[0]
        cand = res["candidates"].sum().clamp_min(1)
        self.log("train/coteach_kept", res["select_a"].sum() / cand, on_step=False, on_epoch=True, batch_size=bs)
        if plus:
            labelled = (target != self.ignore_index) & has.view(-1, 1, 1)
            frac = res["candidates"].float().mean() if self.hparams.selection == "sample" else \
                res["candidates"].sum() / labelled.sum().clamp_min(1)
            self.log("train/coteach_disagreement", frac, on_step=False, on_epoch=True, batch_size=bs)


class CoTeachingSegModule(CoTeachingMixin, WeakSegModule):
    """Ready-made co-teaching module for LightningCLI configs (``configs/noisy.yaml``)."""
