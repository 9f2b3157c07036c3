"""The peer network of the two-network regimes: co-teaching (Han et al., NeurIPS 2018,
:mod:`~lightning_weakseg.regimes.coteaching`) and cross pseudo supervision (Chen et al., CVPR 2021,
:mod:`~lightning_weakseg.regimes.cps`).

:class:`PeerNetworkMixin` builds a second SMP network beside ``self.model`` (its own random initialisation, the
same architecture unless told otherwise, the same norm replacement), runs it in ``forward`` and decides which of
the two (or their average) is the module's prediction. The peer is a registered submodule (``self.peer_model``),
so the base module's single AdamW covers both networks and the checkpoint holds both.
"""
from __future__ import annotations

import warnings
from typing import Any

import segmentation_models_pytorch as smp
import torch

from ..nn import replace_batchnorm

__all__ = ["PeerNetworkMixin", "build_peer_network", "PEER_INFERENCE"]

PEER_INFERENCE = ("average", "a", "b")


def build_peer_network(hparams, arch: str | None = None, encoder: str | None = None,
                       model_kwargs: dict[str, Any] | None = None) -> torch.nn.Module:
    """A second SMP network like the module's (``hparams`` of :class:`~lightning_weakseg.WeakSegModule`):
    ``arch`` / ``encoder`` / ``model_kwargs`` default to the main network's; the classification head and the norm
    replacement follow the module's settings."""
    h = hparams
    kwargs = dict(h.model_kwargs or {}) if model_kwargs is None else dict(model_kwargs)
    if h.cls_head:
        kwargs.setdefault("aux_params", {"classes": h.num_classes, "dropout": 0.0})
    net = smp.create_model(arch or h.arch, encoder_name=encoder or h.encoder, encoder_weights=h.encoder_weights,
                           in_channels=h.in_channels, classes=h.num_classes, **kwargs)
    replace_batchnorm(net, h.norm)
    return net


class PeerNetworkMixin:
    """A peer network ``self.peer_model`` and the two networks' outputs in ``forward``.

    ``out["logits_a"]`` / ``out["logits_b"]`` are the main network's and the peer's logits whenever the peer ran.
    ``inference`` says what ``out["logits"]`` / ``out["probs"]`` hold outside training (validation, test,
    predict): ``"average"`` (the mean of the two softmaxes; its log as logits), ``"a"`` (the main network; the
    peer is not run) or ``"b"`` (the peer). In training they hold the average when the class sets
    ``peer_average_in_training = True`` (co-teaching, which trains on ``logits_a`` / ``logits_b`` only), else the
    main network's (cross pseudo supervision, whose main network also learns from the base terms).

    Args:
        inference: ``"average"``, ``"a"`` or ``"b"``.
        peer_arch, peer_encoder, peer_model_kwargs: the peer's SMP architecture (default: the main network's).
    """

    peer_average_in_training: bool = True
    peer_regime_name: str = "the two-network regime"

    def __init__(self, *, inference: str = "average", peer_arch: str | None = None, peer_encoder: str | None = None,
                 peer_model_kwargs: dict[str, Any] | None = None, **kwargs):
        if inference not in PEER_INFERENCE:
            raise ValueError(f"inference: expected 'average', 'a' or 'b', got {inference!r}")
        super().__init__(**kwargs)
        self.peer_model = build_peer_network(self.hparams, peer_arch, peer_encoder, peer_model_kwargs)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        out = super().forward(x)
        inference = self.hparams.inference
        if not self.training and inference == "a":
            return out
        y = self.peer_model(x)
        logits_b = y[0] if isinstance(y, (tuple, list)) else y
        out["logits_a"], out["logits_b"] = out["logits"], logits_b
        if self.training and not self.peer_average_in_training:
            return out
        if inference == "b":
            out["logits"], out["probs"] = logits_b, logits_b.softmax(1)
            if isinstance(y, (tuple, list)):
                out["cls_logits"] = y[1]
        elif inference == "average":
            probs = 0.5 * (out["probs"] + logits_b.softmax(1))
            # log of the averaged probabilities: its softmax is the average, so argmax/CE stay consistent
            out["logits"], out["probs"] = probs.clamp_min(1e-12).log(), probs
        return out

    def inference_network(self) -> torch.nn.Module:
        """The network ``save_pretrained`` writes: the main network for ``inference="a"``, the peer for ``"b"``.
        With ``"average"`` the module predicts with the mean of both softmaxes, which one plain SMP model cannot
        hold: the main network is written (a warning says so, and ``weakseg.json`` names it)."""
        if self.hparams.inference == "b":
            return self.peer_model
        if self.hparams.inference == "average":
            warnings.warn(f"{self.peer_regime_name} with inference='average' predicts with the mean of two networks; "
                          "save_pretrained writes the main network (inference='a') alone", stacklevel=3)
        return self.model

    def inference_network_name(self) -> str:
        return "peer_model" if self.hparams.inference == "b" else "model"
