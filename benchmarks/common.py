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

        def on_validation_epoch_end(self, trainer, pl_module):
            if trainer.sanity_checking:
                return
            m = trainer.callback_metrics
            print(f"  {self.name} epoch {trainer.current_epoch}: val/dice={float(m.get('val/dice', float('nan'))):.4f} "
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


def run_one(data_root: str, dataset: str, name: str, regime: Regime, *, epochs: int, image_size: int,
            max_train: int | None, batch_size: int, seed: int, arch: str, encoder: str, lr: float,
            noise: float | None = None, log_dir: str | None = None) -> dict[str, Any]:
    import lightning as L
    from lightning_weakseg.data import WeakSegDataModule

    L.seed_everything(seed, verbose=False)
    spec = dict(DATASETS[dataset])
    spec["root"] = os.path.join(data_root, spec["root"])
    weak = dict(regime.weakify)
    if noise is not None:
        weak.setdefault("noise_rate", noise)
    dm = WeakSegDataModule(source="folder", image_size=image_size, batch_size=batch_size, seed=seed,
                           train_labels=list(regime.labels), label_fractions=regime.label_fractions,
                           weakify=weak, max_train_samples=max_train, eval_batch_size=2 * batch_size, **spec)
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
                        enable_progress_bar=False, num_sanity_val_steps=0)
    t0 = time.time()
    trainer.fit(model, dm)
    seconds = time.time() - t0
    res = trainer.validate(model, dm, verbose=False)[0]
    row = {"dataset": dataset, "regime": name, "labels": "+".join(regime.labels), "seconds": round(seconds, 1),
           "label_fractions": regime.label_fractions,
           "n_train": len(dm.train_dataset), "n_val": len(dm.val_dataset),
           **{k.split("/", 1)[1]: float(v) for k, v in res.items() if k.startswith("val/") and "_" not in k[4:]},
           **{k.split("/", 1)[1]: float(v) for k, v in res.items() if k.startswith("val/dice_")}}
    if regime.instances:
        row.update(_instance_scores(model, dm))
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
# REGIMES["mask10_tags90"] = Regime(_MIXED, ("mask", "tags"), label_fractions={"mask": 0.1, "tags": 0.9},
#                                   model_kwargs={"cls_head": True})  # once MixedSegModule composes ImageLevelMixin
REGIMES["all_points"] = Regime(_MIXED, ("points",), instances=True)
REGIMES["all_boxes"] = Regime(_MIXED, ("boxes",), callbacks=_BARRIER)

# image-level tags (issue 5): ACDC class presence per slice (Kvasir: every image holds a polyp, tags need tiles)
_TAGS = "lightning_weakseg.regimes.tags:TagSegModule"
_TAG_RW = {"radius": 5, "sigma_rgb": 0.08, "beta": 8.0, "iterations": 48, "downscale": 2}
_REFRESH = [("lightning_weakseg.callbacks:PseudoLabelRefresh", {"every_n_epochs": 2, "start_epoch": 4})]
REGIMES["tags_mil"] = Regime(_TAGS, ("tags",), model_kwargs={"tag_mil": "lse", "tag_cls": False,
                                                            "tag_pseudo_source": "mil", "tag_refine": "none"})
REGIMES["tags_cam"] = Regime(_TAGS, ("tags",), callbacks=_REFRESH,
                             model_kwargs={"tag_mil": "lse", "tag_cam": "GradCAM", "tag_cam_layer": "model.encoder.layer3",
                                           "tag_refine": "none"})
REGIMES["tags_cam_rw"] = Regime(_TAGS, ("tags",), callbacks=_REFRESH,
                                model_kwargs={"tag_mil": "lse", "tag_cam": "GradCAM",
                                              "tag_cam_layer": "model.encoder.layer3", "tag_refine": "random_walk",
                                              "tag_refine_kwargs": _TAG_RW})
REGIMES["tags_cam_crf"] = Regime(_TAGS, ("tags",), callbacks=_REFRESH,
                                 model_kwargs={"tag_mil": "lse", "tag_cam": "GradCAM",
                                               "tag_cam_layer": "model.encoder.layer3", "tag_refine": "crf"})
