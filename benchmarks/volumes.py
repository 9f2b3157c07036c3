"""Per-volume quality on ACDC volumes: train on 2D slices split by patient, score each validation volume in 3D.

    python benchmarks/volumes.py --data ../shared/data --regimes full,pce,pce_tv,mask10_scribble90 --epochs 20 --image-size 128

reads ``<data>/acdc_volumes`` (``images/``, ``labels/``, ``scribbles/`` as ``<patientNNN_frameNN>.nii.gz``;
../shared/data/README.md), trains every regime with the same model, split, image size, epochs and seed, validates,
and writes ``benchmarks/results/acdc_volumes.json`` (``--tag`` changes the name): per row the per-volume scores of
the WSL4MIS scribble table — mean 3D Dice per volume over RV / Myo / LV (``volume_dice``, per class
``volume_dice_<c>``) and HD95 per volume (``volume_hd95``, voxels: the ACDC headers carry no spacing), medpy's
convention (:mod:`lightning_weakseg.volume_metrics`) — beside the slice-level Dice / IoU / HD95 of the other
result files, the config and overrides, the command line and the settings. A markdown table with
"volume Dice / full" is printed at the end.

Regimes (configs of ``configs/``):

* ``full`` — full masks, CE (``volumes_full``);
* ``pce`` — the real scribbles, partial cross-entropy alone (``volumes_scribbles`` with ``scribble_terms=[pce]``);
* ``pce_tv`` — partial CE + the total-variation regulariser (``volumes_scribbles``); ``pce_crf``, ``pce_entropy``
  swap in the gated CRF or the entropy term;
* ``mask10_scribble90`` — 10 % of the training slices with full masks, 90 % with scribbles (``volumes_mixed``).

Published reference (WSL4MIS technical report, 5-fold, UNet at 256², mean 3D Dice over RV / Myo / LV): partial CE
0.686, best scribble method 0.872, full masks 0.898. This benchmark has one split (``--val-fraction`` of the
patients) and a CPU-sized budget: compare the ratios, not the absolute values.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
REGIMES: dict[str, tuple[str, dict]] = {
    "full": ("volumes_full", {}),
    "pce": ("volumes_scribbles", {"model": {"scribble_terms": ["pce"], "loss_weights": {"scribble/pce": 1.0}}}),
    "pce_tv": ("volumes_scribbles", {}),
    "pce_crf": ("volumes_scribbles", {"model": {"scribble_terms": ["pce", "crf"],
                                                "loss_weights": {"scribble/pce": 1.0}}}),
    "pce_entropy": ("volumes_scribbles", {"model": {"scribble_terms": ["pce", "entropy"],
                                                    "loss_weights": {"scribble/pce": 1.0}}}),
    "mask10_scribble90": ("volumes_mixed", {}),
}
LOGGING_CALLBACKS = ("SegmentationImageLogger",)


def _epoch_printer(name: str):
    import lightning as L

    class EpochPrinter(L.Callback):
        """One line per epoch (the benchmark runs without progress bars)."""

        def __init__(self):
            self.t0 = time.time()

        def on_train_epoch_end(self, trainer, pl_module):
            m = trainer.callback_metrics
            loss = float(m.get("train/loss_epoch", m.get("train/loss", float("nan"))))
            vol = m.get("val/volume_dice")
            val = f" val/volume_dice={float(vol):.4f}" if vol is not None else ""
            print(f"  acdc_volumes/{name} epoch {trainer.current_epoch}: train/loss={loss:.4f}{val} "
                  f"({time.time() - self.t0:.0f} s)", flush=True)

    return EpochPrinter()


def run_regime(root: str, name: str, *, epochs: int, image_size: int, batch_size: int, seed: int, arch: str,
               encoder: str, lr: float, val_fraction: float, empty_slice_rate: float, val_every: int,
               data: dict | None = None, data_class=None) -> dict:
    """Train regime ``name`` on the volumes of ``root`` and return its result row; ``data``: more data-module
    options (over the recipe's); ``data_class``: the data module's class (default ``WeakSegDataModule``)."""
    import lightning as L
    from lightning_weakseg.data import WeakSegDataModule
    from lightning_weakseg.recipes import load_recipe

    config, overrides = REGIMES[name]
    L.seed_everything(seed, verbose=False)
    recipe = load_recipe(config, overrides)
    data = {**recipe.data, "root": root, "image_size": image_size, "batch_size": batch_size,
            "eval_batch_size": 2 * batch_size, "seed": seed, "val_fraction": val_fraction, "test_fraction": 0.0,
            "empty_slice_rate": empty_slice_rate, **(data or {})}
    dm = (data_class or WeakSegDataModule)(**data)
    dm.setup("fit")
    model = recipe.build_model(arch=arch, encoder=encoder, in_channels=dm.in_channels, num_classes=dm.num_classes,
                               lr=lr)
    callbacks = recipe.build_callbacks(skip=LOGGING_CALLBACKS) + [_epoch_printer(name)]
    trainer = L.Trainer(max_epochs=epochs, accelerator="auto", devices=1, logger=False, enable_checkpointing=False,
                        callbacks=callbacks, enable_model_summary=False, enable_progress_bar=False,
                        num_sanity_val_steps=0, check_val_every_n_epoch=val_every)
    t0 = time.time()
    trainer.fit(model, dm)
    seconds = time.time() - t0
    res = trainer.validate(model, dm, verbose=False)[0]
    full = dm.full_dataset
    fractions = recipe.data.get("label_fractions")
    labels = tuple(fractions) if fractions else recipe.train_labels
    return {"dataset": "acdc_volumes", "regime": name, "labels": "+".join(labels), "label_fractions": fractions,
            "config": f"configs/{config}.yaml", "overrides": overrides, "seconds": round(seconds, 1),
            "n_train": len(dm.train_dataset), "n_val": len(dm.val_dataset),
            "n_val_volumes": len({full.volume_of(i) for i in dm.val_dataset.indices}),
            "n_train_volumes": len({full.volume_of(i) for i in dm.train_dataset.indices}),
            **{k.split("/", 1)[1]: float(v) for k, v in sorted(res.items()) if k.startswith("val/")}}


def table(payload: dict) -> str:
    rows = payload["rows"]
    ref = next((r["volume_dice"] for r in rows if r["regime"] == "full"), None)
    lines = ["| regime | train labels | volume Dice | RV / Myo / LV | volume HD95 (voxels) | slice Dice | "
             "volume Dice / full |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        per = " / ".join(f"{r.get(f'volume_dice_{c}', float('nan')):.3f}" for c in (1, 2, 3))
        ratio = f"{r['volume_dice'] / ref:.3f}" if ref else "—"
        lines.append(f"| {r['regime']} | {r['labels']} | {r['volume_dice']:.3f} | {per} | {r['volume_hd95']:.1f} | "
                     f"{r.get('dice', float('nan')):.3f} | {ratio} |")
    return "\n".join(lines)


def write_json(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload, indent=1))
    tmp.replace(path)


def budget_arguments(p: argparse.ArgumentParser, *, regimes: str, known: dict, tag: str) -> None:
    """The options every per-volume benchmark shares: data, regimes, the training budget, the result file."""
    p.add_argument("--data", required=True, help="folder holding acdc_volumes/")
    p.add_argument("--regimes", default=regimes, help=f"comma-separated, from {sorted(known)}")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--arch", default="Unet")
    p.add_argument("--encoder", default="resnet18")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--val-fraction", type=float, default=0.2, help="share of the patients validated on")
    p.add_argument("--val-every", type=int, default=1, help="validate every N epochs (the row's scores are always a "
                   "full validation after training)")
    p.add_argument("--tag", default=tag, help="result file name (benchmarks/results/<tag>.json)")
    p.add_argument("--out", default=str(RESULTS), help="folder of the result file")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    budget_arguments(p, regimes="full,pce,pce_tv,mask10_scribble90", known=REGIMES, tag="acdc_volumes")
    p.add_argument("--empty-slice-rate", type=float, default=1.0, help="share of the training slices without "
                   "foreground kept")
    a = p.parse_args(argv)
    root = Path(a.data) / "acdc_volumes"
    if not root.is_dir():
        p.error(f"{root} does not exist (see ../shared/data/README.md)")
    names = [n.strip() for n in a.regimes.split(",") if n.strip()]
    unknown = [n for n in names if n not in REGIMES]
    if unknown:
        p.error(f"unknown regimes {unknown}; known: {sorted(REGIMES)}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(a.threads)
    settings = {"dataset": "acdc_volumes", "max_train": None,
                **{k: v for k, v in vars(a).items() if k not in ("data", "tag", "out", "regimes")}}
    payload = {"command": "python benchmarks/volumes.py " + " ".join(argv if argv is not None else sys.argv[1:]),
               "settings": settings, "machine": f"{platform.node()} {platform.processor()} "
               f"threads={torch.get_num_threads()} cuda={torch.cuda.is_available()}",
               "started": time.strftime("%Y-%m-%d %H:%M"), "rows": []}
    path = Path(a.out) / f"{a.tag}.json"
    for name in names:
        row = run_regime(str(root), name, epochs=a.epochs, image_size=a.image_size, batch_size=a.batch_size,
                         seed=a.seed, arch=a.arch, encoder=a.encoder, lr=a.lr, val_fraction=a.val_fraction,
                         empty_slice_rate=a.empty_slice_rate, val_every=a.val_every)
        row["command"] = payload["command"]
        payload["rows"].append(row)
        write_json(path, payload)  # after every regime: a killed run keeps what it did
        print(f"[acdc_volumes] {name}: volume_dice={row['volume_dice']:.4f} volume_hd95={row['volume_hd95']:.2f} "
              f"({row['seconds']:.0f} s)", flush=True)
    print(table(payload))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
