"""Validate and predict a folder of NIfTI volumes with N CPU processes; write what the volume test compares.

    python scripts/volumes_ddp_check.py --root DIR --out OUT --devices 2

``DIR`` holds ``images/``, ``labels/`` (``<name>.nii.gz``). Every volume is in the validation split, whose slices
the DDP shards deal out one by one (so each volume's slices are spread over the ranks). Writes

* ``OUT/metrics_rank<r>.json`` — the ``val/volume_*`` metrics rank ``r`` logged (every rank must log the same);
* ``OUT/masks/<name>.nii.gz`` — the predicted volumes (``MaskWriter``), ``OUT/written_rank<r>.json`` — the files
  rank ``r`` wrote (each volume by exactly one rank).

The model is a per-voxel rule (:class:`IntensityRule`), so one process and N processes must agree exactly.
"""
import argparse
import json
import os
from pathlib import Path

import lightning as L
import torch

from lightning_weakseg import WeakSegModule
from lightning_weakseg.callbacks import MaskWriter
from lightning_weakseg.data import WeakSegDataModule


class IntensityRule(WeakSegModule):
    """Class ``c`` where the normalised intensity is nearest ``c / (K - 1)``: a prediction that depends on each
    voxel only, so that neither batch composition nor process count can change it."""

    def forward(self, x):
        k = self.num_classes
        centres = torch.arange(k, dtype=x.dtype, device=x.device).view(1, k, 1, 1) / (k - 1)
        logits = -50.0 * (x[:, :1] - centres) ** 2 + 0.0 * self.model.segmentation_head[0].bias.sum()
        return {"logits": logits, "probs": logits.softmax(1)}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--root", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--devices", type=int, default=2)
    p.add_argument("--num-classes", type=int, default=4)
    p.add_argument("--image-size", type=int, default=32)
    a = p.parse_args()
    torch.set_num_threads(1)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    common = dict(source="volumes", root=a.root, image_dir="images", mask_dir="labels", num_classes=a.num_classes,
                  in_channels=1, image_size=a.image_size, batch_size=3, val_fraction=1.0, augment="none")
    model = IntensityRule(encoder="resnet18", in_channels=1, num_classes=a.num_classes)
    kw = dict(accelerator="cpu", devices=a.devices, strategy="ddp" if a.devices > 1 else "auto", logger=False,
              enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)
    trainer = L.Trainer(**kw)
    trainer.validate(model, WeakSegDataModule(**common), verbose=False)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if "volume" in k}
    (out / f"metrics_rank{trainer.global_rank}.json").write_text(json.dumps(metrics, sort_keys=True))
    writer = MaskWriter(out / "masks")
    trainer = L.Trainer(**kw, callbacks=[writer])
    trainer.predict(model, WeakSegDataModule(**common, predict_dir=str(Path(a.root) / "images")),
                    return_predictions=False)
    (out / f"written_rank{trainer.global_rank}.json").write_text(json.dumps([p.name for p in writer.written]))


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
