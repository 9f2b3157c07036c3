"""How wrong are the simulated noisy masks? Fraction of wrong pixels per noise rate on real masks.

    python benchmarks/noise_stats.py --data ../shared/data --dataset kvasir --image-size 64 --n 150

The co-teaching forget rate should be about the fraction of wrong labels; our ``noise_rate`` is a boundary
offset / object-drop amount (see ``lightning_weakseg.data.weakify.noisy_mask``), not a pixel flip rate.
"""
from __future__ import annotations

import argparse
import glob
import os

import cv2
import numpy as np

from lightning_weakseg.data.weakify import noisy_mask


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True)
    p.add_argument("--dataset", default="kvasir", choices=["kvasir", "acdc"])
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--n", type=int, default=150)
    p.add_argument("--rates", default="0.3,0.5")
    p.add_argument("--fraction", type=float, default=1.0, help="share of the masks corrupted (the others clean)")
    a = p.parse_args(argv)
    files = sorted(glob.glob(os.path.join(a.data, a.dataset, "masks", "*.png")))[: a.n]
    masks = [cv2.resize(cv2.imread(f, cv2.IMREAD_GRAYSCALE), (a.image_size, a.image_size),
                        interpolation=cv2.INTER_NEAREST) for f in files]
    print("| noise rate | wrong pixels | wrong among noisy foreground | wrong among noisy background | "
          "images whose objects all vanished |")
    print("|---|---|---|---|---|")
    per_class = {}
    for rate in (float(r) for r in a.rates.split(",")):
        rng = np.random.default_rng(0)
        stats = []
        for m in masks:
            n = noisy_mask(m, rate, rng, fraction=a.fraction)
            wrong = n != m
            fg, bg = n > 0, n == 0
            stats.append((wrong.mean(), (wrong & fg).sum() / max(fg.sum(), 1), (wrong & bg).sum() / max(bg.sum(), 1),
                          float((m > 0).any() and not fg.any())))
        s = np.mean(stats, 0)
        print(f"| {rate} | {s[0]:.3f} | {s[1]:.3f} | {s[2]:.3f} | {s[3]:.3f} |")
        per_class[rate] = pooled(masks, rate, a.fraction)
    # pooled over every pixel (what a batch-wide selection sees): for each class c of the NOISY mask, the fraction of
    # the pixels labelled c that are wrong — the per-class forget rate of class-balanced co-teaching
    classes = sorted(set().union(*(np.unique(m).tolist() for m in masks)))
    print("\n| noise rate | " + " | ".join(f"wrong among noisy class {c}" for c in classes) + " |")
    print("|---|" + "---|" * len(classes))
    for rate, frac in per_class.items():
        print(f"| {rate} | " + " | ".join(f"{frac.get(c, float('nan')):.3f}" for c in classes) + " |")


def pooled(masks, rate, fraction=1.0):
    rng = np.random.default_rng(0)
    labelled, wrong = {}, {}
    for m in masks:
        n = noisy_mask(m, rate, rng, fraction=fraction)
        for c in np.unique(n).tolist():
            sel = n == c
            labelled[c] = labelled.get(c, 0) + int(sel.sum())
            wrong[c] = wrong.get(c, 0) + int((sel & (m != c)).sum())
    return {c: wrong[c] / max(labelled[c], 1) for c in labelled}


if __name__ == "__main__":
    main()
