"""Predict a folder of images with N CPU processes and ``MaskWriter``; write what the prediction test compares.

    python scripts/predict_ddp_check.py --images DIR --weights W.pt --out OUT --devices 2

writes the masks to ``OUT/masks`` and ``OUT/written_rank<r>.json``: the label maps rank ``r`` wrote (each image
must be written by exactly one rank; the filler samples that even out the shards by none).
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


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--images", required=True)
    p.add_argument("--weights", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--devices", type=int, default=2)
    p.add_argument("--image-size", type=int, default=64)
    a = p.parse_args()
    torch.set_num_threads(1)
    out = Path(a.out)
    dm = WeakSegDataModule(source="synthetic", synthetic_kind="nuclei", image_size=a.image_size,
                           predict_dir=a.images, batch_size=2)
    model = WeakSegModule(encoder="resnet18", in_channels=3, num_classes=2)
    model.load_state_dict(torch.load(a.weights))
    writer = MaskWriter(out / "masks", probabilities="npy")
    trainer = L.Trainer(accelerator="cpu", devices=a.devices, strategy="ddp" if a.devices > 1 else "auto",
                        logger=False, enable_progress_bar=False, enable_model_summary=False, callbacks=[writer])
    trainer.predict(model, dm, return_predictions=False)
    (out / f"written_rank{trainer.global_rank}.json").write_text(json.dumps([p.name for p in writer.written]))


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
