"""``WeakSegModule``: any SMP model, named loss terms composed by mixins, metrics, prediction.

The plain module trains on full masks and is the full-supervision baseline; regimes are mixins that add terms:

>>> from lightning_weakseg import WeakSegModule
>>> model = WeakSegModule(arch="Unet", encoder="resnet18", in_channels=1, num_classes=4)
"""
from __future__ import annotations

import warnings

from typing import Any

import lightning as L
import segmentation_models_pytorch as smp
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_warn
from torchmetrics import MeanMetric

from .data.batch import IGNORE_INDEX, validate_batch
from .errors import NonFiniteLossError
from .losses.dice import soft_dice_loss
from .metrics import HD95, DiceIoU
from .nn import replace_batchnorm


def on_subset(fn, has: torch.Tensor, *tensors: torch.Tensor) -> torch.Tensor:
    """Per-sample values (B,) of ``fn`` evaluated only on the samples with ``has``; the others are exactly 0 and
    receive no gradient (they are never in the graph of ``fn``)."""
    b = has.shape[0]
    if bool(has.all()):
        return fn(*tensors)
    idx = has.nonzero().squeeze(1)
    vals = fn(*(t.index_select(0, idx) for t in tensors))
    return vals.new_zeros(b).index_put((idx,), vals)


def masked_cross_entropy(logits: torch.Tensor, target: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Per-sample mean cross-entropy over each sample's labelled pixels: (B,K,H,W), (B,H,W) → (B,).

    A sample without labelled pixels gets 0 (and no gradient)."""
    ce = F.cross_entropy(logits, target, ignore_index=ignore_index, reduction="none").flatten(1)
    n = (target != ignore_index).flatten(1).sum(1)
    return ce.sum(1) / n.clamp_min(1)


class WeakSegModule(L.LightningModule):
    """LightningModule for weakly supervised segmentation on any SMP architecture × encoder.

    Args:
        arch: SMP architecture name for ``smp.create_model`` (Unet, UnetPlusPlus, FPN, DeepLabV3Plus, Segformer…).
        encoder: encoder name (``resnet18``, ``mobilenet_v2``, ``efficientnet-b0``, ``tu-<timm name>``…).
        encoder_weights: ``None`` (default: offline) or e.g. ``"imagenet"``.
        in_channels: image channels.
        num_classes: classes including background; binary segmentation is ``num_classes=2`` (softmax).
        mask_key: the dense label map the base ``seg/ce`` term trains on (``mask``, ``noisy_mask``, ``pseudo``…).
        dice_weight: weight of an extra soft-Dice term ``seg/dice`` on the same labels (0 = off).
        loss_weights: overrides of term weights by name, e.g. ``{"box/tightness": 1e-3}``.
        lr, weight_decay, scheduler: AdamW and ``"cosine"`` (per step over the run) or ``"none"``.
        cls_head: add SMP's classification head (``out["cls_logits"]``) for image-level regimes.
        on_nonfinite: ``"raise"`` (stop, naming term, step and samples) or ``"skip"`` (skip the batch).
        norm: ``"batch"`` (SMP's default) or a batch-independent replacement of every BatchNorm: ``"group"``,
            ``"instance"``, ``"frozen"`` (see :func:`lightning_weakseg.nn.replace_batchnorm`).
        model_kwargs: extra keyword arguments for ``smp.create_model``.
    """

    default_loss_weights: dict[str, float] = {"seg/ce": 1.0, "seg/dice": 1.0}

    def __init__(self, arch: str = "Unet", encoder: str = "resnet18", encoder_weights: str | None = None,
                 in_channels: int = 3, num_classes: int = 2, mask_key: str = "mask", dice_weight: float = 0.0,
                 loss_weights: dict[str, float] | None = None, lr: float = 1e-3, weight_decay: float = 1e-4,
                 scheduler: str = "cosine", cls_head: bool = False, on_nonfinite: str = "raise",
                 norm: str = "batch", model_kwargs: dict[str, Any] | None = None):
        super().__init__()
        if num_classes < 2:
            raise ValueError("num_classes counts background: binary segmentation is num_classes=2")
        if on_nonfinite not in ("raise", "skip"):
            raise ValueError(f"on_nonfinite must be 'raise' or 'skip', got {on_nonfinite!r}")
        self.save_hyperparameters()
        self.num_classes = num_classes
        self.ignore_index = IGNORE_INDEX
        kwargs = dict(model_kwargs or {})
        if cls_head:
            kwargs.setdefault("aux_params", {"classes": num_classes, "dropout": 0.0})
        self.model = smp.create_model(arch, encoder_name=encoder, encoder_weights=encoder_weights,
                                      in_channels=in_channels, classes=num_classes, **kwargs)
        replace_batchnorm(self.model, norm)
        self.val_scores = DiceIoU(num_classes)
        self.val_hd95 = HD95(num_classes)
        self.test_scores = DiceIoU(num_classes)
        self.test_hd95 = HD95(num_classes)
        # mean per-sample CE over the evaluated samples, summed and counted across DDP ranks (a mean of the
        # ranks' means would weigh unequal shards wrongly)
        self.val_ce, self.test_ce = MeanMetric(), MeanMetric()

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        y = self.model(x)
        out = {}
        if isinstance(y, (tuple, list)):
            out["logits"], out["cls_logits"] = y[0], y[1]
        else:
            out["logits"] = y
        out["probs"] = out["logits"].softmax(1)
        return out

    # ------------------------------------------------------------------ loss terms
    @staticmethod
    def batch_mean(per_sample: torch.Tensor, has: torch.Tensor | None = None) -> torch.Tensor:
        """Σ_i has_i · v_i / B: samples without the label contribute exactly zero, whatever the batch mix."""
        if has is None:
            return per_sample.mean()
        return torch.where(has.to(per_sample.device), per_sample, torch.zeros_like(per_sample)).sum() / per_sample.shape[0]

    def loss_terms(self, batch: dict, out: dict) -> dict[str, torch.Tensor]:
        """Named scalar loss terms. Mixins override, call ``super()``, and add their own."""
        terms: dict[str, torch.Tensor] = {}
        key = self.hparams.mask_key
        if key in batch and batch[f"has_{key}"].any():
            target, has = batch[key], batch[f"has_{key}"]
            if self.term_weight("seg/ce") != 0:  # weight 0 (e.g. co-teaching replaces it): not even computed
                terms["seg/ce"] = self.batch_mean(masked_cross_entropy(out["logits"], target), has)
            if self.hparams.dice_weight > 0:
                terms["seg/dice"] = self.hparams.dice_weight * self.batch_mean(
                    soft_dice_loss(out["probs"], target), has)
        return terms

    def term_weight(self, name: str) -> float:
        overrides = self.hparams.get("loss_weights") or {}
        if name in overrides:
            return float(overrides[name])
        for cls in type(self).__mro__:
            w = cls.__dict__.get("default_loss_weights", {})
            if name in w:
                return float(w[name])
        return 1.0

    def combine_terms(self, terms: dict[str, torch.Tensor], out: dict, batch: dict, stage: str) -> torch.Tensor | None:
        # a zero-valued touch of every output keeps all parameters in the graph (DDP needs no unused-parameter scan)
        total = sum(v.sum() * 0.0 for k, v in out.items() if k != "probs" and torch.is_tensor(v) and v.requires_grad)
        bs = batch["image"].shape[0]
        if self.hparams.on_nonfinite == "skip" and self._trainer is not None and self.trainer.world_size > 1:
            # Under DDP every rank must skip together (Lightning refuses a None loss there, and a rank that went
            # on would wait in the gradient all-reduce): one all-reduce of "some term is not finite here"
            # decides for all; each rank then backpropagates a zero loss (the all-reduce still pairs up) and
            # optimizer_step drops the gradients, so AdamW leaves the weights and its state alone.
            local = not all(bool(torch.isfinite(v).all()) for v in terms.values())
            bad = torch.tensor([float(local)], device=self.device)
            torch.distributed.all_reduce(bad, op=torch.distributed.ReduceOp.MAX)
            if bad.item() > 0:
                if local:
                    names = [k for k, v in terms.items() if not torch.isfinite(v).all()]
                    warnings.warn(f"on_nonfinite='skip': rank {self.global_rank}: loss terms {names} not finite at "
                                  f"global step {self.global_step} (epoch {self.current_epoch}); samples "
                                  f"{batch.get('id')}: every rank skips this batch")
                self._skip_optimizer_step = True
                return torch.nan_to_num(total, nan=0.0, posinf=0.0, neginf=0.0) if torch.is_tensor(total) else None
        for name, value in terms.items():
            if not torch.isfinite(value).all():
                msg = (f"loss term '{name}' is {value.detach().item()} at global step {self.global_step} "
                       f"(epoch {self.current_epoch}); samples {batch.get('id')}")
                if self.hparams.on_nonfinite == "raise":
                    raise NonFiniteLossError(msg)
                rank_zero_warn(f"on_nonfinite='skip': skipping the batch: {msg}")
                return None
            total = total + self.term_weight(name) * value
            self.log(f"{stage}/{name}", value.detach(), on_step=stage == "train", on_epoch=True, batch_size=bs,
                     sync_dist=stage != "train")
        self.log(f"{stage}/loss", total.detach() if torch.is_tensor(total) else float(total), prog_bar=True,
                 on_step=stage == "train", on_epoch=True, batch_size=bs, sync_dist=stage != "train")
        return total

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None):
        """Lightning's step, except that a batch skipped under DDP (``on_nonfinite="skip"``) leaves no gradient:
        AdamW skips parameters whose ``grad`` is None, so the weights and the optimizer state stay as they were."""
        if optimizer_closure is None:
            return super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)

        def closure():
            loss = optimizer_closure()
            if getattr(self, "_skip_optimizer_step", False):
                self._skip_optimizer_step = False
                for group in optimizer.param_groups:
                    for p in group["params"]:
                        p.grad = None
            return loss

        optimizer.step(closure=closure)

    # ------------------------------------------------------------------ steps
    def training_step(self, batch: dict, batch_idx: int):
        validate_batch(batch, self.num_classes)
        out = self(batch["image"])
        return self.combine_terms(self.loss_terms(batch, out), out, batch, "train")

    def _eval_step(self, batch: dict, stage: str):
        out = self(batch["image"])
        if "mask" in batch:
            # samples flagged "pad" only even out the DDP shards (data/sampling.py): they are not scored
            keep = ~batch["pad"] if "pad" in batch else slice(None)
            pred = out["logits"].argmax(1)[keep]
            scores, hd = (self.val_scores, self.val_hd95) if stage == "val" else (self.test_scores, self.test_hd95)
            target = batch["mask"][keep]
            if pred.shape[0]:
                scores.update(pred, target)
                hd.update(pred, torch.where(target == IGNORE_INDEX, 0, target))
            has = batch["has_mask"][keep]
            ce_metric = self.val_ce if stage == "val" else self.test_ce
            ce = masked_cross_entropy(out["logits"][keep], target)[has]
            ce_metric.update(ce, torch.ones_like(ce))
            self.log(f"{stage}/ce", ce_metric, on_step=False, on_epoch=True)
        return out

    def validation_step(self, batch: dict, batch_idx: int):
        self._eval_step(batch, "val")

    def test_step(self, batch: dict, batch_idx: int):
        self._eval_step(batch, "test")

    def _log_scores(self, stage: str):
        scores, hd = (self.val_scores, self.val_hd95) if stage == "val" else (self.test_scores, self.test_hd95)
        if int(scores.count.sum()) == 0 and not self.trainer.world_size > 1:
            return
        # torchmetrics squeezes one-element results: binary segmentation has one foreground class
        dice, iou = (v.reshape(-1) for v in scores.compute())
        hd95 = hd.compute().reshape(-1)
        logs = {f"{stage}/dice": torch.nanmean(dice), f"{stage}/iou": torch.nanmean(iou),
                f"{stage}/hd95": torch.nanmean(hd95)}
        for c in range(dice.numel()):
            logs[f"{stage}/dice_{c + 1}"] = dice[c]
            logs[f"{stage}/iou_{c + 1}"] = iou[c]
            logs[f"{stage}/hd95_{c + 1}"] = hd95[c]
        # metric states were already reduced across ranks by torchmetrics: no second sync
        main = logs.pop(f"{stage}/dice")
        self.log_dict(logs, prog_bar=False)
        self.log(f"{stage}/dice", main, prog_bar=True)
        scores.reset()
        hd.reset()

    def on_validation_epoch_end(self):
        self._log_scores("val")

    def on_test_epoch_end(self):
        self._log_scores("test")

    def predict_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> dict:
        out = self(batch["image"])
        return {"probs": out["probs"], "labels": out["probs"].argmax(1), "id": batch.get("id")}

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        if self.hparams.scheduler == "none":
            return opt
        if self.hparams.scheduler != "cosine":
            raise ValueError(f"scheduler must be 'cosine' or 'none', got {self.hparams.scheduler!r}")
        steps = max(int(self.trainer.estimated_stepping_batches), 1)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
