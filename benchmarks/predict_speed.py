"""Prediction throughput at native resolution: ``trainer.predict`` with :class:`MaskWriter` on a folder of images
(reading, padding to the encoder's stride, the forward, mapping back, writing one PNG per image) against the bare
model forward on the same images (already in memory, padded to the stride), measured side by side in one process.

    python benchmarks/predict_speed.py --data ../shared/data --dataset kvasir --n 200

Writes benchmarks/results/predict_speed_<dataset>.json. The network is Unet-resnet18 with random weights (the cost
of a forward does not depend on the weights); one intra-op thread.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import lightning as L
import torch

from lightning_weakseg import WeakSegModule
from lightning_weakseg.callbacks import MaskWriter
from lightning_weakseg.data import WeakSegDataModule
from lightning_weakseg.data.folder import IMAGE_EXTS, read_image
from lightning_weakseg.inference import output_stride, pad_to_multiple


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    ap.add_argument("--dataset", default="kvasir", choices=("kvasir", "dsb2018", "acdc"))
    ap.add_argument("--n", type=int, default=200, help="images (the first n by name)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    src = Path(a.data) / a.dataset / "images"
    files = sorted(p for p in src.iterdir() if p.suffix.lower() in IMAGE_EXTS)[: a.n]
    in_ch = 1 if a.dataset == "acdc" else 3
    color = "gray" if a.dataset == "acdc" else "rgb"
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "images"
        folder.mkdir()
        for p in files:  # the benchmark's own folder of n images (links: nothing copied)
            (folder / p.name).symlink_to(p.resolve())
        model = WeakSegModule(in_channels=in_ch, num_classes=2, predict_scale="native").eval()
        stride = output_stride(model.model)
        images = [torch.from_numpy(read_image(p, color)).permute(2, 0, 1).contiguous()[None] for p in files]

        def bare():
            with torch.inference_mode():
                for x in images:
                    xp, _ = pad_to_multiple(x, stride)
                    model(xp)

        def full():
            out = Path(tmp) / "out"
            dm = WeakSegDataModule(source="folder", root=tmp, predict_dir=str(folder), num_classes=2,
                                   in_channels=in_ch, color_mode=color, batch_size=1, eval_batch_size=1)
            trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                                enable_model_summary=False, callbacks=[MaskWriter(out)])
            trainer.predict(model, dm, return_predictions=False)
            n_out = len(list(out.glob("*.png")))
            assert n_out == len(files), (n_out, len(files))

        bare()  # warm-up
        t_bare, t_full = [], []
        for _ in range(a.repeats):  # interleaved, so that load on the machine hits both alike
            t0 = time.perf_counter()
            bare()
            t_bare.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            full()
            t_full.append(time.perf_counter() - t0)
    sizes = sorted({tuple(x.shape[-2:]) for x in images})
    row = {"dataset": a.dataset, "images": len(files), "sizes": f"{len(sizes)} sizes, {sizes[0]}..{sizes[-1]}",
           "bare_forward_s": min(t_bare), "predict_and_write_s": min(t_full),
           "overhead": min(t_full) / min(t_bare) - 1, "threads": a.threads,
           "command": f"python benchmarks/predict_speed.py --data ../shared/data --dataset {a.dataset} --n {a.n}"}
    print(json.dumps(row))
    out = Path(__file__).parent / "results" / f"predict_speed_{a.dataset}.json"
    out.write_text(json.dumps({"command": row["command"], "rows": [row]}, indent=1))


if __name__ == "__main__":
    main()
