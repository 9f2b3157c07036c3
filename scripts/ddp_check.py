"""Train the plain module for a few steps with N CPU processes and write what the DDP test compares.

    python scripts/ddp_check.py --devices 2 --out /tmp/ddp2

writes ``metrics.json`` (validation Dice etc., rank 0) and ``weights_rank<r>.pt`` (each rank's final weights).
Batch-independent normalisation (GroupNorm) and no shuffling/augmentation make a 2-process run on batches of
``B/2`` per rank the same computation as a 1-process run on batches of ``B``.
"""
import argparse
import json
import os
from pathlib import Path

import lightning as L
import torch

from lightning_weakseg import WeakSegModule
from lightning_weakseg.data import WeakSegDataModule


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--devices", type=int, default=1)
    p.add_argument("--global-batch", type=int, default=8)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--out", required=True)
    p.add_argument("--module", default="lightning_weakseg:WeakSegModule")
    p.add_argument("--labels", default="mask")
    a = p.parse_args()
    torch.set_num_threads(1)
    L.seed_everything(0, verbose=False)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    mod, _, name = a.module.partition(":")
    cls = getattr(__import__(mod, fromlist=[name]), name)
    dm = WeakSegDataModule(synthetic_kind="organ", n_samples=40, image_size=32, train_labels=a.labels.split(","),
                           batch_size=a.global_batch // a.devices, eval_batch_size=4, augment="none", shuffle=False,
                           val_fraction=0.2)
    model = cls(encoder="resnet18", in_channels=1, num_classes=4, norm="group", lr=1e-3)
    trainer = L.Trainer(accelerator="cpu", devices=a.devices, strategy="ddp" if a.devices > 1 else "auto",
                        max_epochs=a.epochs, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, deterministic=True)
    trainer.fit(model, dm)
    rank = trainer.global_rank
    torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, out / f"weights_rank{rank}.pt")
    if rank == 0:
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
        (out / "metrics.json").write_text(json.dumps(metrics, indent=1))


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
