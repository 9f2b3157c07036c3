"""Quality benchmark: train several regimes on one real data set with the same model, split and budget.

    python benchmarks/run.py --data ../shared/data --dataset kvasir --regimes full,boxes,box_mask,grabcut

writes ``benchmarks/results/<tag>.json`` (every row with Dice, IoU, HD95, per-class Dice, seconds, the config and
overrides it trained (``common.REGIMES``); the command line and settings) and prints a markdown table with "Dice / full". ``benchmarks/report.py`` collects the
result files into ``docs/benchmarks.md``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from common import DATASETS, REGIMES, data_spec, run_one, write_json  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
# settings that must be equal for rows to share one table (one "full" row as the reference)
SAME = ("dataset", "epochs", "image_size", "max_train", "batch_size", "lr", "arch", "encoder", "noise", "seed", "tiles",
        "tile_eval", "noise_fraction")
DEFAULTS = {"tiles": 1, "tile_eval": "tiles", "noise_fraction": 1.0}  # settings a result file may lack: it was made with these values


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="folder holding kvasir/, acdc/, dsb2018/")
    p.add_argument("--dataset", required=True, choices=sorted(DATASETS))
    p.add_argument("--regimes", default="full", help=f"comma-separated, from {sorted(REGIMES)}")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--image-size", type=int, default=96)
    p.add_argument("--max-train", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--arch", default="Unet")
    p.add_argument("--encoder", default="resnet18")
    p.add_argument("--noise", type=float, default=None, help="noise rate of the simulated noisy masks")
    p.add_argument("--noise-fraction", type=float, default=1.0, help="share of the training masks that the simulator "
                   "corrupts (by --noise); the others stay clean. 1.0: every mask")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tiles", type=int, default=1, help="cut each image (resized to tiles x image-size) into "
                   "tiles x tiles samples of image-size (Kvasir: tiles with and without polyp, for tags)")
    p.add_argument("--pseudo-eval-max", type=int, default=320, help="validation samples the pseudo-mask scores "
                   "(tag regimes, each CAM variant) use")
    p.add_argument("--tile-eval", default="tiles", choices=("tiles", "images"),
                   help="with --tiles: validate on tiles or on the whole images (at tiles x image-size)")
    p.add_argument("--tag", default=None, help="result file name (default: <dataset>_<regimes>)")
    p.add_argument("--log-dir", default=None, help="CSV logs per run (optional)")
    p.add_argument("--val-every", type=int, default=1, help="validate every N epochs (the final score is always "
                   "a full validation after training)")
    p.add_argument("--append", action="store_true", help="add rows to an existing result file of the same tag "
                   "(settings must match; a regime already there is replaced): lets two processes share one table")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1: on a shared CPU machine a "
                   "second thread that must wait for a busy core made steps 10x slower here)")
    a = p.parse_args(argv)
    root = data_spec(a.data, a.dataset)["root"]
    if not Path(root).is_dir():
        p.error(f"{root} does not exist (see ../shared/data/README.md)")
    names = [n.strip() for n in a.regimes.split(",") if n.strip()]
    unknown = [n for n in names if n not in REGIMES]
    if unknown:
        p.error(f"unknown regimes {unknown}; known: {sorted(REGIMES)}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import common
    common.PSEUDO_EVAL_MAX = a.pseudo_eval_max
    torch.set_num_threads(a.threads)
    tag = a.tag or f"{a.dataset}_{'-'.join(names)}"
    settings = {k: v for k, v in vars(a).items() if k not in ("data", "tag", "log_dir", "regimes", "append")}
    payload = {"command": "python benchmarks/run.py " + " ".join(argv if argv is not None else sys.argv[1:]),
               "settings": settings, "machine": f"{platform.node()} {platform.processor()} "
               f"threads={torch.get_num_threads()} cuda={torch.cuda.is_available()}",
               "started": time.strftime("%Y-%m-%d %H:%M"), "rows": []}
    path = RESULTS / f"{tag}.json"
    if path.exists() and not a.append:
        print(f"{path} exists and will be overwritten (use --append to add rows to it)", flush=True)
    for name in names:
        row = run_one(a.data, a.dataset, name, REGIMES[name], epochs=a.epochs, image_size=a.image_size,
                      max_train=a.max_train, batch_size=a.batch_size, seed=a.seed, arch=a.arch,
                      encoder=a.encoder, lr=a.lr, noise=a.noise, noise_fraction=a.noise_fraction, log_dir=a.log_dir, val_every=a.val_every,
                      tiles=a.tiles, tile_eval=a.tile_eval)
        row["command"] = payload["command"]
        if a.append:
            payload = merge_row(path, payload, row)
        else:
            payload["rows"].append(row)
            write_json(path, payload)  # after every run: a killed benchmark keeps what it did
        print(f"[{a.dataset}] {name}: dice={row['dice']:.4f} ({row['seconds']:.0f} s)", flush=True)
    print(table(payload))


def merge_row(path: Path, payload: dict, row: dict) -> dict:
    """Read the result file under a lock, check its settings equal ours, replace or append ``row``, write back."""
    import fcntl
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if path.exists():
            old = json.loads(path.read_text())
            if any(old["settings"].get(k, DEFAULTS.get(k)) != payload["settings"].get(k, DEFAULTS.get(k))
                   for k in SAME):
                raise SystemExit(f"--append: {path} was made with other settings {old.get('settings')}; "
                                 f"ours are {payload['settings']}")
            payload = {**old, "rows": [r for r in old["rows"] if r["regime"] != row["regime"]]}
            payload["rows"].append(row)
        else:
            payload = {**payload, "rows": [row]}
        write_json(path, payload)
    return payload


def table(payload: dict) -> str:
    rows = payload["rows"]
    ref = next((r["dice"] for r in rows if r["regime"] == "full"), None)
    extra = [k for k in ("obj_f1", "obj_aji", "pseudo_miou", "pseudo_precision", "pseudo_coverage")
             if any(k in r for r in rows)]
    head = "| regime | train labels | Dice | IoU | HD95 | Dice / full |" + "".join(f" {k} |" for k in extra)
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        ratio = f"{r['dice'] / ref:.3f}" if ref else "—"
        lines.append(f"| {r['regime']} | {r['labels']} | {r['dice']:.3f} | {r['iou']:.3f} | {r['hd95']:.1f} | "
                     f"{ratio} |" + "".join(f" {r.get(k, float('nan')):.3f} |" for k in extra))
    return "\n".join(lines)


if __name__ == "__main__":
    main()
