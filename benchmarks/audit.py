"""Label-audit benchmark: do the audit's scores find the corrupted masks, beside cleanlab on the same probabilities,
and does fixing the masks they flag pay off?

    pip install cleanlab          # only for this benchmark (AGPL; not a dependency of lightning-weakseg)
    python benchmarks/audit.py --data ../shared/data --dataset kvasir
    python benchmarks/audit.py --data ../shared/data --dataset kvasir --loop     # + audit -> fix -> retrain

The training split carries the clean mask and the simulator's noisy mask (``--noise 1.0 --noise-fraction 0.5``:
half of the masks corrupted, the others clean); a mask is *corrupted* when it differs from the clean one. Out-of-
sample probabilities: :func:`lightning_weakseg.audit.cross_val_audit` (``--folds`` models, each trained by
``Trainer.fit`` on the other folds' noisy masks, each scoring the fold it did not see). On these probabilities,
per score: AUROC of "corrupted" against the image score (low = flagged) and precision at k = the number of
corrupted masks, for the audit's three scores and cleanlab's two (``get_label_quality_scores`` with ``softmin`` and
``num_pixel_issues``; cleanlab has no ignore index, so ignored pixels get the predicted class there, which makes them
agree). Speed and memory: the held-out probabilities are cycled to ``--scale-n`` images and scored by each method in
a fresh process (wall time, peak resident memory above the process's baseline; cleanlab needs the N×K×H×W array in
memory, the streaming scorer one batch).

``--loop``: the audit's ranking (default score) picks the masks to "re-annotate" (replaced by the clean mask): the
worst 10 % and 20 %, against 10 % and 20 % picked at random; each set is retrained from scratch on the noisy masks
with CE + soft Dice (the ``full_dice`` row of ``common.py`` on ``noisy_mask``), beside the same model on the
unfixed masks and co-teaching on the unfixed masks; validation Dice on clean masks.

Writes ``benchmarks/results/audit_<dataset>.json`` (and ``audit_loop_<dataset>.json``).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def auroc(scores, positive) -> float:
    """Probability that a corrupted mask scores lower than a clean one (ties count half)."""
    from scipy.stats import rankdata

    s, y = np.asarray(scores, float), np.asarray(positive, bool)
    r = rankdata(-s)  # high rank = low score = flagged
    npos, nneg = y.sum(), (~y).sum()
    return float((r[y].sum() - npos * (npos + 1) / 2) / (npos * nneg))


def precision_at_k(scores, positive, k: int) -> float:
    order = np.lexsort((np.arange(len(scores)), np.asarray(scores, float)))
    return float(np.asarray(positive, bool)[order[:k]].mean())


def build_dm(a, train_labels=("mask", "noisy_mask")):
    from common import data_spec
    from lightning_weakseg.data import WeakSegDataModule

    dm = WeakSegDataModule(**data_spec(a.data, a.dataset), train_labels=list(train_labels),
                           weakify={"noise_rate": a.noise, "noise_fraction": a.noise_fraction},
                           image_size=a.image_size, batch_size=a.batch_size, eval_batch_size=2 * a.batch_size,
                           seed=a.seed, max_train_samples=a.max_train)
    dm.setup("fit")
    return dm


def full_dice_recipe():
    from common import REGIMES
    return REGIMES["full_dice"].recipe().with_overrides({"model": {"mask_key": "noisy_mask"}})


def oracle_recipe():
    from common import REGIMES
    return REGIMES["full_dice"].recipe()


def make_trainer_factory(a, name):
    import lightning as L
    from common import EpochPrinter

    def make():
        return L.Trainer(max_epochs=a.epochs, accelerator="auto", devices=1, logger=False,
                         enable_checkpointing=False, enable_model_summary=False, enable_progress_bar=False,
                         num_sanity_val_steps=0, callbacks=[EpochPrinter(name)])
    return make


# ------------------------------------------------------------------------------------------------ the audit
def run_audit(a) -> dict:
    import lightning as L
    from lightning_weakseg.audit import METHODS, label_quality_scores, probabilities

    L.seed_everything(a.seed, verbose=False)
    dm = build_dm(a)
    # --oracle-clean: the fold models learn the clean masks (a bound: how well the scores could rank with fold models
    # that the corrupted masks did not mislead); the scores still rate the noisy masks
    recipe = oracle_recipe() if a.oracle_clean else full_dice_recipe()
    train = dm.train_dataset
    view = train.subset(train.indices, augment="none")
    n = len(train)
    probs_store: dict[int, np.ndarray] = {}
    labels_store: dict[int, np.ndarray] = {}
    corrupted: dict[int, bool] = {}

    def extra(batch):
        valid = batch["mask"] != 255
        bad = ((batch["mask"] != batch["noisy_mask"]) & valid).flatten(1).any(1)
        return {"corrupted": bad.tolist()}

    from lightning_weakseg.audit import _shard_loader, cross_val_audit, kfold_indices

    folds = kfold_indices(n, a.folds, a.seed)

    def on_fold_end(f, model):  # keep the held-out probabilities for cleanlab (this benchmark only)
        model.eval()
        with torch.no_grad():
            for batch in _shard_loader(view, folds[f], 2 * a.batch_size):
                p = probabilities(model, batch["image"].to(model.device)).float().cpu().numpy()
                for j, key in enumerate(batch["audit_key"].tolist()):
                    probs_store[key] = p[j]
                    labels_store[key] = batch["noisy_mask"][j].numpy().astype(np.int64)

    t0 = time.time()
    result = cross_val_audit(lambda: recipe.build_model(arch=a.arch, encoder=a.encoder, in_channels=dm.in_channels,
                                                        num_classes=dm.num_classes, lr=a.lr),
                             make_trainer_factory(a, f"{a.dataset}/fold"), train, folds=a.folds,
                             label_key="noisy_mask", seed=a.seed, batch_size=a.batch_size, eval_dataset=view,
                             num_worst=0, extra=extra, on_fold_end=on_fold_end)
    oos_seconds = time.time() - t0
    rows = sorted(result.rows, key=lambda r: r["key"])
    positive = [bool(r["corrupted"]) for r in rows]
    k = int(sum(positive))
    scores = {f"weakseg_{m}": [r[f"score_{m}"] for r in rows] for m in METHODS}

    # the same scores recomputed from the stored probabilities (all in memory): the streamed ones must agree
    probs = np.stack([probs_store[i] for i in range(n)])
    labels = np.stack([labels_store[i] for i in range(n)])
    for m in METHODS:
        again = label_quality_scores(torch.from_numpy(probs), torch.from_numpy(labels), m)[0].numpy()
        assert np.allclose(again, scores[f"weakseg_{m}"], atol=1e-5), m

    try:
        from cleanlab.segmentation.rank import get_label_quality_scores
    except ImportError:
        get_label_quality_scores = None
        print("cleanlab is not installed (pip install cleanlab): its rows are left out")
    if get_label_quality_scores is not None:
        cl_labels = np.where(labels == 255, probs.argmax(1), labels)
        for m in ("softmin", "num_pixel_issues"):
            s, _ = get_label_quality_scores(cl_labels, probs, method=m, n_jobs=1, verbose=False)
            scores[f"cleanlab_{m}"] = [float(v) for v in s]

    table = {name: {"auroc": auroc(s, positive), "precision_at_k": precision_at_k(s, positive, k)}
             for name, s in scores.items()}
    speed = measure_speed(a, probs, labels)
    for name, v in speed.items():
        table.setdefault(name, {}).update(v)
    ranking = [{"key": r["key"], "index": r["index"], "id": r["id"], "score": r["score"],
                "corrupted": bool(r["corrupted"]), "error_type": r["error_type"]} for r in result.rows]
    kinds: dict[str, dict[str, int]] = {}
    for r in result.rows[:k]:
        kinds.setdefault(r["error_type"], {"corrupted": 0, "clean": 0})["corrupted" if r["corrupted"] else
                                                                          "clean"] += 1
    return {"n_images": n, "n_corrupted": k, "folds": a.folds, "oos_seconds": round(oos_seconds, 1),
            "default_method": result.method, "scores": table, "top_k_error_types": kinds, "ranking": ranking}


# ------------------------------------------------------------------------------------------ speed and memory
def speed_probabilities(a):
    dm = build_dm(a)
    view = dm.train_dataset.subset(dm.train_dataset.indices, augment="none")
    rng = np.random.default_rng(a.seed)
    probs, labels = [], []
    for i in range(len(view)):
        s = view[i]
        clean, noisy = s["mask"].numpy(), s["noisy_mask"].numpy()
        k = dm.num_classes
        onehot = np.eye(k, dtype=np.float32)[np.where(clean == 255, 0, clean)].transpose(2, 0, 1)
        noise = rng.dirichlet(np.ones(k), size=clean.shape).astype(np.float32).transpose(2, 0, 1)
        probs.append(0.7 * onehot + 0.3 * noise)
        labels.append(noisy.astype(np.int64))
    return np.stack(probs), np.stack(labels)


def measure_speed(a, probs: np.ndarray, labels: np.ndarray) -> dict:
    """Each method in a fresh process on ``--scale-n`` images (the held-out probabilities cycled)."""
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "probs.npz"
        np.savez(path, probs=probs, labels=labels)
        methods = ["weakseg_stream", "weakseg_stream_dice_only"]
        try:
            import cleanlab  # noqa: F401
            methods += ["cleanlab_softmin", "cleanlab_num_pixel_issues"]
        except ImportError:
            pass
        for m in methods:
            proc = subprocess.run([sys.executable, __file__, "--_measure", m, "--_probs", str(path),
                                   "--scale-n", str(a.scale_n), "--threads", str(a.threads)],
                                  capture_output=True, text=True, timeout=1800)
            if proc.returncode != 0:
                out[m] = {"error": proc.stderr[-500:]}
                continue
            out[m] = json.loads(proc.stdout.strip().splitlines()[-1])
    return out


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _current_rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def _sample_rss() -> None:
    """The current resident memory every 2 ms, its maximum kept on the thread object (ru_maxrss would also see the
    imports' peak, before the measurement)."""
    import threading

    me = threading.current_thread()
    while not me.stop:
        me.peak = max(me.peak, _current_rss_mb())
        time.sleep(0.002)


def measure(method: str, probs_path: str, n: int, threads: int) -> dict:
    torch.set_num_threads(threads)
    d = np.load(probs_path)
    base_p, base_l = d["probs"], d["labels"]
    if method.startswith("weakseg"):
        from lightning_weakseg.audit import LabelQualityScorer
    else:
        from cleanlab.segmentation.rank import get_label_quality_scores
    m = len(base_p)
    import threading

    from scipy import ndimage  # noqa: F401 - imports and first calls before the baseline, for every method alike
    if method.startswith("weakseg"):
        LabelQualityScorer().update(torch.from_numpy(base_p[:2]), torch.from_numpy(base_l[:2]), [0, 1])
    else:
        get_label_quality_scores(np.where(base_l[:2] == 255, 0, base_l[:2]), base_p[:2], n_jobs=1, verbose=False)

    baseline = _current_rss_mb()
    sampler = threading.Thread(target=_sample_rss, daemon=True)
    sampler.stop, sampler.peak = False, baseline
    sampler.start()
    t0 = time.time()
    if method.startswith("weakseg"):
        # every method + error types (the table weakseg audit writes), or the default score alone
        scorer = LabelQualityScorer() if method == "weakseg_stream" else \
            LabelQualityScorer(methods=(), error_types=False)
        bs = 32
        for s in range(0, n, bs):
            idx = np.arange(s, min(s + bs, n)) % m
            scorer.update(torch.from_numpy(base_p[idx]), torch.from_numpy(base_l[idx]), list(range(s, s + len(idx))))
        rows = scorer.compute().rows
        assert len(rows) == n
    else:
        idx = np.arange(n) % m
        p = base_p[idx]  # cleanlab's input: the whole (N,K,H,W) array
        lab = np.where(base_l[idx] == 255, p.argmax(1), base_l[idx])
        get_label_quality_scores(lab, p, method=method.split("_", 1)[1], n_jobs=1, verbose=False)
    seconds = time.time() - t0
    sampler.stop = True
    sampler.join()
    peak = _rss_mb()
    return {"seconds_per_1000": round(seconds * 1000 / n, 2), "n": n,
            "peak_above_baseline_mb": round(sampler.peak - baseline, 1), "baseline_rss_mb": round(baseline, 1),
            "process_max_rss_mb": round(peak, 1)}


# ------------------------------------------------------------------------------------------------ the loop
class FixedMasks(torch.utils.data.Dataset):
    """The training split with the noisy masks of ``fixed`` raw indices replaced by their clean masks."""

    def __init__(self, dataset, fixed):
        self.dataset, self.fixed = dataset, set(int(i) for i in fixed)

    def __len__(self):
        return len(self.dataset)

    def __getattr__(self, name):  # the data module reads the split's attributes
        if name in ("dataset", "fixed"):
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def __getitem__(self, i):
        s = self.dataset[i]
        if int(s["index"]) in self.fixed:
            s = dict(s)
            s["noisy_mask"] = s["mask"].clone()
        return s


def run_loop(a, audit_payload: dict) -> list[dict]:
    import lightning as L
    from common import EpochPrinter, REGIMES
    from noisy_regimes import coteaching

    ranking = audit_payload["ranking"]  # worst first, by the default score
    n = len(ranking)
    rng = np.random.default_rng(a.seed + 7)
    random_order = [ranking[i]["index"] for i in rng.permutation(n)]
    plans = [("unfixed", [])]
    for frac in (0.1, 0.2):
        k = int(round(frac * n))
        plans.append((f"audit_top{int(frac * 100)}", [r["index"] for r in ranking[:k]]))
        plans.append((f"random{int(frac * 100)}", random_order[:k]))
    rows = []
    ct_name = "coteaching_sample_dice_t50"
    ct = REGIMES[ct_name] if ct_name in REGIMES else None
    ct_recipe = ct.recipe() if ct is not None else None
    if ct_recipe is None:
        from lightning_weakseg.recipes import load_recipe
        ct_recipe = load_recipe(*coteaching(forget_rate=0.5))
    runs = [(name, fixed, full_dice_recipe()) for name, fixed in plans] + [("coteaching_unfixed", [], ct_recipe)]
    for name, fixed, recipe in runs:
        L.seed_everything(a.seed, verbose=False)
        dm = build_dm(a)
        truly_bad = {r["index"] for r in ranking if r["corrupted"]}
        dm.train_dataset = FixedMasks(dm.train_dataset, fixed)
        model = recipe.build_model(arch=a.arch, encoder=a.encoder, in_channels=dm.in_channels,
                                   num_classes=dm.num_classes, lr=a.lr)
        callbacks = recipe.build_callbacks(skip=("SegmentationImageLogger",)) + [EpochPrinter(f"{a.dataset}/{name}")]
        trainer = L.Trainer(max_epochs=a.loop_epochs, accelerator="auto", devices=1, logger=False,
                            enable_checkpointing=False, callbacks=callbacks, enable_model_summary=False,
                            enable_progress_bar=False, num_sanity_val_steps=0, check_val_every_n_epoch=a.loop_epochs)
        t0 = time.time()
        trainer.fit(model, dm)
        res = trainer.validate(model, dm, verbose=False)[0]
        rows.append({"row": name, "fixed": len(fixed), "fixed_corrupted": len(set(fixed) & truly_bad),
                     "corrupted_left": len(truly_bad - set(fixed)), "dice": float(res["val/dice"]),
                     "seconds": round(time.time() - t0, 1), "config": str(Path("configs") / recipe.path.name)})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="../shared/data")
    p.add_argument("--dataset", default="kvasir", choices=("kvasir", "acdc", "dsb2018"))
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--max-train", type=int, default=300)
    p.add_argument("--folds", type=int, default=3)
    p.add_argument("--epochs", type=int, default=12, help="epochs of each fold's model")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--arch", default="Unet")
    p.add_argument("--encoder", default="resnet18")
    p.add_argument("--noise", type=float, default=1.0)
    p.add_argument("--noise-fraction", type=float, default=0.5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scale-n", type=int, default=1000, help="images for the time and memory rows")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--loop", action="store_true", help="also audit -> fix top-k -> retrain (audit_loop_<ds>.json)")
    p.add_argument("--loop-only", action="store_true", help="the loop, on the ranking of an existing audit_<ds>.json")
    p.add_argument("--loop-epochs", type=int, default=15)
    p.add_argument("--oracle-clean", action="store_true", help="a bound, not a method: the fold models train on the "
                   "clean masks (the scores still rate the noisy ones)")
    p.add_argument("--tag", default=None)
    p.add_argument("--speed-only", action="store_true", help="re-measure the time and memory rows of an existing "
                   "audit_<tag>.json on probabilities of the same shape (0.7 x the clean mask's one-hot + 0.3 x "
                   "Dirichlet noise; the noisy masks as labels), without training")
    p.add_argument("--_measure", default=None, help=argparse.SUPPRESS)
    p.add_argument("--_probs", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a._measure:
        print(json.dumps(measure(a._measure, a._probs, a.scale_n, a.threads)))
        return
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(a.threads)
    tag = a.tag or a.dataset
    settings = {k: v for k, v in vars(a).items() if k not in ("data", "tag", "_measure", "_probs")}
    head = {"command": "python benchmarks/audit.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "settings": settings, "machine": f"{platform.node()} {platform.processor()} "
            f"threads={torch.get_num_threads()} cuda={torch.cuda.is_available()}",
            "started": time.strftime("%Y-%m-%d %H:%M")}
    path = RESULTS / f"audit_{tag}.json"
    from common import write_json
    if a.speed_only:
        payload = json.loads(path.read_text())
        probs, labels = speed_probabilities(a)
        speed = measure_speed(a, probs, labels)
        for name, v in speed.items():
            payload["scores"].setdefault(name, {}).update(v)
        payload["speed"] = {"command": head["command"], "probabilities": "0.7 x one-hot(clean mask) + 0.3 x "
                            "Dirichlet(1) noise over the training split's images, the noisy masks as labels",
                            "measured": time.strftime("%Y-%m-%d %H:%M")}
        write_json(path, payload)
        for name, v in speed.items():
            print(name, v)
        return
    if not a.loop_only:
        payload = {**head, **run_audit(a)}
        write_json(path, payload)
        print(f"| score | AUROC | P@k (k={payload['n_corrupted']}) | s / 1000 img | peak MB above baseline |")
        print("|---|---|---|---|---|")
        for name, v in payload["scores"].items():
            print(f"| {name} | {v.get('auroc', float('nan')):.3f} | {v.get('precision_at_k', float('nan')):.3f} | "
                  f"{v.get('seconds_per_1000', '')} | {v.get('peak_above_baseline_mb', '')} |")
    else:
        payload = json.loads(path.read_text())
    if a.loop or a.loop_only:
        rows = run_loop(a, payload)
        write_json(RESULTS / f"audit_loop_{tag}.json", {**head, "audit_file": str(path.relative_to(RESULTS.parent.parent)),
                                                        "rows": rows})
        for r in rows:
            print(f"| {r['row']} | fixed {r['fixed']} ({r['fixed_corrupted']} corrupted) | Dice {r['dice']:.3f} |")


if __name__ == "__main__":
    main()
