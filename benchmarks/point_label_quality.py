"""How good are the cluster labels of Qu et al. on DSB2018, per ``scale``? Compared with the training masks.

    python benchmarks/point_label_quality.py --data ../shared/data --image-size 128 --scales 1.0,0.35,0.5

Prints the median nucleus radius (which sets ``scale`` ≈ radius / 9, see ``cluster_labels``) and, per scale, the
mean over images of: coverage (labelled pixels / all), accuracy of the labelled pixels, precision and recall of
the nucleus label, and its Dice with unlabelled pixels counted as background. Centroid points, every 4th of the
first ``--n`` training images of the benchmark's split.
"""
from __future__ import annotations

import argparse
import os

import numpy as np
import torch

from lightning_weakseg.data import WeakSegDataModule
from lightning_weakseg.pseudo.points import cluster_labels
from lightning_weakseg.recipes import load_data_config


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True)
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--n", type=int, default=300)
    p.add_argument("--scales", default="1.0,0.35")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    spec = load_data_config("dsb2018")  # configs/data/dsb2018.yaml, its root under --data
    spec["root"] = os.path.join(a.data, os.path.basename(spec["root"]))
    dm = WeakSegDataModule(**spec, image_size=a.image_size,
                           train_labels=("points", "mask", "instances"), weakify={"point_mode": "centroid"},
                           max_train_samples=a.n, augment="none")
    dm.setup("fit")
    samples = [dm.train_dataset[i] for i in range(0, len(dm.train_dataset), 4)]
    areas = [float((s["instances"] == j).sum()) for s in samples for j in s["instances"].unique().tolist() if j > 0]
    radius = float(np.sqrt(np.median(areas) / np.pi))
    print(f"{len(samples)} images at {a.image_size} px; median nucleus radius {radius:.2f} px "
          f"(rule: scale ≈ {radius / 9:.2f})")
    print("| scale | coverage | accuracy | nucleus precision | nucleus recall | nucleus Dice |")
    print("|---|---|---|---|---|---|")
    for scale in (float(x) for x in a.scales.split(",")):
        st = {k: [] for k in ("cov", "acc", "prec", "rec", "dice")}
        for s in samples:
            pts = s["points"].numpy()
            if len(pts) == 0:
                continue
            img = (np.moveaxis(s["image"].numpy(), 0, 2) * 255).round().astype(np.uint8)
            m = s["mask"].numpy()
            lab = cluster_labels(img, pts[:, 1:3], scale=scale)
            known, fg, true = lab != 255, lab == 1, m == 1
            st["cov"].append(known.mean())
            st["acc"].append((lab[known] == m[known]).mean() if known.any() else np.nan)
            st["prec"].append(true[fg].mean() if fg.any() else np.nan)
            st["rec"].append((fg & true).sum() / max(true.sum(), 1))
            st["dice"].append(2 * (fg & true).sum() / max(fg.sum() + true.sum(), 1))
        v = {k: float(np.nanmean(x)) for k, x in st.items()}
        print(f"| {scale} | {v['cov']:.3f} | {v['acc']:.3f} | {v['prec']:.3f} | {v['rec']:.3f} | {v['dice']:.3f} |")


if __name__ == "__main__":
    main()
