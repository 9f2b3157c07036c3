"""Semi-supervised regimes on ACDC volumes: a few labelled patients, the rest unlabelled; per-volume 3D Dice.

    python benchmarks/semi.py --data ../shared/data --regimes mask10,mt_mask10,cps_mask10 --epochs 20 --image-size 128

The same runner, split (by patient), model, image size, epochs and seed as ``benchmarks/volumes.py`` (whose
functions this uses; its ``full`` row is full supervision on every training patient). The labelled share is drawn
per patient (``label_by_group``: every slice of a patient carries the same label type); the other patients' slices
carry no label (``"none"``) and stay in the batches, so every row takes the same optimizer steps on the same images.
By default a batch is drawn from all slices alike (about one labelled slice in ten); ``--labelled-share 0.5`` makes
every batch half labelled, the labelled slices drawn again as they run out (the two-stream batches of the published
semi-supervised protocol, ``WeakSegDataModule(labelled_share=...)``), with as many steps an epoch:

* ``mask10`` / ``mask5`` — 10 % / 5 % of the patients with masks, CE; the unlabelled slices contribute nothing
  (the semi-supervised rows without their term);
* ``mt_mask10`` / ``mt_mask5`` — the same + mean teacher (``configs/semi_mean_teacher.yaml``, the consistency
  weighted 1.0);
* ``cps_mask10`` / ``cps_mask5`` — the same + cross pseudo supervision (``configs/semi_cps.yaml``) at the paper's
  λ = 1.5 (:data:`LAMBDA`, :func:`unlabelled_weight`);
* ``<row>_ssl4mis`` for the four rows above — the same at SSL4MIS's weight, λ = 0.1;
* ``oracle_mask10`` / ``oracle_mask5`` — a bound, not a method: the ``_ssl4mis`` mean-teacher row with the true
  mask of every slice as the consistency target (a perfect teacher; ``oracle.OracleTeacherSegModule``, the same
  batches, weight and ramp-up);
* ``scribble10`` — 10 % of the patients with their real scribbles (partial CE + TV), the rest unlabelled;
  ``mt_scribble10`` — the same + mean teacher (a module of ScribbleMixin and MeanTeacherMixin).

Published reference (SSL4MIS, ACDC, 2D UNet, mean Dice; full ≈ 0.91): 10 % labelled — UA-MT 0.819, MC-Net+
0.868; 5 % — UA-MT 0.512, MC-Net+ 0.635, DGCL 0.806. Writes ``benchmarks/results/<tag>.json`` (default
``semi``) and prints the table of ``benchmarks/volumes.py`` (volume Dice / full when a ``full`` row is present;
``--full-from`` takes that row from another result file of the same budget).
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
import volumes  # noqa: E402

RESULTS = volumes.RESULTS
_BY_PATIENT = {"label_by_group": True}


def _fractions(label: str, share: float, **data) -> dict:
    return {"data": {**_BY_PATIENT, "label_fractions": {label: share, "none": round(1.0 - share, 6)}, **data}}


_MT_WEIGHT = {"model": {"loss_weights": {"semi/consistency": 1.0}}}  # the mean-teacher rows without a λ
_SCRIBBLE_TERMS = {"scribble_terms": ["pce", "tv"], "loss_weights": {"scribble/pce": 1.0, "scribble/tv": 0.1}}
REGIMES: dict[str, tuple[str, dict]] = {
    "mask10": ("volumes_full", _fractions("mask", 0.1)),
    "mask5": ("volumes_full", _fractions("mask", 0.05)),
    "mt_mask10": ("semi_mean_teacher", {**_fractions("mask", 0.1), **_MT_WEIGHT}),
    "mt_mask5": ("semi_mean_teacher", {**_fractions("mask", 0.05), **_MT_WEIGHT}),
    "cps_mask10": ("semi_cps", _fractions("mask", 0.1)),
    "cps_mask5": ("semi_cps", _fractions("mask", 0.05)),
    "scribble10": ("volumes_scribbles", {**_fractions("scribble", 0.1), "model": dict(_SCRIBBLE_TERMS)}),
    "mt_scribble10": ("semi_mean_teacher", {
        **_fractions("scribble", 0.1, scribble_dir="scribbles"),
        "class_path": "lightning_weakseg.regimes.mean_teacher:ScribbleMeanTeacherSegModule",
        "model": {**_SCRIBBLE_TERMS, "loss_weights": {**_SCRIBBLE_TERMS["loss_weights"], "semi/consistency": 1.0}}}),
}


for _name in ("mt_mask10", "mt_mask5", "cps_mask10", "cps_mask5"):  # the same at SSL4MIS's weight (LAMBDA)
    REGIMES[f"{_name}_ssl4mis"] = REGIMES[_name]
for _share in (0.1, 0.05):  # the perfect teacher: the true masks of the unlabelled slices ride under noisy_mask
    _oracle = _fractions("mask", _share)
    _oracle["data"]["label_fractions"] = {"mask": _share, "noisy_mask": round(1.0 - _share, 6)}
    _oracle["data"]["weakify"] = {"noise_rate": 0.0}
    REGIMES[f"oracle_mask{round(_share * 100)}"] = ("semi_mean_teacher", {
        **_oracle, "class_path": "oracle:OracleTeacherSegModule"})
ORACLE_DATA = {n: "oracle:OracleTeacherDataModule" for n in REGIMES if n.startswith("oracle_")}

# λ, the weight of the unlabelled term against the supervised one, each a mean over its own samples: CPS 1.5
# (Chen et al., CVPR 2021, with ImageNet-initialised networks); SSL4MIS's ACDC runs (from random initialisation)
# 0.1 for both the mean teacher and CPS (the recipes' weights). The mean-teacher rows without a λ weigh their
# consistency 1.0.
LAMBDA = {"cps_mask10": 1.5, "cps_mask5": 1.5,
          **{n: 0.1 for n in REGIMES if n.endswith("_ssl4mis") or n.startswith("oracle_")}}


def unlabelled_weight(config: str, lam: float, share: float) -> dict:
    """The loss weight that puts ``lam`` between the unlabelled term and the supervised one when a share ``share``
    of the batch is labelled: every term is a mean over the whole batch (docs/regimes/semi.md), so the supervised
    term carries ``share``, the consistency of every sample 1 and CPS on the unlabelled pixels ``1 − share``."""
    if config == "semi_cps":
        return {"semi/cps": round(lam * share / (1.0 - share), 4)}
    return {"semi/consistency": round(lam * share, 4)}


def _register(labelled_share: float | None = None) -> None:
    """The rows run through ``benchmarks/volumes.run_regime``, which looks regimes up in its own table. A row with
    a λ gets its weight from the labelled share of a batch (:func:`unlabelled_weight`): ``labelled_share`` with
    two-stream batches, else the row's labelled fraction."""
    for name, (config, overrides) in REGIMES.items():
        if name in LAMBDA:
            fractions = overrides["data"]["label_fractions"]
            share = labelled_share or sum(v for k, v in fractions.items() if k != "none")
            overrides = {**overrides, "model": {"loss_weights": unlabelled_weight(config, LAMBDA[name], share)}}
        volumes.REGIMES[name] = (config, overrides)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    volumes.budget_arguments(p, regimes="mask10,mt_mask10,cps_mask10", known=REGIMES, tag="semi")
    p.add_argument("--labelled-share", type=float, default=None, help="the share of every batch with labels "
                   "(two-stream batches, WeakSegDataModule(labelled_share=...)); default: batches drawn from all "
                   "slices alike")
    p.add_argument("--full-from", default=None, help="a result file of benchmarks/volumes.py at the same budget whose "
                   "'full' row is shown as the reference")
    a = p.parse_args(argv)
    _register(a.labelled_share)
    from lightning_weakseg.recipes import import_object
    root = Path(a.data) / "acdc_volumes"
    if not root.is_dir():
        p.error(f"{root} does not exist (see ../shared/data/README.md)")
    names = [n.strip() for n in a.regimes.split(",") if n.strip()]
    unknown = [n for n in names if n not in volumes.REGIMES]
    if unknown:
        p.error(f"unknown regimes {unknown}; known: {sorted(volumes.REGIMES)}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(a.threads)
    settings = {"dataset": "acdc_volumes", "empty_slice_rate": 1.0,
                **{k: v for k, v in vars(a).items() if k not in ("data", "tag", "out", "regimes", "full_from")}}
    payload = {"command": "python benchmarks/semi.py " + " ".join(argv if argv is not None else sys.argv[1:]),
               "settings": settings, "machine": f"{platform.node()} {platform.processor()} "
               f"threads={torch.get_num_threads()} cuda={torch.cuda.is_available()}",
               "started": time.strftime("%Y-%m-%d %H:%M"), "rows": []}
    if a.full_from:
        ref = json.loads(Path(a.full_from).read_text())
        mismatch = {k: (ref["settings"].get(k), v) for k, v in settings.items()
                    if k in ("epochs", "image_size", "batch_size", "lr", "arch", "encoder", "seed", "val_fraction")
                    and ref["settings"].get(k) != v}
        if mismatch:
            p.error(f"--full-from {a.full_from}: another budget {mismatch}")
        payload["reference_full"] = {"from": a.full_from, **next(r for r in ref["rows"] if r["regime"] == "full")}
    path = Path(a.out) / f"{a.tag}.json"
    for name in names:
        data_class = import_object(ORACLE_DATA[name]) if name in ORACLE_DATA else None
        row = volumes.run_regime(str(root), name, epochs=a.epochs, image_size=a.image_size, batch_size=a.batch_size,
                                 seed=a.seed, arch=a.arch, encoder=a.encoder, lr=a.lr, val_fraction=a.val_fraction,
                                 empty_slice_rate=1.0, val_every=a.val_every,
                                 data={"labelled_share": a.labelled_share}, data_class=data_class)
        row["command"] = payload["command"]
        payload["rows"].append(row)
        volumes.write_json(path, payload)  # after every regime: a killed run keeps what it did
        print(f"[semi] {name}: volume_dice={row['volume_dice']:.4f} volume_hd95={row['volume_hd95']:.2f} "
              f"({row['seconds']:.0f} s)", flush=True)
    shown = dict(payload)
    if "reference_full" in payload and not any(r["regime"] == "full" for r in payload["rows"]):
        shown["rows"] = [payload["reference_full"]] + payload["rows"]
    print(volumes.table(shown))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
