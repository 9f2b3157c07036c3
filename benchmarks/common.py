"""Shared pieces of the quality benchmarks: the real data sets, the regime registry, one training run.

Every regime of one data set is trained with the same model, split, image size, epochs and seed, in one
invocation of ``benchmarks/run.py``, so that "weak / full" ratios compare like with like.
"""
from __future__ import annotations

import importlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

# data sets under --data (see ../shared/data/README.md); keyword arguments of WeakSegDataModule
DATASETS: dict[str, dict[str, Any]] = {
    "kvasir": dict(root="kvasir", num_classes=2, in_channels=3, mask_dir="masks", boxes_json="boxes.json"),
    "acdc": dict(root="acdc", num_classes=4, in_channels=1, mask_dir="masks", scribble_dir="scribbles",
                 group_regex=r"^(patient\d+)"),
    "dsb2018": dict(root="dsb2018", num_classes=2, in_channels=3, mask_dir=None, instance_dir="instances"),
}


@dataclass
class Regime:
    """One way of training: which labels the training split carries and which module learns from them."""
    module: str = "lightning_weakseg.module:WeakSegModule"
    labels: tuple[str, ...] = ("mask",)
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    weakify: dict[str, Any] = field(default_factory=dict)
    callbacks: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    label_fractions: dict[str, float] | None = None
    # called with (datamodule) after setup, before fit: e.g. pseudo-masks from boxes for the baselines
    prepare: Callable | None = None
    instances: bool = False  # evaluate object F1 / AJI too (nuclei)
    pseudo_eval: bool = False  # score the model's own pseudo labels (make_pseudo_labels) on the validation set
    # ... and those of other CAM methods / refinements on the same trained model: ((tag_cam, tag_refine), ...)
    pseudo_variants: tuple[tuple[str, str], ...] = ()


def load(path: str):
    mod, _, name = path.partition(":")
    return getattr(importlib.import_module(mod), name)


def _box_pseudo(method: str):
    def prepare(dm):
        from lightning_weakseg.pseudo import pseudo_labels_from_boxes
        dm.train_dataset.set_pseudo_labels(pseudo_labels_from_boxes(dm.train_eval_dataloader(), method=method))
    return prepare


# the registry; regime files add entries with REGIMES[name] = Regime(...)
REGIMES: dict[str, Regime] = {
    "full": Regime(),
    # boxes (issue 3)
    "boxes": Regime("lightning_weakseg.regimes.boxes:BoxSegModule", ("boxes",),
                    callbacks=[("lightning_weakseg.callbacks:LogBarrierSchedule", {})]),
    "box_mask": Regime(labels=("boxes",), model_kwargs={"mask_key": "pseudo"}, prepare=_box_pseudo("box")),
    "grabcut": Regime(labels=("boxes",), model_kwargs={"mask_key": "pseudo"}, prepare=_box_pseudo("grabcut")),
    # points (issue 4)
    "points_centroid": Regime("lightning_weakseg.regimes.points:PointSegModule", ("points",),
                              weakify={"point_mode": "centroid"}, instances=True),
    "points_click": Regime("lightning_weakseg.regimes.points:PointSegModule", ("points",),
                           weakify={"point_mode": "click"}, instances=True),
    # noisy masks (issue 6); the noise rate comes from --noise
    "naive": Regime(labels=("noisy_mask",), model_kwargs={"mask_key": "noisy_mask"}),
    "gce": Regime("lightning_weakseg.regimes.robust:RobustSegModule", ("noisy_mask",),
                  model_kwargs={"robust_loss": "gce", "mask_key": "noisy_mask", "loss_weights": {"seg/ce": 0.0}}),
    "sce": Regime("lightning_weakseg.regimes.robust:RobustSegModule", ("noisy_mask",),
                  model_kwargs={"robust_loss": "sce", "mask_key": "noisy_mask", "loss_weights": {"seg/ce": 0.0}}),
    "coteaching": Regime("lightning_weakseg.regimes.coteaching:CoTeachingSegModule", ("noisy_mask",),
                         model_kwargs={"mask_key": "noisy_mask", "loss_weights": {"seg/ce": 0.0}},
                         callbacks=[("lightning_weakseg.callbacks:ForgetRateSchedule", {})]),
    "coteaching_plus": Regime("lightning_weakseg.regimes.coteaching:CoTeachingSegModule", ("noisy_mask",),
                              model_kwargs={"mask_key": "noisy_mask", "coteach_plus": True,
                                            "loss_weights": {"seg/ce": 0.0}},
                              callbacks=[("lightning_weakseg.callbacks:ForgetRateSchedule", {})]),
}


def _epoch_printer():
    import lightning as L

    class EpochPrinter(L.Callback):
        """One line per epoch (the benchmark runs without progress bars)."""

        def __init__(self, name):
            self.name, self.t0 = name, time.time()

        def on_train_epoch_end(self, trainer, pl_module):  # runs after that epoch's validation, if any
            m = trainer.callback_metrics
            loss = float(m.get("train/loss_epoch", m.get("train/loss", float("nan"))))
            every = trainer.check_val_every_n_epoch or 1
            val = f" val/dice={float(m.get('val/dice', float('nan'))):.4f}" if (trainer.current_epoch + 1) % every == 0 \
                else ""
            print(f"  {self.name} epoch {trainer.current_epoch}: train/loss={loss:.4f}{val} "
                  f"({time.time() - self.t0:.0f} s)", flush=True)

    return EpochPrinter


def EpochPrinter(name):  # noqa: N802 - a factory that keeps Lightning out of this module's import
    return _epoch_printer()(name)


def _instance_scores(model, dm) -> dict[str, float]:
    from lightning_weakseg.instances import instance_metrics, instances_from_mask
    rows = []
    model.eval()
    with torch.no_grad():
        for batch in dm.val_dataloader():
            pred = model(batch["image"])["probs"].argmax(1).numpy()
            for gt, p in zip(batch["instances"].numpy(), pred):
                rows.append(instance_metrics(gt, instances_from_mask(p > 0, min_size=3)))
    return {f"obj_{k}": float(np.mean([r[k] for r in rows])) for k in ("f1", "aji")}


PSEUDO_EVAL_MAX = 320  # validation samples the pseudo-mask scores use (the first ones; CRF / random walk are slow)


def _pseudo_scores(model, dm) -> dict[str, float]:
    """The pseudo-masks the trained model would make (``make_pseudo_labels``, tags from the validation masks)
    against the validation masks: mIoU over the foreground classes with unlabelled (255) pixels counted as
    background, the accuracy of the labelled pixels, and the fraction of pixels labelled. On the first
    ``PSEUDO_EVAL_MAX`` validation samples (``pseudo_n``)."""
    inter = union = None
    correct = labelled = pixels = seen = 0
    model.eval()
    for batch in dm.val_dataloader():
        if seen >= PSEUDO_EVAL_MAX:
            break
        seen += batch["image"].shape[0]
        mask = batch["mask"]
        k = model.hparams.num_classes
        batch["tags"] = torch.stack([(mask == c).flatten(1).any(1) for c in range(k)], 1).float()
        batch["has_tags"] = torch.ones(mask.shape[0], dtype=torch.bool)
        lab = model.make_pseudo_labels(batch).cpu()  # gradient CAMs need autograd: no no_grad here
        valid = mask != 255
        known = (lab != 255) & valid
        correct += int(((lab == mask) & known).sum())
        labelled += int(known.sum())
        pixels += int(valid.sum())
        strict = torch.where(lab == 255, torch.zeros_like(lab), lab)
        i = torch.stack([((strict == c) & (mask == c) & valid).sum() for c in range(1, k)]).double()
        u = torch.stack([(((strict == c) | (mask == c)) & valid).sum() for c in range(1, k)]).double()
        inter, union = (i, u) if inter is None else (inter + i, union + u)
    iou = inter / union.clamp_min(1)
    return {"pseudo_miou": float(iou.mean()), "pseudo_precision": correct / max(labelled, 1),
            "pseudo_coverage": labelled / max(pixels, 1), "pseudo_n": seen}


def run_one(data_root: str, dataset: str, name: str, regime: Regime, *, epochs: int, image_size: int,
            max_train: int | None, batch_size: int, seed: int, arch: str, encoder: str, lr: float,
            noise: float | None = None, noise_fraction: float = 1.0, log_dir: str | None = None, val_every: int = 1,
            tiles: int = 1, tile_eval: str = "tiles") -> dict[str, Any]:
    import lightning as L
    from lightning_weakseg.data import WeakSegDataModule

    L.seed_everything(seed, verbose=False)
    spec = dict(DATASETS[dataset])
    spec["root"] = os.path.join(data_root, spec["root"])
    weak = dict(regime.weakify)
    if noise is not None:
        weak.setdefault("noise_rate", noise)
    if noise_fraction != 1.0:
        weak.setdefault("noise_fraction", noise_fraction)
    dm = WeakSegDataModule(source="folder", image_size=image_size, batch_size=batch_size, seed=seed,
                           train_labels=list(regime.labels), label_fractions=regime.label_fractions,
                           weakify=weak, max_train_samples=max_train, eval_batch_size=2 * batch_size, tiles=tiles,
                           tile_eval=tile_eval,
                           **spec)
    dm.setup("fit")
    if regime.prepare is not None:
        regime.prepare(dm)
    model = load(regime.module)(arch=arch, encoder=encoder, in_channels=dm.in_channels,
                                num_classes=dm.num_classes, lr=lr, **regime.model_kwargs)
    callbacks = [load(c)(**kw) for c, kw in regime.callbacks] + [EpochPrinter(f"{dataset}/{name}")]
    logger = False
    if log_dir:
        from lightning.pytorch.loggers import CSVLogger
        logger = CSVLogger(log_dir, name=f"{dataset}_{name}")
    trainer = L.Trainer(max_epochs=epochs, accelerator="auto", devices=1, logger=logger,
                        enable_checkpointing=False, callbacks=callbacks, enable_model_summary=False,
                        enable_progress_bar=False, num_sanity_val_steps=0,
                        check_val_every_n_epoch=val_every)
    t0 = time.time()
    trainer.fit(model, dm)
    seconds = time.time() - t0
    res = trainer.validate(model, dm, verbose=False)[0]
    row = {"dataset": dataset, "regime": name, "labels": "+".join(regime.labels), "seconds": round(seconds, 1),
           "label_fractions": regime.label_fractions,
           "n_train": len(dm.train_dataset), "n_val": len(dm.val_dataset),
           **{k.split("/", 1)[1]: float(v) for k, v in res.items() if k.startswith("val/") and "_" not in k[4:]},
           **{k.split("/", 1)[1]: float(v) for k, v in res.items() if k.startswith("val/dice_")}}
    if regime.instances or spec.get("instance_dir"):  # every regime on an instance data set, full masks too
        row.update(_instance_scores(model, dm))
    if regime.pseudo_eval:
        row.update(_pseudo_scores(model, dm))
        variants = {}
        for cam, refine in regime.pseudo_variants:
            saved = (model.tag_cam, model.tag_refine, model.tag_pseudo_source, model.tag_refine_kwargs,
                     model.tag_cam_layer)
            model.tag_cam, model.tag_refine, model.tag_pseudo_source = cam, refine, "cam"
            if cam == "CAM":  # class activation mapping needs the layer the classification head pools
                model.tag_cam_layer = "model.encoder.layer4"
            model.tag_refine_kwargs = dict(_TAG_RW) if refine == "random_walk" else {}
            t0 = time.time()
            try:
                variants[f"{cam}+{refine}"] = {**_pseudo_scores(model, dm), "seconds": round(time.time() - t0, 1)}
            except Exception as e:  # noqa: BLE001 - one variant failing must not lose the run; say why
                variants[f"{cam}+{refine}"] = {"error": f"{type(e).__name__}: {e}"[:300]}
            finally:
                (model.tag_cam, model.tag_refine, model.tag_pseudo_source, model.tag_refine_kwargs,
                 model.tag_cam_layer) = saved
        if variants:
            row["pseudo_variants"] = variants
    return row


def write_json(path: str | Path, payload: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload, indent=1))
    tmp.replace(path)

# scribbles and mixed supervision (issue 7); ACDC carries real scribbles (DATASETS["acdc"]["scribble_dir"])
_SCRIBBLE = "lightning_weakseg.regimes.scribbles:ScribbleSegModule"
_MIXED = "lightning_weakseg.regimes.mixed:MixedSegModule"
_BARRIER = [("lightning_weakseg.callbacks:LogBarrierSchedule", {})]
REGIMES["pce"] = Regime(_SCRIBBLE, ("scribble",), model_kwargs={"scribble_terms": ["pce"]})
REGIMES["pce_entropy"] = Regime(_SCRIBBLE, ("scribble",), model_kwargs={"scribble_terms": ["pce", "entropy"]})
REGIMES["pce_crf"] = Regime(_SCRIBBLE, ("scribble",), model_kwargs={"scribble_terms": ["pce", "crf"]})
REGIMES["pce_tv"] = Regime(_SCRIBBLE, ("scribble",), model_kwargs={"scribble_terms": ["pce", "tv"]})
REGIMES["pce_crf_entropy"] = Regime(_SCRIBBLE, ("scribble",),
                                    model_kwargs={"scribble_terms": ["pce", "crf", "entropy"]})
REGIMES["mask10_boxes90"] = Regime(_MIXED, ("mask", "boxes"), label_fractions={"mask": 0.1, "boxes": 0.9},
                                   callbacks=_BARRIER)
REGIMES["mask10_tags90"] = Regime(_MIXED, ("mask", "tags"), label_fractions={"mask": 0.1, "tags": 0.9})
# ACDC tags are nearly all-ones (most slices hold RV, Myo and LV): smooth MIL pooling (LSE) on 90 % of the images
# then floods every class; max pooling only touches each class's most confident pixel
# the baseline both tag mixes must beat: the same 10 % masks, the tags' term switched off (weight 0)
REGIMES["mask10_only"] = Regime(_MIXED, ("mask", "tags"), label_fractions={"mask": 0.1, "tags": 0.9},
                                model_kwargs={"loss_weights": {"tags/mil": 0.0}})
REGIMES["mask10_tags90_max"] = Regime(_MIXED, ("mask", "tags"), label_fractions={"mask": 0.1, "tags": 0.9},
                                      model_kwargs={"tag_mil": "max"})
REGIMES["all_points"] = Regime(_MIXED, ("points",), instances=True)
REGIMES["all_boxes"] = Regime(_MIXED, ("boxes",), callbacks=_BARRIER)

# image-level tags (issue 5): ACDC class presence per slice (Kvasir: every image holds a polyp, tags need tiles)
_TAGS = "lightning_weakseg.regimes.tags:TagSegModule"
_TAG_RW = {"radius": 5, "sigma_rgb": 0.08, "beta": 8.0, "iterations": 48, "downscale": 2}
_REFRESH = [("lightning_weakseg.callbacks:PseudoLabelRefresh", {"every_n_epochs": 2, "start_epoch": 4})]
REGIMES["tags_mil"] = Regime(_TAGS, ("tags",), pseudo_eval=True, model_kwargs={"tag_mil": "lse", "tag_cls": False,
                                                            "tag_pseudo_source": "mil", "tag_refine": "none"})
_CAMS = ("CAM", "GradCAM", "GradCAMPlusPlus", "XGradCAM", "LayerCAM", "HiResCAM", "EigenCAM")
_VARIANTS = tuple((c, r) for c in _CAMS for r in ("none", "crf", "random_walk"))
# top-k pooling (session 5): a tagged Kvasir tile is ~25 % polyp, so the mean of the top 20 % of the log-odds asks
# for an extent; LSE (r = 5) is satisfied by a small confident blob
REGIMES["tags_mil_topk20"] = Regime(_TAGS, ("tags",), pseudo_eval=True,
                                    model_kwargs={"tag_mil": "topk", "tag_mil_kwargs": {"k": 0.2}, "tag_cls": False,
                                                  "tag_pseudo_source": "mil", "tag_refine": "none"})
# MIL + the gated CRF loss (session 5): MIL fixes that a polyp is in the tile, the CRF term where its edges are
REGIMES["tags_mil_crf"] = Regime(_TAGS, ("tags",), pseudo_eval=True,
                                 model_kwargs={"tag_mil": "lse", "tag_cls": False, "tag_crf": True,
                                               "tag_pseudo_source": "mil", "tag_refine": "none"})
# MIL + size bounds (session 6; Kervadec et al. 2019, tags + a size prior under the log-barrier): a tagged 64-px
# Kvasir tile is 0.014 to 0.51 polyp (10th / 90th percentiles over the 2971 tagged tiles of all 998 masks at
# 128 px: a prior an annotator could state, not tuned on the validation Dice)
REGIMES["tags_mil_size"] = Regime(_TAGS, ("tags",), pseudo_eval=True, callbacks=_BARRIER,
                                  model_kwargs={"tag_mil": "lse", "tag_cls": False, "tag_size_bounds": (0.014, 0.51),
                                                "tag_pseudo_source": "mil", "tag_refine": "none"})
REGIMES["tags_cam"] = Regime(_TAGS, ("tags",), callbacks=_REFRESH, pseudo_eval=True, pseudo_variants=_VARIANTS,
                             model_kwargs={"tag_mil": "lse", "tag_cam": "GradCAM", "tag_cam_layer": "model.encoder.layer3",
                                           "tag_refine": "none"})
REGIMES["tags_cam_rw"] = Regime(_TAGS, ("tags",), callbacks=_REFRESH, pseudo_eval=True,
                                model_kwargs={"tag_mil": "lse", "tag_cam": "GradCAM",
                                              "tag_cam_layer": "model.encoder.layer3", "tag_refine": "random_walk",
                                              "tag_refine_kwargs": _TAG_RW})
REGIMES["tags_cam_crf"] = Regime(_TAGS, ("tags",), callbacks=_REFRESH, pseudo_eval=True,
                                 model_kwargs={"tag_mil": "lse", "tag_cam": "GradCAM",
                                               "tag_cam_layer": "model.encoder.layer3", "tag_refine": "crf"})

# tuned variants (issue 3): Kvasir polyps fill ~0.75 of their box (an inscribed ellipse fills pi/4), so the
# default lower size bound a = 0.5 lets the network under-fill the box; 3-line bands suit 64-px images
_BOX = "lightning_weakseg.regimes.boxes:BoxSegModule"
REGIMES["boxes_s70"] = Regime(_BOX, ("boxes",), model_kwargs={"box_size_bounds": (0.7, 0.9)}, callbacks=_BARRIER)
REGIMES["boxes_w3_s70"] = Regime(_BOX, ("boxes",), model_kwargs={"box_size_bounds": (0.7, 0.9), "box_band_width": 3},
                                 callbacks=_BARRIER)
# the constraint terms are sums over a box divided by H*W: inside a box that holds ~20 % of the image they pull
# each pixel ~5x less than the emptiness CE pulls the pixels outside; weight 10 (or a faster-growing t) evens it
REGIMES["boxes_x10"] = Regime(_BOX, ("boxes",), model_kwargs={"loss_weights": {"box/tightness": 10.0, "box/size": 10.0}},
                              callbacks=_BARRIER)
REGIMES["boxes_x03"] = Regime(_BOX, ("boxes",), model_kwargs={"loss_weights": {"box/tightness": 0.3, "box/size": 0.3}},
                              callbacks=_BARRIER)
REGIMES["boxes_mu13"] = Regime(_BOX, ("boxes",), callbacks=[("lightning_weakseg.callbacks:LogBarrierSchedule",
                                                             {"mu": 1.3})])
REGIMES["boxes_x10_s60"] = Regime(_BOX, ("boxes",), model_kwargs={"loss_weights": {"box/tightness": 10.0,
                                                                                   "box/size": 10.0},
                                                                  "box_size_bounds": (0.6, 0.9)}, callbacks=_BARRIER)

# noisy-mask variants (issue 6): benchmarks/noisy_regimes.py
from noisy_regimes import noisy_regimes  # noqa: E402 - needs Regime above

REGIMES.update(noisy_regimes(Regime))


# points (issue 4). The cluster-label lengths of Qu et al. (erosion 7, dilation 5, margins 10, min size 30 px) are
# for 40x histology with nuclei of radius ~9 px; DSB2018 resized to 128 px has a median nucleus radius of 3.1 px, so
# scale = 3.1 / 9 = 0.35 (the rule in cluster_labels' docstring). With the default scale 1.0 the cluster labels mark
# 22 % of the nucleus pixels and 47 % of all pixels; with 0.35, 27 % and 84 % (75 training images, precision of the
# labelled pixels 0.98 / 0.99: python benchmarks/point_label_quality.py --data ../shared/data --scales 1.0,0.35).
_POINTS = "lightning_weakseg.regimes.points:PointSegModule"
_S035 = {"point_cluster_kwargs": {"scale": 0.35}}
REGIMES["points_centroid_s035"] = Regime(_POINTS, ("points",), weakify={"point_mode": "centroid"}, instances=True,
                                         model_kwargs=_S035)
REGIMES["points_click_s035"] = Regime(_POINTS, ("points",), weakify={"point_mode": "click"}, instances=True,
                                      model_kwargs=_S035)
# the self-training stage: from epoch 5 the cluster labels are replaced by the model's own CRF-refined predictions
# (confident pixels only), refreshed every 2 epochs
REGIMES["points_centroid_s035_st"] = Regime(_POINTS, ("points",), weakify={"point_mode": "centroid"}, instances=True,
                                            model_kwargs=_S035,
                                            callbacks=[("lightning_weakseg.callbacks:PseudoLabelRefresh",
                                                        {"every_n_epochs": 2, "start_epoch": 5})])


# a stronger full-mask baseline (CE + soft Dice): plain CE on 64-px Kvasir tiles is slow to leave the
# all-background solution at a CPU budget (issue 5's tiles benchmark)
REGIMES["full_dice"] = Regime(model_kwargs={"dice_weight": 1.0})
