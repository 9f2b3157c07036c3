"""``WeakSegModule``: any SMP model, named loss terms composed by mixins, metrics, prediction.

The plain module trains on full masks and is the full-supervision baseline; regimes are mixins that add terms:

>>> from lightning_weakseg import WeakSegModule
>>> model = WeakSegModule(arch="Unet", encoder="resnet18", in_channels=1, num_classes=4)
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import segmentation_models_pytorch as smp
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_warn
from torchmetrics import MeanMetric

from .data.batch import IGNORE_INDEX, complete_flags, content_mask, validate_batch
from .errors import NonFiniteLossError
from .inference import Predictor, class_map, flip_tta, native_inference, output_stride, to_native, whole_image
from .losses.dice import soft_dice_loss
from .losses.partial import masked_cross_entropy
from .metrics import HD95, DiceIoU
from .volume_metrics import VolumeScores, slice_predictions
from .nn import replace_batchnorm

__all__ = ["WeakSegModule", "masked_cross_entropy", "on_subset", "adopt_weakseg_collate"]


def adopt_weakseg_collate(trainer) -> None:
    """Give :func:`lightning_weakseg.data.collate` to the loaders passed to the trainer directly whose collate is
    PyTorch's default and whose samples are dicts with an ``image`` (a plain user ``Dataset``)."""
    from torch.utils.data import DataLoader
    from torch.utils.data._utils.collate import default_collate

    from .data.batch import collate

    loops = [getattr(trainer, "fit_loop", None), getattr(trainer, "validate_loop", None),
             getattr(trainer, "test_loop", None), getattr(trainer, "predict_loop", None)]
    fit_loop = loops[0]
    if fit_loop is not None:
        loops.append(getattr(getattr(fit_loop, "epoch_loop", None), "val_loop", None))
    for loop in loops:
        source = getattr(getattr(loop, "_data_source", None), "instance", None)
        if source is None or isinstance(source, (L.LightningModule, L.LightningDataModule)):
            continue
        loaders = source.values() if isinstance(source, dict) else source if isinstance(source, (list, tuple)) \
            else [source]
        for dl in loaders:
            if not isinstance(dl, DataLoader) or dl.collate_fn is not default_collate:
                continue
            try:
                first = dl.dataset[0]
            except Exception:  # not indexable (iterable data set): leave it alone
                continue
            if isinstance(first, dict) and "image" in first:
                dl.collate_fn = collate


def on_subset(fn, has: torch.Tensor, *tensors: torch.Tensor) -> torch.Tensor:
    """Per-sample values (B,) of ``fn`` evaluated only on the samples with ``has``; the others are exactly 0 and
    receive no gradient (they are never in the graph of ``fn``)."""
    b = has.shape[0]
    if bool(has.all()):
        return fn(*tensors)
    idx = has.nonzero().squeeze(1)
    vals = fn(*(t.index_select(0, idx) for t in tensors))
    return vals.new_zeros(b).index_put((idx,), vals)


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
        predict_scale: how ``predict_step`` and the test metrics see an image (:mod:`lightning_weakseg.inference`):
            ``"train"`` (default) — in the base view of training (same resize, ``image_size``), probabilities
            mapped back to the file's height × width; ``"native"`` — at the file's own pixel size (needs
            ``batch["native_image"]``, which ``WeakSegDataModule(predict_dir=...)`` supplies), for models trained
            at full resolution.
        predict_window: ``"native"`` scale: images larger than this (px, a multiple of the encoder's stride) go
            through sliding windows of this size; ``None``: always the whole image, padded to the stride.
        predict_overlap, predict_blend: sliding windows' overlap fraction and blending (``"gaussian"`` or
            ``"constant"``), by MONAI's ``sliding_window_inference``.
        predict_tta: average the probabilities over flips (identity, horizontal, vertical, both) in predict and
            test.
    """

    default_loss_weights: dict[str, float] = {"seg/ce": 1.0, "seg/dice": 1.0}
    #: A regime that trains on the base label map with a loss of its own (co-teaching, robust losses) sets
    #: ``replaces_base_term = True`` in its class body: ``seg/ce`` is then not computed. Any class of the
    #: composition declaring it is enough (the order of the bases does not matter); an explicit
    #: ``loss_weights={"seg/ce": w}`` decides instead (w = 0: not computed, w > 0: computed with weight w).
    replaces_base_term: bool = False
    #: HD95 of ``val/volume_hd95`` / ``test/volume_hd95``: ``"pooled"`` (medpy / WSL4MIS) or ``"max"`` (MONAI); see
    #: :mod:`lightning_weakseg.volume_metrics`.
    volume_hd95_convention: str = "pooled"

    def __init__(self, arch: str = "Unet", encoder: str = "resnet18", encoder_weights: str | None = None,
                 in_channels: int = 3, num_classes: int = 2, mask_key: str = "mask", dice_weight: float = 0.0,
                 loss_weights: dict[str, float] | None = None, lr: float = 1e-3, weight_decay: float = 1e-4,
                 scheduler: str = "cosine", cls_head: bool = False, on_nonfinite: str = "raise",
                 norm: str = "batch", model_kwargs: dict[str, Any] | None = None, predict_scale: str = "train",
                 predict_window: int | None = None, predict_overlap: float = 0.25, predict_blend: str = "gaussian",
                 predict_tta: bool = False):
        super().__init__()
        if num_classes < 2:
            raise ValueError("num_classes counts background: binary segmentation is num_classes=2")
        if predict_scale not in ("train", "native"):
            raise ValueError(f"predict_scale must be 'train' or 'native', got {predict_scale!r}")
        if predict_blend not in ("gaussian", "constant"):
            raise ValueError(f"predict_blend must be 'gaussian' or 'constant', got {predict_blend!r}")
        if not 0.0 <= predict_overlap < 1.0:
            raise ValueError(f"predict_overlap must be in [0, 1), got {predict_overlap}")
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
        # with native masks the test numbers are computed at each image's own size; these keep the base-view ones
        self.test_scores_train_size = DiceIoU(num_classes)
        self.test_hd95_train_size = HD95(num_classes)
        self._data_config: dict = {}  # the data's preprocessing, from a checkpoint (save_pretrained writes it)
        self._native_scored = 0  # test images scored at their own resolution in this epoch (this rank)
        # mean per-sample CE over the evaluated samples, summed and counted across DDP ranks (a mean of the
        # ranks' means would weigh unequal shards wrongly)
        self.val_ce, self.test_ce = MeanMetric(), MeanMetric()
        # slices of volumes (batch keys volume / slice / spacing), assembled and scored per volume at epoch end
        self.val_volume_scores = VolumeScores(num_classes, hd95_convention=self.volume_hd95_convention)
        self.test_volume_scores = VolumeScores(num_classes, hd95_convention=self.volume_hd95_convention)

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.network_outputs(self.model(x))

    @staticmethod
    def network_outputs(y) -> dict[str, torch.Tensor]:
        """An SMP network's output (logits, or logits and class logits) as the module's ``out`` dict."""
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

    def base_term_on(self) -> bool:
        """Whether ``seg/ce`` is computed: an explicit ``loss_weights["seg/ce"]`` decides (0 = off); otherwise it is
        on unless a class of the composition declares ``replaces_base_term = True``."""
        overrides = self.hparams.get("loss_weights") or {}
        if "seg/ce" in overrides:
            return float(overrides["seg/ce"]) != 0
        if any(cls.__dict__.get("replaces_base_term", False) for cls in type(self).__mro__):
            return False
        return self.term_weight("seg/ce") != 0

    def loss_terms(self, batch: dict, out: dict) -> dict[str, torch.Tensor]:
        """Named scalar loss terms. Mixins override, call ``super()``, and add their own."""
        terms: dict[str, torch.Tensor] = {}
        key = self.hparams.mask_key
        if key in batch and batch[f"has_{key}"].any():
            target, has = batch[key], batch[f"has_{key}"]
            if self.base_term_on():  # replaced (or weight 0): not even computed
                terms["seg/ce"] = self.batch_mean(masked_cross_entropy(out["logits"], target, reduction="none"), has)
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
        # a batch from any collate: missing has_* flags mean "every sample carries the keys present" (derived here,
        # in complete_flags, for training, validation, test and prediction alike)
        complete_flags(batch)
        validate_batch(batch, self.num_classes)
        out = self(self.training_view(batch))
        return self.combine_terms(self.loss_terms(batch, out), out, batch, "train")

    def training_view(self, batch: dict) -> torch.Tensor:
        """The input the network is trained on: ``batch["image"]``; a regime that perturbs it in the step (the
        student's strong view of :class:`~lightning_weakseg.regimes.MeanTeacherMixin`) overrides this, keeping
        the geometry so that the labels still apply."""
        return batch["image"]

    def _eval_step(self, batch: dict, stage: str):
        complete_flags(batch)
        out = self(batch["image"])
        if "mask" in batch:
            # samples flagged "pad" only even out the DDP shards (data/sampling.py): they are not scored
            keep = ~batch["pad"] if "pad" in batch else slice(None)
            scores, hd = (self.val_scores, self.val_hd95) if stage == "val" else (self.test_scores, self.test_hd95)
            probs = out["probs"]
            if stage == "test" and self.hparams.get("predict_tta", False):
                probs = whole_image(self.predictor(), batch["image"], output_stride(self.model))
            pred = class_map(probs, 1)
            valid = content_mask(batch)
            if valid is not None:  # padding of a letterboxed image: neither prediction nor label there
                pred = torch.where(valid.to(pred.device), pred, torch.zeros_like(pred))
            pred = pred[keep]
            target = batch["mask"][keep]
            if stage == "test" and batch.get("native_mask") is not None:
                # the test numbers are those at each image's own resolution; the base view's are kept aside
                self._score_native(batch, probs)
                scores, hd = self.test_scores_train_size, self.test_hd95_train_size
            if pred.shape[0]:
                scores.update(pred, target)
                hd.update(pred, torch.where(target == IGNORE_INDEX, 0, target))
            has = batch["has_mask"][keep]
            ce_metric = self.val_ce if stage == "val" else self.test_ce
            ce = masked_cross_entropy(out["logits"][keep], target, reduction="none")[has]
            ce_metric.update(ce, torch.ones_like(ce))
            if batch.get("volume") is not None and batch.get("slice") is not None:
                volumes = self.val_volume_scores if stage == "val" else self.test_volume_scores
                volumes.update(**slice_predictions(batch, probs))
            self.log(f"{stage}/ce", ce_metric, on_step=False, on_epoch=True)
        return out

    def _score_native(self, batch: dict, probs: torch.Tensor) -> None:
        """Dice / IoU / HD95 of the base-view probabilities mapped to each image's source size
        (:func:`~lightning_weakseg.inference.to_native`) against ``native_mask``, one image at a time."""
        B = probs.shape[0]
        pad = batch.get("pad")
        has = batch.get("has_native_mask")
        idx = [i for i in range(B) if (pad is None or not bool(pad[i])) and (has is None or bool(has[i]))]
        if not idx:
            return
        content, orig = batch.get("content"), batch.get("orig_size")
        native = to_native(probs[idx], None if content is None else content[idx], None if orig is None else orig[idx])
        self._native_scored += len(idx)
        for i, p in zip(idx, native):
            target = batch["native_mask"][i].to(p.device).long()
            if tuple(target.shape) != tuple(p.shape[-2:]):
                raise ValueError(f"sample {batch.get('id', [None] * B)[i]}: native_mask is {tuple(target.shape)} "
                                 f"but the prediction maps back to {tuple(p.shape[-2:])} (orig_size / content)")
            pred = class_map(p, 0)[None]
            target = target[None]
            self.test_scores.update(pred, target)
            self.test_hd95.update(pred, torch.where(target == IGNORE_INDEX, 0, target))

    def validation_step(self, batch: dict, batch_idx: int):
        self._eval_step(batch, "val")

    def test_step(self, batch: dict, batch_idx: int):
        self._eval_step(batch, "test")

    def _log_scores(self, stage: str):
        scores, hd = (self.val_scores, self.val_hd95) if stage == "val" else (self.test_scores, self.test_hd95)
        if stage == "test":
            # native masks were scored on some rank: the base-view numbers are kept as test/*_train_size
            n = torch.tensor(float(self._native_scored), device=self.device)
            self._native_scored = 0
            if self.trainer.world_size > 1:  # every rank decides alike, also one whose shard held none
                n = self.trainer.strategy.reduce(n.to(self.device), reduce_op="sum")
            if float(n) > 0:
                self._log_score_set(self.test_scores_train_size, self.test_hd95_train_size, stage, "_train_size",
                                    main=False)
            else:
                self.test_scores_train_size.reset()
                self.test_hd95_train_size.reset()
        self._log_score_set(scores, hd, stage)

    def _log_score_set(self, scores: DiceIoU, hd: HD95, stage: str, suffix: str = "", main: bool = True):
        if int(scores.count.sum()) == 0 and not self.trainer.world_size > 1:
            scores.reset()
            hd.reset()
            return
        # torchmetrics squeezes one-element results: binary segmentation has one foreground class
        dice, iou = (v.reshape(-1) for v in scores.compute())
        hd95 = hd.compute().reshape(-1)
        logs = {f"{stage}/dice{suffix}": torch.nanmean(dice), f"{stage}/iou{suffix}": torch.nanmean(iou),
                f"{stage}/hd95{suffix}": torch.nanmean(hd95)}
        for c in range(dice.numel()):
            logs[f"{stage}/dice_{c + 1}{suffix}"] = dice[c]
            logs[f"{stage}/iou_{c + 1}{suffix}"] = iou[c]
            logs[f"{stage}/hd95_{c + 1}{suffix}"] = hd95[c]
        # metric states were already reduced across ranks by torchmetrics: no second sync
        first = logs.pop(f"{stage}/dice{suffix}")
        self.log_dict(logs, prog_bar=False)
        self.log(f"{stage}/dice{suffix}", first, prog_bar=main)
        scores.reset()
        hd.reset()

    def _log_volume_scores(self, stage: str) -> None:
        """``<stage>/volume_dice`` (+ ``_<c>`` per class) and ``<stage>/volume_hd95`` (+ ``_<c>``): the slices of
        this epoch assembled into volumes across all ranks and scored once (:class:`~.volume_metrics.VolumeScores`);
        the same values on every rank. Nothing is logged when no rank saw a slice of a volume."""
        scores = self.val_volume_scores if stage == "val" else self.test_volume_scores
        n = len(scores)
        if self._trainer is not None and self.trainer.world_size > 1:  # every rank decides alike
            n = int(self.trainer.strategy.reduce(torch.tensor(float(n), device=self.device), reduce_op="sum"))
        if n == 0:
            scores.reset()
            return
        res = scores.compute()
        scores.reset()
        logs = {f"{stage}/volume_dice": res["mean_dice"], f"{stage}/volume_hd95": res["mean_hd95"]}
        for c, (d, h) in enumerate(zip(res["dice"], res["hd95"]), start=1):
            logs[f"{stage}/volume_dice_{c}"] = float(d)
            logs[f"{stage}/volume_hd95_{c}"] = float(h)
        # already one value for all ranks: no reduction
        self.log_dict({k: torch.tensor(v, dtype=torch.float32, device=self.device) for k, v in logs.items()},
                      sync_dist=False)

    def on_validation_epoch_start(self):
        self.val_volume_scores.reset()  # slices of an interrupted epoch must not meet this one's

    def on_test_epoch_start(self):
        self.test_volume_scores.reset()

    def on_validation_epoch_end(self):
        self._log_scores("val")
        self._log_volume_scores("val")

    def on_test_epoch_end(self):
        self._log_scores("test")
        self._log_volume_scores("test")

    # ------------------------------------------------------------------ inference
    def predictor(self) -> Predictor:
        """``x (B,C,H,W) → probabilities (B,K,H,W)`` of the network inference uses, with flip test-time
        augmentation when ``predict_tta``."""
        def predict(x: torch.Tensor) -> torch.Tensor:
            return self(x)["probs"]
        return flip_tta(predict) if self.hparams.get("predict_tta", False) else predict

    def native_probs(self, batch: dict, indices: list[int] | None = None) -> list[torch.Tensor]:
        """Class probabilities (K,H0,W0) at each image's source size, for the samples ``indices`` of the batch
        (all by default), at the scale ``predict_scale`` says (:mod:`lightning_weakseg.inference`). A batch
        without ``orig_size`` / ``content`` is taken as being at its native size."""
        h = self.hparams
        B = batch["image"].shape[0]
        idx = list(range(B)) if indices is None else [int(i) for i in indices]
        if not idx:
            return []
        predictor, stride = self.predictor(), output_stride(self.model)
        if h.get("predict_scale", "train") == "native":
            images = batch.get("native_image")
            if images is None:
                raise ValueError("predict_scale='native' needs the images at their own size (batch['native_image']);"
                                 " WeakSegDataModule(predict_dir=...) supplies them")
            return [native_inference(predictor, images[i][None].to(self.device, torch.float32), stride,
                                     h.get("predict_window"), h.get("predict_overlap", 0.25),
                                     h.get("predict_blend", "gaussian"))[0] for i in idx]
        probs = whole_image(predictor, batch["image"][idx], stride)
        content, orig = batch.get("content"), batch.get("orig_size")
        return to_native(probs, None if content is None else content[idx], None if orig is None else orig[idx])

    def predict_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> dict:
        """Per image of the batch (DDP filler samples, ``batch["pad"]``, left out): ``probs`` list of float
        (K,H0,W0) and ``labels`` list of long (H0,W0) at the image's source size, ``id`` list of names,
        ``index`` long (N,), ``orig_size`` long (N,2); slices of volumes also ``volume`` (names) and ``slice`` long
        (N,)."""
        complete_flags(batch)
        B = batch["image"].shape[0]
        pad = batch.get("pad")
        idx = [i for i in range(B) if pad is None or not bool(pad[i])]
        probs = self.native_probs(batch, idx)
        ids = batch.get("id")
        ids = [str(ids[i]) for i in idx] if ids is not None else [str(i) for i in idx]
        index = batch["index"][idx] if "index" in batch else torch.tensor(idx)
        out = {"probs": probs, "labels": [class_map(p, 0) for p in probs], "id": ids, "index": index,
               "orig_size": torch.tensor([list(p.shape[-2:]) for p in probs], dtype=torch.long).reshape(-1, 2)}
        if batch.get("volume") is not None and batch.get("slice") is not None:  # slices of volumes (MaskWriter)
            out["volume"] = [str(batch["volume"][i]) for i in idx]
            out["slice"] = batch["slice"][idx]
        return out

    # ------------------------------------------------------------------ a model to ship
    DATA_CONFIG_KEYS = ("image_size", "resize", "color_mode", "tiles", "source", "synthetic_kind")
    VOLUME_CONFIG_KEYS = ("slice_axis", "volume_norm")  # also recorded for source="volumes"

    def data_config(self) -> dict:
        """The data's preprocessing (``image_size``, ``resize``, ``color_mode``, ``tiles``): from the attached
        data module, else from the checkpoint this module was loaded from (``{}`` when neither is known)."""
        dm = None
        if self._trainer is not None:
            dm = getattr(self._trainer, "datamodule", None)
        hp = getattr(dm, "hparams", None)
        if hp:
            keys = self.DATA_CONFIG_KEYS + (self.VOLUME_CONFIG_KEYS if hp.get("source") == "volumes" else ())
            return {k: hp[k] for k in keys if k in hp}
        return dict(self._data_config)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["weakseg_data_config"] = self.data_config()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        self._data_config = dict(checkpoint.get("weakseg_data_config") or {})

    def inference_network(self) -> torch.nn.Module:
        """The SMP network whose output is the module's prediction (``self.model``; two-network regimes
        override this). :meth:`save_pretrained` writes it."""
        return self.model

    def save_pretrained(self, save_directory: str | Path, class_names: list[str] | None = None,
                        preprocessing: dict | None = None) -> Path:
        """Write the inference network as a plain SMP model plus ``weakseg.json``, its metadata.

        ``segmentation_models_pytorch.from_pretrained(save_directory)`` rebuilds the network without this
        library; it returns logits (B, num_classes, H, W): softmax over dim 1, argmax for the label map. Inputs
        are float images in [0, 1] (uint8 / 255, uint16 / 65535; no mean/std normalisation), RGB channel order,
        height and width multiples of ``output_stride``; ``weakseg.json`` says how training resized them
        (``preprocessing``: ``image_size``, ``resize``, ``color_mode``, taken from the data module or the
        checkpoint; ``preprocessing=`` overrides), the class names (``class_names``, default ``class_0..``) and
        the architecture.

        Only networks that plain SMP can rebuild: ``norm="batch"`` or ``"frozen"`` (in eval mode frozen
        BatchNorm is BatchNorm); GroupNorm replacements (``norm="group"|"instance"``) raise a ``ValueError``.
        """
        import json

        h = self.hparams
        norm = h.get("norm", "batch")
        if norm not in ("batch", "frozen"):
            raise ValueError(f"save_pretrained writes a plain SMP model, which has BatchNorm layers; this module "
                             f"replaced them (norm={norm!r}), so segmentation_models_pytorch.from_pretrained could "
                             "not rebuild it. Save a checkpoint instead (WeakSegModule.load_from_checkpoint).")
        if class_names is not None and len(class_names) != self.num_classes:
            raise ValueError(f"class_names: expected {self.num_classes} names (background first), got "
                             f"{len(class_names)}: {list(class_names)}")
        net = self.inference_network()
        out = Path(save_directory)
        out.mkdir(parents=True, exist_ok=True)
        net.save_pretrained(str(out))
        config = getattr(net, "_hub_mixin_config", None) or {}
        pre = {**self.data_config(), **(preprocessing or {})}
        meta = {
            "format": "lightning-weakseg/smp",
            "module": type(self).__name__,
            "network": self.inference_network_name(),
            "arch": type(net).__name__,
            "encoder": config.get("encoder_name", h.get("encoder")),
            "num_classes": self.num_classes,
            "class_names": list(class_names) if class_names is not None else [f"class_{c}" for c in
                                                                              range(self.num_classes)],
            "in_channels": h.get("in_channels"),
            "output_stride": output_stride(net),
            "input": {"dtype": "float32", "range": [0.0, 1.0], "channel_order": "RGB",
                      "normalisation": "none (uint8 / 255, uint16 / 65535; no mean/std)"},
            "output": "logits (B, num_classes, H, W): softmax over dim 1; label map = argmax over dim 1",
            "preprocessing": pre,
            "predict_scale": h.get("predict_scale", "train"),
        }
        tmp = out / "weakseg.json.tmp"
        tmp.write_text(json.dumps(meta, indent=1, default=str))
        os.replace(tmp, out / "weakseg.json")
        return out

    def inference_network_name(self) -> str:
        """The attribute :meth:`inference_network` returns (``"model"``)."""
        return "model"

    # ------------------------------------------------------------------ data in
    def setup(self, stage: str) -> None:
        """Loaders handed to ``Trainer.fit/validate/test/predict`` directly that use PyTorch's default collate
        get :func:`lightning_weakseg.data.collate` instead when their samples are dicts with an ``image``: the
        default collate cannot batch a variable number of boxes or points per image."""
        super().setup(stage)
        if self._trainer is not None:
            adopt_weakseg_collate(self.trainer)

    def on_train_start(self) -> None:
        """A run resumed with another length (e.g. a larger ``max_epochs``) has a cosine schedule sized for the
        old one, which would climb back up after its end: the schedule is re-sized to the new number of steps,
        the learning rate set to the new schedule's value at the current step, and a warning says so."""
        if self.hparams.scheduler != "cosine" or self._trainer is None:
            return
        sched = self.lr_schedulers()
        if isinstance(sched, list):
            sched = sched[0] if sched else None
        if not isinstance(sched, torch.optim.lr_scheduler.CosineAnnealingLR):
            return
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        if sched.T_max == total:
            return
        import math
        step, old_total = sched.last_epoch, sched.T_max
        old_lrs = [g["lr"] for g in sched.optimizer.param_groups]
        sched.T_max = total
        for g, base in zip(sched.optimizer.param_groups, sched.base_lrs):
            g["lr"] = sched.eta_min + (base - sched.eta_min) * (1 + math.cos(math.pi * min(step, total) / total)) / 2
        sched._last_lr = [g["lr"] for g in sched.optimizer.param_groups]
        rank_zero_warn(f"the run was resumed with {total} training steps in all where the checkpoint's cosine "
                       f"schedule had {old_total}: the schedule now spans {total} steps "
                       f"and the learning rate at step {step} is that of the new schedule "
                       f"({old_lrs[0]:.3g} -> {sched._last_lr[0]:.3g})")

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
