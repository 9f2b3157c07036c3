"""Cost of the up-front data check on whole real folders, cold (no cached report) and cached.

    python benchmarks/data_check.py --data ../shared/data

Writes benchmarks/results/data_check.json. "Cold" computes the report from the files (the operating system's file
cache is warm after the first repeat: the timing is decoding and checking, not disk reads); "cached" finds the
report of the same files and options.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from lightning_weakseg.data.check import check_folder
from lightning_weakseg.data.folder import FolderDataset

SETS = {
    "kvasir": dict(mask_dir="masks", boxes_json="boxes.json", num_classes=2, in_channels=3, boxes_trained=True),
    "dsb2018": dict(mask_dir=None, instance_dir="instances", num_classes=2, in_channels=3, color_mode="rgb",
                    boxes_trained=False),
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--image-size", type=int, default=256)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "data_check.json"))
    a = ap.parse_args()
    rows = []
    for name, opts in SETS.items():
        opts = dict(opts)
        boxes_trained = opts.pop("boxes_trained")
        ds = FolderDataset(Path(a.data) / name, image_size=a.image_size, **opts)
        cold, cached = [], []
        for _ in range(a.repeats):
            with tempfile.TemporaryDirectory() as cache:
                t0 = time.perf_counter()
                report = check_folder(ds, boxes_trained=boxes_trained, cache_dir=cache)
                cold.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                again = check_folder(ds, boxes_trained=boxes_trained, cache_dir=cache)
                cached.append(time.perf_counter() - t0)
                assert again.cached and len(again.problems) == len(report.problems)
        n = report.n_samples
        row = {"dataset": name, "images": n, "cold_s": min(cold), "cached_s": min(cached),
               "cold_s_per_1000": min(cold) / n * 1000, "cached_s_per_1000": min(cached) / n * 1000,
               "problems": len(report.problems), "notes": len(report.notes), "cpus": os.cpu_count()}
        rows.append(row)
        print(json.dumps(row))
    Path(a.out).write_text(json.dumps({"command": "python benchmarks/data_check.py --data ../shared/data",
                                       "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
