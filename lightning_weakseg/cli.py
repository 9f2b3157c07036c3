"""Command line: ``weakseg fit|validate|test|predict --config ...`` (LightningCLI) and ``weakseg demo``."""
from __future__ import annotations

import argparse
import importlib
import os
import sys
import time

from lightning.pytorch.cli import LightningCLI

from .data import WeakSegDataModule
from .module import WeakSegModule


class WeakSegCLI(LightningCLI):
    def add_arguments_to_parser(self, parser):
        # one source of truth: the data decides classes and channels, the model follows
        parser.link_arguments("data.num_classes", "model.init_args.num_classes", apply_on="instantiate")
        parser.link_arguments("data.in_channels", "model.init_args.in_channels", apply_on="instantiate")


def cli_main(args=None):
    return WeakSegCLI(WeakSegModule, WeakSegDataModule, subclass_mode_model=True, args=args,
                      save_config_kwargs={"overwrite": True})


# the weak regime the demo trains next to full supervision: (module class path, train labels, kwargs, callbacks)
DEMO_REGIMES = {
    "scribbles": ("lightning_weakseg.module:WeakSegModule", ["scribble"], {"mask_key": "scribble"}, []),
    "boxes": ("lightning_weakseg.regimes.boxes:BoxSegModule", ["boxes"], {},
              ["lightning_weakseg.callbacks:LogBarrierSchedule"]),
}


def _load(path: str):
    mod, _, name = path.partition(":")
    return getattr(importlib.import_module(mod), name)


def demo(argv=None) -> list[dict]:
    """Train full supervision and one weak regime on the synthetic organ set and print Dice side by side."""
    import lightning as L
    import torch

    p = argparse.ArgumentParser(prog="weakseg demo", description=demo.__doc__)
    p.add_argument("--regime", default=None, choices=sorted(DEMO_REGIMES), help="weak regime (default: boxes if "
                   "installed, else scribbles)")
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--n-samples", type=int, default=240)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    regime = a.regime
    if regime is None:
        try:
            _load(DEMO_REGIMES["boxes"][0])
            regime = "boxes"
        except (ImportError, AttributeError):
            regime = "scribbles"
    torch.set_num_threads(min(torch.get_num_threads(), os.cpu_count() or 1))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    rows = []
    runs = [("full masks", "lightning_weakseg.module:WeakSegModule", ["mask"], {}, [])]
    runs.append((regime, *DEMO_REGIMES[regime]))
    for name, cls_path, labels, kwargs, cb_paths in runs:
        L.seed_everything(a.seed, verbose=False)
        dm = WeakSegDataModule(synthetic_kind="organ", n_samples=a.n_samples, image_size=a.image_size,
                               batch_size=16, train_labels=labels, seed=a.seed)
        model = _load(cls_path)(in_channels=dm.in_channels, num_classes=dm.num_classes, lr=3e-3, **kwargs)
        callbacks = [_load(c)() for c in cb_paths]
        trainer = L.Trainer(max_epochs=a.epochs, accelerator="cpu", devices=1, logger=False,
                            enable_checkpointing=False, callbacks=callbacks, enable_model_summary=False)
        t0 = time.time()
        trainer.fit(model, dm)
        rows.append({"regime": name, "labels": "+".join(labels), "dice": float(trainer.callback_metrics["val/dice"]),
                     "seconds": time.time() - t0})
    full = rows[0]["dice"]
    print("\n| regime | train labels | val Dice | Dice / full | train s |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['regime']} | {r['labels']} | {r['dice']:.3f} | {r['dice'] / full:.3f} | {r['seconds']:.0f} |")
    return rows


def main(argv=None):
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] == "demo":
        demo(args[1:])
        return
    # from the command line LightningCLI reads sys.argv itself (passing it as ``args`` too makes it warn)
    cli_main(None if argv is None else args)


if __name__ == "__main__":
    main()
