"""Shared pieces of the quality benchmarks: the data sets, the regime registry, one training run.

A regime is a recipe of ``configs/`` plus explicit overrides (``Regime(config, overrides)``, read by
:func:`lightning_weakseg.recipes.load_recipe`): the config is the regime's recommended recipe, a variant states what
it changes, and the benchmark never reaches into a module. The benchmark's own settings win over the recipe's: the
architecture, encoder and learning rate (``--arch``, ``--encoder``, ``--lr``), the data set (the folder layout,
classes and channels of ``configs/data/<name>.yaml``, found under ``--data``), image size, batch, split, seed and
the simulated noise (``--noise``, ``--noise-fraction``). From the regime config's ``data:`` section only the labels
are taken (``train_labels``, ``label_fractions``, ``weakify`` without its noise); callbacks that only log images are
left out (the runs have no logger).

Every regime of one data set is trained with the same model, split, image size, epochs and seed, in one
invocation of ``benchmarks/run.py``, so that "weak / full" ratios compare like with like.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lightning_weakseg.recipes import Recipe, config_path, load_data_config, load_recipe
from noisy_regimes import NOISY_REGIMES

# the real data sets (../shared/data/README.md): configs/data/<name>.yaml, their root's last folder under --data
DATASETS: dict[str, dict[str, Any]] = {name: load_data_config(name) for name in ("kvasir", "acdc", "dsb2018")}
LABEL_KEYS = ("train_labels", "label_fractions", "weakify")  # what a regime config's data section contributes
NOISE_KEYS = ("noise_rate", "noise_fraction")  # the benchmark's --noise / --noise-fraction, not the recipe's
LOGGING_CALLBACKS = ("SegmentationImageLogger",)


@dataclass(frozen=True)
class Regime:
    """One way of training: a config of ``configs/`` (name or path) and the overrides of this row
    (:meth:`lightning_weakseg.recipes.Recipe.with_overrides`), plus what the benchmark measures besides Dice."""
    config: str
    overrides: dict = field(default_factory=dict)
    pseudo_from_boxes: str | None = None  # train on pseudo-masks made from the boxes by this method before fit
    instances: bool = False  # evaluate object F1 / AJI too (nuclei)
    pseudo_eval: bool = False  # score the model's own pseudo labels (make_pseudo_labels) on the validation set
    # ... and those of other CAM methods / refinements on the same trained model: ((tag_cam, tag_refine), ...)
    pseudo_variants: tuple[tuple[str, str], ...] = ()

    @property
    def path(self) -> Path:
        return config_path(self.config)

    def recipe(self) -> Recipe:
        return load_recipe(self.config, self.overrides)

    @property
    def label_fractions(self) -> dict[str, float] | None:
        return self.recipe().data.get("label_fractions")

    @property
    def labels(self) -> tuple[str, ...]:
        """The label keys the training split carries (those of ``label_fractions`` when it mixes)."""
        fractions = self.label_fractions
        return tuple(fractions) if fractions else self.recipe().train_labels


BARRIER = {"LogBarrierSchedule": {}}
NO_BARRIER = {"LogBarrierSchedule": None}
TAG_RW = {"radius": 5, "sigma_rgb": 0.08, "beta": 8.0, "iterations": 48, "downscale": 2}
REFRESH_TAGS = {"PseudoLabelRefresh": {"every_n_epochs": 2, "start_epoch": 4}}
BOXES_PAPER = {"loss_weights": None}  # the tightness and size terms at weight 1 (configs/boxes.yaml: 0.3)
X10 = {"box/tightness": 10.0, "box/size": 10.0}
# points: configs/points.yaml is for 64-px synthetic nuclei (scale 0.4, CRF from epoch 5); the DSB2018 rows use the
# CRF term from the start and the cluster-label scale of each row
POINTS = {"point_crf_start_epoch": 0, "point_cluster_kwargs": None}
CENTROID = {"weakify": {"point_mode": "centroid"}}
# the cluster-label lengths of Qu et al. (erosion 7, dilation 5, margins 10, min size 30 px) are for 40x histology
# with nuclei of radius ~9 px; DSB2018 resized to 128 px has a median nucleus radius of 3.1 px, so scale =
# 3.1 / 9 = 0.35 (the rule in cluster_labels' docstring; python benchmarks/point_label_quality.py)
S035 = {"point_crf_start_epoch": 0, "point_cluster_kwargs": {"scale": 0.35}}
# tags: configs/tags.yaml is MIL alone; the CAM rows add the classification head, Grad-CAM at stride 16 and a
# pseudo-label refresh every 2 epochs from epoch 4
CAM = {"tag_mil_kwargs": None, "tag_cls": True, "tag_pseudo_source": "cam", "tag_cam": "GradCAM",
       "tag_cam_layer": "model.encoder.layer3", "tag_refine": "none"}
CAMS = ("CAM", "GradCAM", "GradCAMPlusPlus", "XGradCAM", "LayerCAM", "HiResCAM", "EigenCAM")
CAM_VARIANTS = tuple((c, r) for c in CAMS for r in ("none", "crf", "random_walk"))
MIXED_TAGS = {"label_fractions": {"mask": 0.1, "tags": 0.9}}

REGIMES: dict[str, Regime] = {
    "full": Regime("full"),
    # full masks with CE + soft Dice: plain CE on 64-px Kvasir tiles is slow to leave the all-background solution
    "full_dice": Regime("full", {"model": {"dice_weight": 1.0}}),
    # boxes: the tightness prior (configs/boxes.yaml), then the paper's weights and tuned variants. Kvasir polyps fill
    # ~0.75 of their box, so the lower size bound 0.5 lets the network under-fill it; 3-line bands suit 64-px images;
    # the constraint terms pull each pixel of a box ~5x less than the emptiness CE pulls the pixels outside
    "boxes": Regime("boxes", {"model": BOXES_PAPER}),
    "boxes_x03": Regime("boxes"),
    "boxes_s70": Regime("boxes", {"model": {**BOXES_PAPER, "box_size_bounds": [0.7, 0.9]}}),
    "boxes_w3_s70": Regime("boxes", {"model": {**BOXES_PAPER, "box_size_bounds": [0.7, 0.9], "box_band_width": 3}}),
    "boxes_x10": Regime("boxes", {"model": {"loss_weights": X10}}),
    "boxes_x10_s60": Regime("boxes", {"model": {"loss_weights": X10, "box_size_bounds": [0.6, 0.9]}}),
    "boxes_mu13": Regime("boxes", {"model": BOXES_PAPER, "callbacks": {"LogBarrierSchedule": {"mu": 1.3}}}),
    # masks made from the boxes, then plain CE
    "box_mask": Regime("full", {"model": {"mask_key": "pseudo"}, "data": {"train_labels": ["boxes"]}},
                       pseudo_from_boxes="box"),
    "grabcut": Regime("full", {"model": {"mask_key": "pseudo"}, "data": {"train_labels": ["boxes"]}},
                      pseudo_from_boxes="grabcut"),
    # points
    "points_centroid": Regime("points", {"model": POINTS, "data": CENTROID}, instances=True),
    "points_click": Regime("points", {"model": POINTS}, instances=True),
    "points_centroid_s035": Regime("points", {"model": S035, "data": CENTROID}, instances=True),
    "points_click_s035": Regime("points", {"model": S035}, instances=True),
    # the self-training stage: from epoch 5 the cluster labels are replaced by the model's own CRF-refined
    # predictions (confident pixels only), refreshed every 2 epochs
    "points_centroid_s035_st": Regime("points", {"model": S035, "data": CENTROID, "callbacks": {
        "PseudoLabelRefresh": {"every_n_epochs": 2, "start_epoch": 5}}}, instances=True),
    # scribbles (ACDC carries real ones: configs/data/acdc.yaml)
    "pce": Regime("scribbles", {"model": {"scribble_terms": ["pce"]}}),
    "pce_entropy": Regime("scribbles", {"model": {"scribble_terms": ["pce", "entropy"]}}),
    "pce_crf": Regime("scribbles", {"model": {"scribble_terms": ["pce", "crf"]}}),
    "pce_tv": Regime("scribbles", {"model": {"scribble_terms": ["pce", "tv"]}}),
    "pce_crf_entropy": Regime("scribbles"),
    # mixed supervision (configs/mixed.yaml: 10 % masks + 90 % boxes)
    "mask10_boxes90": Regime("mixed"),
    "mask10_tags90": Regime("mixed", {"data": MIXED_TAGS, "callbacks": NO_BARRIER}),
    # ACDC tags are nearly all-ones (most slices hold RV, Myo and LV): smooth MIL pooling (LSE) on 90 % of the
    # images then floods every class; max pooling only touches each class's most confident pixel
    "mask10_tags90_max": Regime("mixed", {"model": {"tag_mil": "max"}, "data": MIXED_TAGS, "callbacks": NO_BARRIER}),
    # the baseline both tag mixes must beat: the same 10 % masks, the tags' term switched off (weight 0)
    "mask10_only": Regime("mixed", {"model": {"loss_weights": {"tags/mil": 0.0}}, "data": MIXED_TAGS,
                                    "callbacks": NO_BARRIER}),
    "all_points": Regime("mixed", {"data": {"label_fractions": None, "train_labels": ["points"]},
                                   "callbacks": NO_BARRIER}, instances=True),
    "all_boxes": Regime("mixed", {"data": {"label_fractions": None, "train_labels": ["boxes"]}}),
    # image-level tags: ACDC class presence per slice (Kvasir: every image holds a polyp, tags need tiles)
    "tags_mil": Regime("tags", pseudo_eval=True),
    # top-k pooling: a tagged Kvasir tile is ~25 % polyp, so the mean of the top 20 % of the log-odds asks for an
    # extent; LSE (r = 5) is satisfied by a small confident blob
    "tags_mil_topk20": Regime("tags", {"model": {"tag_mil": "topk", "tag_mil_kwargs": {"k": 0.2}}}, pseudo_eval=True),
    # MIL + the gated CRF loss: MIL fixes that a polyp is in the tile, the CRF term where its edges are
    "tags_mil_crf": Regime("tags", {"model": {"tag_crf": True}}, pseudo_eval=True),
    # MIL + size bounds (Kervadec et al. 2019, tags + a size prior under the log-barrier): a tagged 64-px Kvasir tile
    # is 0.014 to 0.51 polyp (10th / 90th percentiles over the 2971 tagged tiles of all 998 masks at 128 px: a prior
    # an annotator could state, not tuned on the validation Dice)
    "tags_mil_size": Regime("tags", {"model": {"tag_size_bounds": [0.014, 0.51]}, "callbacks": BARRIER},
                            pseudo_eval=True),
    "tags_cam": Regime("tags", {"model": CAM, "callbacks": REFRESH_TAGS}, pseudo_eval=True,
                       pseudo_variants=CAM_VARIANTS),
    "tags_cam_rw": Regime("tags", {"model": {**CAM, "tag_refine": "random_walk", "tag_refine_kwargs": TAG_RW},
                                   "callbacks": REFRESH_TAGS}, pseudo_eval=True),
    "tags_cam_crf": Regime("tags", {"model": {**CAM, "tag_refine": "crf"}, "callbacks": REFRESH_TAGS},
                           pseudo_eval=True),
    # noisy masks: benchmarks/noisy_regimes.py (the noise rate comes from --noise)
    **{name: Regime(config, overrides) for name, (config, overrides) in NOISY_REGIMES.items()},
}


def data_spec(data_root: str, dataset: str) -> dict[str, Any]:
    """``WeakSegDataModule`` arguments of a data set: its data config, the root under ``data_root``."""
    spec = dict(DATASETS[dataset])
    spec["root"] = os.path.join(data_root, Path(spec["root"]).name)
    return spec


def label_args(recipe: Recipe, noise: float | None = None, noise_fraction: float = 1.0) -> dict[str, Any]:
    """The data arguments a regime contributes (its labels), with the benchmark's simulated noise."""
    args = {k: recipe.data[k] for k in LABEL_KEYS if k in recipe.data}
    weak = {k: v for k, v in (args.pop("weakify", None) or {}).items() if k not in NOISE_KEYS}
    if noise is not None:
        weak["noise_rate"] = noise
    if noise_fraction != 1.0:
        weak["noise_fraction"] = noise_fraction
    return {**args, "weakify": weak}


def _box_pseudo(dm, method: str) -> None:
    from lightning_weakseg.pseudo import pseudo_labels_from_boxes
    dm.train_dataset.set_pseudo_labels(pseudo_labels_from_boxes(dm.train_eval_dataloader(), method=method))


def with_hparams(model, **changes):
    """A fresh module of the same class whose hyper-parameters differ by ``changes``, with ``model``'s weights."""
    other = type(model)(**{**dict(model.hparams), **changes})
    other.load_state_dict(model.state_dict())
    return other.to(model.device)


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


def _native_scores(trainer, model, dm) -> dict[str, float]:
    """The validation split scored at each image's own resolution (the test path of ``WeakSegModule``: the
    prediction mapped back to the file's height × width against the original mask): ``native_dice``,
    ``native_iou``, ``native_hd95`` and per class. Empty for data without native masks (synthetic)."""
    res = trainer.test(model, dataloaders=dm.val_dataloader(), verbose=False)[0]
    if not any(k.endswith("_train_size") for k in res):  # no native masks: nothing beyond the validation scores
        return {}
    return {f"native_{k.split('/', 1)[1]}": float(v) for k, v in res.items()
            if k.startswith("test/") and not k.endswith("_train_size") and k != "test/ce"}


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
    recipe = regime.recipe()
    spec = data_spec(data_root, dataset)
    dm = WeakSegDataModule(**spec, **label_args(recipe, noise, noise_fraction), image_size=image_size,
                           batch_size=batch_size, seed=seed, max_train_samples=max_train,
                           eval_batch_size=2 * batch_size, tiles=tiles, tile_eval=tile_eval)
    dm.setup("fit")
    if regime.pseudo_from_boxes is not None:
        _box_pseudo(dm, regime.pseudo_from_boxes)
    model = recipe.build_model(arch=arch, encoder=encoder, in_channels=dm.in_channels, num_classes=dm.num_classes,
                               lr=lr)
    callbacks = recipe.build_callbacks(skip=LOGGING_CALLBACKS) + [EpochPrinter(f"{dataset}/{name}")]
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
           "label_fractions": recipe.data.get("label_fractions"),
           "config": str(Path("configs") / recipe.path.name), "overrides": regime.overrides,
           "n_train": len(dm.train_dataset), "n_val": len(dm.val_dataset),
           **{k.split("/", 1)[1]: float(v) for k, v in res.items() if k.startswith("val/") and "_" not in k[4:]},
           **{k.split("/", 1)[1]: float(v) for k, v in res.items() if k.startswith("val/dice_")}}
    row.update(_native_scores(trainer, model, dm))
    if regime.instances or spec.get("instance_dir"):  # every regime on an instance data set, full masks too
        row.update(_instance_scores(model, dm))
    if regime.pseudo_eval:
        row.update(_pseudo_scores(model, dm))
        variants = {}
        for cam, refine in regime.pseudo_variants:
            t0 = time.time()
            try:  # the same trained weights, another CAM method / refinement
                variant = with_hparams(model, tag_cam=cam, tag_refine=refine, tag_pseudo_source="cam",
                                       tag_refine_kwargs=dict(TAG_RW) if refine == "random_walk" else {},
                                       # class activation mapping needs the layer the classification head pools
                                       **({"tag_cam_layer": "model.encoder.layer4"} if cam == "CAM" else {}))
                variants[f"{cam}+{refine}"] = {**_pseudo_scores(variant, dm), "seconds": round(time.time() - t0, 1)}
            except Exception as e:  # noqa: BLE001 - one variant failing must not lose the run; say why
                variants[f"{cam}+{refine}"] = {"error": f"{type(e).__name__}: {e}"[:300]}
        if variants:
            row["pseudo_variants"] = variants
    return row


def write_json(path: str | Path, payload: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload, indent=1))
    tmp.replace(path)
