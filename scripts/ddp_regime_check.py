"""Train each regime with 1 CPU process and with 2 DDP processes (gloo) and write what tests/test_ddp.py compares.

    python scripts/ddp_regime_check.py --out /tmp/ddp                     # every case
    python scripts/ddp_regime_check.py --out /tmp/ddp --case boxes uneven

For every case and variant (``d1``: one process, global batch B; ``d2``: ``strategy="ddp"``, 2 processes of B/2)
it writes ``<out>/<case>/<variant>/``:

* ``weights_rank<r>.pt`` — each rank's final ``state_dict``;
* ``records_rank<r>.pt`` — per training step: the raw indices this rank saw, every loss term, for co-teaching the
  selected pixels of both networks; plus the callbacks' ``state_dict`` (t, keep ratio, pseudo round + labels);
* ``metrics.json`` (rank 0) — the validation metrics.

All one-process runs come first, then the DDP runs: Lightning's launcher re-runs this script for rank 1 (with
``LOCAL_RANK`` set), that process skips the one-process runs, and both processes walk the DDP runs in the same
order (the process group stays up between fits).

Runs are in float64 by default (``--precision 64-true``): the only differences left between 1 and 2 processes are
summation orders (~1e-15), so no argmax flips on an undecided pixel; ``--precision 32-true`` shows float32 drift.

Why the runs are comparable: norm layers are GroupNorm (``norm="group"``; BatchNorm statistics would be per rank
and SyncBatchNorm has no CPU kernel), no shuffle, no augmentation, seeded initialisation. ``DistributedSampler``
(``shuffle=False``) deals the samples round-robin, so step k of the DDP run sees on its two ranks exactly the
samples of step k of the one-process run. Uneven sizes: the sampler pads the data set to a multiple of the world
size by repeating its first samples, so every rank holds the same number of samples and batches; the ``uneven``
case checks that the DDP run equals a one-process run on that padded order (variant ``d1_padded``).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import types
from pathlib import Path

IS_DDP_CHILD = "LOCAL_RANK" in os.environ  # set by Lightning's launcher for ranks > 0 only
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lightning as L  # noqa: E402
import torch  # noqa: E402

import lightning_weakseg.metrics as _metrics  # noqa: E402
import lightning_weakseg.regimes.coteaching as _coteaching_regime  # noqa: E402
import lightning_weakseg.regimes.tags as _tags_regime  # noqa: E402
from lightning_weakseg.data import WeakSegDataModule  # noqa: E402

# timm encoders drop the stages that encoder_depth leaves out; SMP's own resnet18 keeps layer3/4 unused, which
# DDP rejects without find_unused_parameters
ENCODER, SMALL = "tu-resnet18", {"encoder_depth": 3, "decoder_channels": [16, 8, 4]}
CB = "lightning_weakseg.callbacks"

# name -> what to train. module/callbacks are "pkg.mod:Name" strings so that every run builds fresh objects.
# A new regime is one line here (and then one entry in tests/test_ddp.py's REGIMES list).
CASES: dict[str, dict] = {
    "plain": dict(module="lightning_weakseg:WeakSegModule", kind="organ", labels=["mask"], kwargs={"dice_weight": 1.0}),
    "boxes": dict(module="lightning_weakseg.regimes:BoxSegModule", kind="organ", labels=["boxes"],
                  callbacks=[(f"{CB}:LogBarrierSchedule", {"t0": 5.0, "mu": 1.5})]),
    "points": dict(module="lightning_weakseg.regimes:PointSegModule", kind="nuclei", labels=["points"],
                   kwargs={"point_refine": "crf", "point_confidence": 0.55},
                   callbacks=[(f"{CB}:PseudoLabelRefresh", {"every_n_epochs": 1, "batch_size": 3})]),
    "coteaching": dict(module="lightning_weakseg.regimes:CoTeachingSegModule", kind="organ", labels=["noisy_mask"],
                       kwargs={"forget_rate": 0.5, "num_gradual": 1, "selection": "pixel"},
                       callbacks=[(f"{CB}:ForgetRateSchedule", {})]),
    # one forget rate per class (class-balanced pixel selection) and the experimental peer-relabelling terms from
    # the first epoch
    "coteaching_pc": dict(module="lightning_weakseg.regimes:CoTeachingSegModule", kind="organ", labels=["noisy_mask"],
                          kwargs={"forget_rate": [0.1, 0.5, 0.4, 0.3], "num_gradual": 1, "selection": "pixel",
                                  "experimental": {"relabel_rejected": True, "relabel_start_epoch": 0}},
                          callbacks=[(f"{CB}:ForgetRateSchedule", {})]),
    # per-sample selection ranked by each network's per-image Dice loss (the default): images are the items, global
    # over ranks
    "coteaching_dice": dict(module="lightning_weakseg.regimes:CoTeachingSegModule", kind="organ",
                            labels=["noisy_mask"], kwargs={"forget_rate": 0.5, "num_gradual": 1, "selection": "sample"},
                            callbacks=[(f"{CB}:ForgetRateSchedule", {})]),
    "robust": dict(module="lightning_weakseg.regimes:RobustSegModule", kind="organ", labels=["noisy_mask"],
                   kwargs={"robust_loss": "sce"}),
    "scribbles": dict(module="lightning_weakseg.regimes:ScribbleSegModule", kind="organ", labels=["scribble"],
                      kwargs={"scribble_self_training": True, "scribble_confidence": 0.3},
                      callbacks=[(f"{CB}:PseudoLabelRefresh", {"every_n_epochs": 1})]),
    "mixed": dict(module="lightning_weakseg.regimes:MixedSegModule", kind="organ", labels=["mask"],
                  data={"label_fractions": {"mask": 0.25, "boxes": 0.25, "points": 0.25, "scribble": 0.25}},
                  kwargs={"scribble_terms": ["pce", "crf"]},
                  callbacks=[(f"{CB}:LogBarrierSchedule", {"t0": 5.0, "mu": 1.5}),
                             (f"{CB}:PseudoLabelRefresh", {"every_n_epochs": 1})]),
    "tags": dict(module="lightning_weakseg.regimes:TagSegModule", kind="organ", labels=["tags"],
                 kwargs={"tag_fg_threshold": 0.3}, callbacks=[(f"{CB}:PseudoLabelRefresh", {"every_n_epochs": 1})]),
    # 15 training samples: DistributedSampler pads to 16 by repeating the first one on rank 1; 5 validation
    # samples: the evaluation shards are evened out with a flagged filler that the metrics leave out
    "uneven": dict(module="lightning_weakseg:WeakSegModule", kind="organ", labels=["mask"], n_samples=20,
                   data={"val_fraction": 0.25}, variants=("d1", "d1_padded", "d2"), kwargs={"scheduler": "none"}),
    # on_nonfinite="skip": the 6th training sample (dealt to rank 1 in step 0) gets a NaN loss in epoch 0 only;
    # every rank must skip that step together (one process skips the same global batch)
    "skip": dict(module="lightning_weakseg:WeakSegModule", kind="organ", labels=["mask"],
                 kwargs={"on_nonfinite": "skip"}, nan_position=5),
}


def _load(spec: str):
    mod, _, name = spec.partition(":")
    return getattr(__import__(mod, fromlist=[name]), name)


_LAST_SELECTION: dict = {}
_original_coteaching_losses = _coteaching_regime.coteaching_losses


def _recording_coteaching_losses(*args, **kwargs):
    res = _original_coteaching_losses(*args, **kwargs)
    _LAST_SELECTION.update(select_a=res["select_a"].detach().cpu(), select_b=res["select_b"].detach().cpu())
    return res


_coteaching_regime.coteaching_losses = _recording_coteaching_losses

def _float32_default(fn):
    """Run ``fn`` with float32 as the default dtype. Work-around for code that allocates with the default dtype
    (float64 under precision="64-true") and then stores float32 into it: metrics.hd95, ImageLevelMixin.tag_scores
    (reported; remove once fixed)."""
    def wrapped(*args, **kwargs):
        old = torch.get_default_dtype()
        torch.set_default_dtype(torch.float32)
        try:
            return fn(*args, **kwargs)
        finally:
            torch.set_default_dtype(old)
    return wrapped


_metrics.hd95 = _float32_default(_metrics.hd95)
_tags_regime.ImageLevelMixin.tag_scores = _float32_default(_tags_regime.ImageLevelMixin.tag_scores)


def _record_steps(model) -> list:
    """Wrap ``combine_terms`` of this instance: remember each training step's indices, terms and selections."""
    records: list = []
    original = model.combine_terms

    def combine_terms(self, terms, out, batch, stage):
        if stage == "train":
            rec = {"step": int(self.global_step), "index": batch["index"].detach().cpu().clone(),
                   "terms": {k: float(v.detach()) for k, v in terms.items()}}
            if _LAST_SELECTION:
                rec.update(_LAST_SELECTION)
                _LAST_SELECTION.clear()
            records.append(rec)
        return original(terms, out, batch, stage)

    model.combine_terms = types.MethodType(combine_terms, model)
    return records


def _poison(model, index: int) -> None:
    """Make ``seg/ce`` NaN in epoch 0 for the batch that holds sample ``index`` (on the rank that holds it)."""
    original = model.loss_terms

    def loss_terms(self, batch, out):
        terms = original(batch, out)
        if self.current_epoch == 0 and index in batch["index"].tolist():
            terms["seg/ce"] = terms["seg/ce"] * float("nan")
        return terms

    model.loss_terms = types.MethodType(loss_terms, model)


def run(case: str, variant: str, out: Path, args) -> None:
    spec = CASES[case]
    devices = 2 if variant == "d2" else 1
    L.seed_everything(0, verbose=False)
    data = {"val_fraction": 0.2, **spec.get("data", {})}
    dm = WeakSegDataModule(synthetic_kind=spec["kind"], n_samples=spec.get("n_samples", args.n_samples),
                           image_size=32, train_labels=spec["labels"], batch_size=args.global_batch // devices,
                           eval_batch_size=2, augment="none", shuffle=False, **data)
    dm.setup("fit")
    if variant == "d1_padded":  # what DistributedSampler(num_replicas=2, shuffle=False) deals out, in one process
        dm.setup("fit")
        idx = list(dm.train_dataset.indices)
        pad = (-len(idx)) % 2
        dm.train_dataset = dm.train_dataset.subset(idx + idx[:pad])
    cls = _load(spec["module"])
    in_ch = 3 if spec["kind"] == "nuclei" else 1
    n_cls = 2 if spec["kind"] == "nuclei" else 4
    model = cls(encoder=ENCODER, in_channels=in_ch, num_classes=n_cls, norm="group", lr=args.lr,
                model_kwargs=dict(SMALL), **spec.get("kwargs", {}))
    if spec.get("nan_position") is not None:
        _poison(model, int(dm.train_dataset.indices[spec["nan_position"]]))
    records = _record_steps(model)
    callbacks = [_load(name)(**kw) for name, kw in spec.get("callbacks", [])]
    trainer = L.Trainer(accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto",
                        max_epochs=args.epochs, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, deterministic=True, callbacks=callbacks,
                        precision=args.precision)
    trainer.fit(model, dm)
    rank = trainer.global_rank
    d = out / case / variant
    d.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, d / f"weights_rank{rank}.pt")
    torch.save({"records": records, "callbacks": {type(c).__name__: c.state_dict() for c in callbacks},
                "world_size": trainer.world_size, "train_size": len(dm.train_dataset), "val_size": len(dm.val_dataset),
                "optimizer_steps": int(model.global_step),
                "adamw_steps": sorted({float(v["step"]) for v in trainer.optimizers[0].state_dict()["state"].values()
                                       if "step" in v})}, d / f"records_rank{rank}.pt")
    if rank == 0:
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
        (d / "metrics.json").write_text(json.dumps(metrics, indent=1))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--case", nargs="+", default=list(CASES), choices=list(CASES))
    p.add_argument("--out", required=True)
    p.add_argument("--global-batch", type=int, default=8)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--precision", default="64-true",
                   help="64-true (default): rounding differences stay ~1e-15, no argmax flips; 32-true: as users run")
    p.add_argument("--n-samples", type=int, default=20, help="synthetic samples (20%% go to validation)")
    args = p.parse_args(argv)
    if args.global_batch % 2:
        p.error("--global-batch must be even (it is split over 2 processes)")
    torch.set_num_threads(1)
    out = Path(args.out)
    t0 = time.perf_counter()
    plan = [(c, v) for c in args.case for v in CASES[c].get("variants", ("d1", "d2"))]
    for case, variant in sorted(plan, key=lambda cv: cv[1] == "d2"):  # one-process runs first, then DDP
        if IS_DDP_CHILD and variant != "d2":
            continue
        run(case, variant, out, args)
    if not IS_DDP_CHILD:
        print(f"ddp_regime_check: {len(plan)} runs in {time.perf_counter() - t0:.1f} s -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
