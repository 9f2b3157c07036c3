"""Speed of the box, point and noisy-mask regimes, measured side by side in one run.

    nice -n 5 python benchmarks/speed.py --repeats 9          # full run; --quick for a smoke test

Every train step (the module's ``training_step`` — validate the batch, forward, its loss terms and their weighted
sum —, backward, AdamW step; no Lightning loop around it) is timed on the same batch, 8×3×128², with the modules
of the recipes in ``configs/`` (Unet-resnet18). The modules run interleaved, the order rotated each
round, after one warm-up round, so that load from other processes hits all of them alike; every figure is the median
of ``--repeats``. Each measurement records wall time and the process's CPU time. On a shared machine CPU time is
the stable one (time spent waiting for a core is not counted), so ratios and targets use CPU time, with
``--threads`` (default 1: no spinning worker threads inflate it); wall-time ratios are reported alongside.

(a) plain ``WeakSegModule`` (CE on a mask): the denominator.
(b) ``BoxSegModule``, 4 boxes per image (tightness + emptiness CE + size): ratio to (a), target ≤ 1.15.
(c) ``tightness_prior`` forward+backward, 8×256×256, 4 boxes per image, against a slow reference that builds a
    dense mask per band and sums under it (what the original code does): speed-up, target ≥ 20.
(d) ``CoTeachingSegModule`` step (two networks, class-balanced pixel selection at R = 0.7): ratio to (a), target
    ≤ 2.2; and the share of the step spent in the small-loss selection (its ``torch.profiler`` range inside the
    step), target ≤ 5%.
(e) ``PointSegModule`` step (Voronoi CE built in the step, cluster-label CE, gated CRF loss r = 5): ratio to (a).
(f) the DDP selection's compute in one process (a 1-rank gloo group), radix (4 histogram all-reduces, 8 KiB a
    selection) vs gather (all-gathers 5 bytes per item), for 8×128×128 pixels per rank, and the bytes each sends.
(g) Voronoi + cluster pseudo-labels for a 1000×1000 RGB image with 500 points, against a straightforward
    version of the paper's recipe (scipy.spatial.Voronoi ridges drawn as lines, sklearn KMeans on every pixel,
    per-cell skimage morphology): speed-up, target ≥ 10.

Writes ``benchmarks/results/speed.json`` and prints a markdown table.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from threadpoolctl import threadpool_limits  # noqa: E402

import lightning_weakseg.losses.selection as selmod  # noqa: E402
from lightning_weakseg.losses import log_barrier, small_loss_selection, tightness_prior  # noqa: E402
from lightning_weakseg.recipes import load_recipe  # noqa: E402


# ----------------------------------------------------------------------------- inputs
def random_boxes(rng: np.random.Generator, n: int, size: int, lo: int, hi: int) -> np.ndarray:
    wh = rng.integers(lo, hi + 1, (n, 2))
    xy = rng.integers(0, size - wh + 1)
    return np.c_[xy, xy + wh].astype(np.float32)                     # x0, y0, x1, y1


def make_batch(B=8, size=128, boxes_per_image=4, points_per_image=20, seed=0) -> dict:
    rng = np.random.default_rng(seed)
    g = torch.Generator().manual_seed(seed)
    image = torch.rand(B, 3, size, size, generator=g)
    boxes = [torch.from_numpy(np.c_[np.ones(boxes_per_image, np.float32),
                                    random_boxes(rng, boxes_per_image, size, 16, 64)]) for _ in range(B)]
    mask = torch.zeros(B, size, size, dtype=torch.long)
    for i, b in enumerate(boxes):                                    # an object inside each box
        for _, x0, y0, x1, y1 in b.int().tolist():
            mask[i, y0 + 2:y1 - 2, x0 + 2:x1 - 2] = 1
    noisy = torch.where(torch.rand(B, size, size, generator=g) < 0.2, 1 - mask, mask)
    pts = [torch.from_numpy(np.c_[np.ones(points_per_image), rng.integers(0, size, (points_per_image, 2))]).float()
           for _ in range(B)]
    pseudo = torch.where(torch.rand(B, size, size, generator=g) < 0.5, mask, torch.full_like(mask, 255))
    ones = torch.ones(B, dtype=torch.bool)
    return {"image": image, "mask": mask, "has_mask": ones, "boxes": boxes, "has_boxes": ones,
            "noisy_mask": noisy, "has_noisy_mask": ones, "points": pts, "has_points": ones,
            "pseudo": pseudo, "has_pseudo": ones, "index": torch.arange(B)}


def sub_batch(batch: dict, keys: tuple[str, ...]) -> dict:
    out = {"image": batch["image"], "index": batch["index"]}
    for k in keys:
        out[k], out[f"has_{k}"] = batch[k], batch[f"has_{k}"]
    return out


# ----------------------------------------------------------------------------- train steps
# the recipes of configs/ (the modules users train), with what the timed batch needs: two classes, 3 channels
STEP_RECIPES = {
    "plain": ("full", {}, ("mask",)),
    "boxes": ("boxes", {}, ("boxes",)),
    # class-balanced pixel selection (the heavier of the two: one selection per class and network)
    "coteaching": ("noisy", {"model": {"selection": "pixel"}}, ("noisy_mask",)),
    # cluster labels given in the batch (``pseudo``); the CRF term from the first step
    "points": ("points", {"model": {"point_precompute": False, "point_crf_start_epoch": 0}}, ("points", "pseudo")),
}


def build_modules() -> dict:
    out = {}
    for name, (config, overrides, keys) in STEP_RECIPES.items():
        torch.manual_seed(0)
        m = load_recipe(config, overrides).build_model(encoder_weights=None, in_channels=3, num_classes=2)
        m.train()
        out[name] = (m, torch.optim.AdamW(m.parameters(), lr=1e-3), keys)
    out["coteaching"][0].keep_ratio = 0.7  # a real selection, as ForgetRateSchedule sets it (epoch 0 keeps all)
    return out


class Clock:
    """Wall time and process CPU time (all threads) of a block."""

    def __enter__(self):
        self._w, self._c = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall, self.cpu = time.perf_counter() - self._w, time.process_time() - self._c


def train_step(model, opt, batch) -> None:
    """The module's own training step (validate the batch, forward, loss terms, their weighted sum), backward and
    AdamW, without a Lightning loop around it."""
    loss = model.training_step(batch, 0)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def selection_share(model, opt, batch, repeats: int) -> list[float]:
    """Per step, the CPU time inside ``small_loss_selection`` (its profiler range) over the step's CPU time, both
    from ``torch.profiler`` on the same steps."""
    from torch.profiler import ProfilerActivity, profile, record_function

    shares = []
    for _ in range(repeats):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            with record_function("train_step"):
                train_step(model, opt, batch)
        totals = {e.key: e.cpu_time_total for e in prof.key_averages() if e.key in ("train_step",
                                                                                     "small_loss_selection")}
        shares.append(totals.get("small_loss_selection", 0.0) / totals["train_step"])
    return shares


def time_steps(repeats: int, warmup: int = 1) -> dict:
    batch = make_batch()
    mods = build_modules()
    wall, cpu = {name: [] for name in mods}, {name: [] for name in mods}
    names = list(mods)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*self.log.*")  # no Trainer: the step's logging is a no-op
        for r in range(warmup + repeats):
            for name in names[r % len(names):] + names[:r % len(names)]:   # rotate: no module always runs first
                model, opt, keys = mods[name]
                b = sub_batch(batch, keys)
                with Clock() as c:
                    train_step(model, opt, b)
                if r >= warmup:
                    wall[name].append(c.wall)
                    cpu[name].append(c.cpu)
        model, opt, keys = mods["coteaching"]
        selection = selection_share(model, opt, sub_batch(batch, keys), max(3, repeats // 2))
    return {"step_wall_s": wall, "step_cpu_s": cpu, "selection_share_cpu": selection}


# ----------------------------------------------------------------------------- tightness prior
def tightness_dense_reference(probs, boxes, t, w):
    """One dense boolean mask per band and a masked sum, image by image, box by box, band by band."""
    H, W = probs.shape[-2:]
    total = probs.new_zeros(())
    for i, bx in enumerate(boxes):
        for x0, y0, x1, y1 in bx.round().long().tolist():
            for xs in range(x0, x1, w):
                xe = min(xs + w, x1)
                m = torch.zeros(H, W, dtype=torch.bool)
                m[y0:y1, xs:xe] = True
                total = total + log_barrier((xe - xs) - probs[i][m].sum(), t)
            for ys in range(y0, y1, w):
                ye = min(ys + w, y1)
                m = torch.zeros(H, W, dtype=torch.bool)
                m[ys:ye, x0:x1] = True
                total = total + log_barrier((ye - ys) - probs[i][m].sum(), t)
    return total


def time_tightness(repeats: int, ref_repeats: int, B=8, size=256, n=4) -> dict:
    rng = np.random.default_rng(1)
    boxes = [torch.from_numpy(random_boxes(rng, n, size, 32, 192)) for _ in range(B)]
    probs = torch.rand(B, size, size, generator=torch.Generator().manual_seed(1)).requires_grad_(True)
    n_bands = sum(-(-(int(x1 - x0)) // 5) + -(-(int(y1 - y0)) // 5) for b in boxes for x0, y0, x1, y1 in b.tolist())

    def fast():
        probs.grad = None
        v = tightness_prior(probs, boxes, 5.0, band_width=5)
        v.backward()
        return v.item(), probs.grad.clone()

    def slow():
        probs.grad = None
        v = tightness_dense_reference(probs, boxes, 5.0, 5)
        v.backward()
        return v.item(), probs.grad.clone()

    fast()
    res = {"fast_wall_s": [], "fast_cpu_s": [], "reference_wall_s": [], "reference_cpu_s": []}
    for _ in range(repeats):
        with Clock() as c:
            vf, gf = fast()
        res["fast_wall_s"].append(c.wall)
        res["fast_cpu_s"].append(c.cpu)
    for _ in range(ref_repeats):
        with Clock() as c:
            vs, gs = slow()
        res["reference_wall_s"].append(c.wall)
        res["reference_cpu_s"].append(c.cpu)
    agree = abs(vf - vs) <= 1e-3 * max(1.0, abs(vs)) and torch.allclose(gf, gs, rtol=1e-3, atol=1e-5)
    return {**res, "bands": n_bands, "agree": bool(agree)}


# ----------------------------------------------------------------------------- DDP selection cost
def time_ddp_selection(repeats: int) -> dict:
    import torch.distributed as dist

    x = torch.rand(8, 128, 128)
    valid = torch.ones_like(x, dtype=torch.bool).reshape(-1)
    n = x.numel()
    res = {"items_per_rank": n, "bytes_sent_per_rank": {"radix": 4 * 256 * 8 + 8, "gather": 8 + 5 * n}}
    tmp = tempfile.mkdtemp()
    dist.init_process_group("gloo", init_method=f"file://{tmp}/init", rank=0, world_size=1)
    try:
        keys = selmod._ordered_keys(x).reshape(-1)
        values = x.reshape(-1)
        fns = {"radix": lambda: selmod._select_radix(keys, valid, 0.7, None, 1, 0),
               "gather": lambda: selmod._select_gather(values, valid, 0.7, None, 1, 0),
               "single_process": lambda: small_loss_selection(x, 0.7)}
        assert torch.equal(fns["radix"](), fns["gather"]())
        for name, fn in fns.items():
            fn()
            ts = []
            for _ in range(repeats):
                with Clock() as c:
                    fn()
                ts.append(c.cpu)
            res[f"{name}_cpu_s"] = ts
    finally:
        dist.destroy_process_group()
    return res


# ----------------------------------------------------------------------------- point pseudo-labels
def nuclei_image(size: int, n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    pts = rng.integers(10, size - 10, (n, 2))
    yy, xx = np.mgrid[:size, :size]
    fg = np.zeros((size, size), bool)
    for y, x in pts:
        sl = (slice(max(y - 9, 0), y + 10), slice(max(x - 9, 0), x + 10))
        fg[sl] |= (yy[sl] - y) ** 2 + (xx[sl] - x) ** 2 <= 64
    img = np.where(fg[..., None], [190, 80, 160], [40, 30, 60]) + rng.normal(0, 12, (size, size, 3))
    return np.clip(img, 0, 255).astype(np.uint8), pts


def _clip_segment(p0, p1, W, H):
    """Liang–Barsky clipping of the segment p0→p1 (x, y) to [0, W-1]×[0, H-1]; None when outside."""
    d = p1 - p0
    t0, t1 = 0.0, 1.0
    for p, q in ((-d[0], p0[0]), (d[0], W - 1 - p0[0]), (-d[1], p0[1]), (d[1], H - 1 - p0[1])):
        if p == 0:
            if q < 0:
                return None
            continue
        r = q / p
        if p < 0:
            t0 = max(t0, r)
        else:
            t1 = min(t1, r)
        if t0 > t1:
            return None
    return p0 + t0 * d, p0 + t1 * d


def reference_point_labels(img, pts):
    """Qu et al.'s recipe written the straightforward way (scipy Voronoi, sklearn KMeans, per-cell morphology)."""
    from scipy import ndimage as ndi
    from scipy.spatial import Voronoi
    from skimage import draw, morphology
    from sklearn.cluster import KMeans

    warnings.filterwarnings("ignore", category=FutureWarning, module="skimage")
    warnings.filterwarnings("ignore", category=FutureWarning, message=".*deprecated.*")
    H, W = img.shape[:2]
    vor = Voronoi(pts[:, ::-1].astype(float))                       # (x, y)
    centre, far = vor.points.mean(0), 4.0 * max(H, W)
    edges = np.zeros((H, W), bool)
    for (p, q), (a, b) in zip(vor.ridge_points, vor.ridge_vertices):
        if a >= 0 and b >= 0:
            v0, v1 = vor.vertices[a], vor.vertices[b]
        else:                                                        # an infinite ridge: ray away from the centre
            v0 = vor.vertices[max(a, b)]
            tang = vor.points[q] - vor.points[p]
            normal = np.array([-tang[1], tang[0]]) / np.linalg.norm(tang)
            mid = vor.points[[p, q]].mean(0)
            v1 = v0 + np.sign(np.dot(mid - centre, normal)) * normal * far
        seg = _clip_segment(np.asarray(v0, float), np.asarray(v1, float), W, H)
        if seg is None:
            continue
        rr, cc = draw.line(int(round(seg[0][1])), int(round(seg[0][0])), int(round(seg[1][1])), int(round(seg[1][0])))
        edges[rr, cc] = True
    point_mask = np.zeros((H, W), bool)
    point_mask[pts[:, 0], pts[:, 1]] = True
    voronoi = np.full((H, W), 255, np.uint8)
    voronoi[morphology.binary_dilation(point_mask, morphology.disk(2))] = 1
    voronoi[edges] = 0
    # cluster label
    dist = ndi.distance_transform_edt(~point_mask)
    feat = np.c_[img.reshape(-1, 3) / 10.0, np.minimum(dist, 20).reshape(-1)]
    assign = KMeans(n_clusters=3, n_init="auto", random_state=0).fit_predict(feat).reshape(H, W)
    nucleus = int(np.bincount(assign[point_mask], minlength=3).argmax())
    overlap = np.bincount(assign[morphology.binary_dilation(point_mask, morphology.disk(5))], minlength=3).astype(float)
    overlap[nucleus] = np.inf
    background = int(overlap.argmin())
    fg = morphology.remove_small_objects(assign == nucleus, 30)
    cells, _ = ndi.label(~edges)
    refined = np.zeros((H, W), bool)
    for i, sl in enumerate(ndi.find_objects(cells), 1):
        if sl is None:
            continue
        cell = cells[sl] == i
        m = morphology.binary_dilation(fg[sl] & cell, morphology.disk(5)) & cell
        m = morphology.binary_erosion(ndi.binary_fill_holes(m), morphology.disk(7))
        refined[sl] |= m
    bg = (assign == background) & ~morphology.binary_dilation(point_mask, morphology.disk(10))
    cluster = np.full((H, W), 255, np.uint8)
    cluster[bg] = 0
    cluster[refined] = 1
    return voronoi, cluster


def time_point_pseudo(repeats: int, ref_repeats: int, size: int, n: int) -> dict:
    from lightning_weakseg.pseudo import point_labels

    img, pts = nuclei_image(size, n)
    point_labels(img, pts)  # warm-up (imports, first-call allocations)
    res = {"ours_wall_s": [], "ours_cpu_s": [], "reference_wall_s": [], "reference_cpu_s": []}
    # interleaved rounds, so that load from other processes hits both alike
    for i in range(max(repeats, ref_repeats)):
        if i < repeats:
            with Clock() as clock:
                v, c = point_labels(img, pts)
            res["ours_wall_s"].append(clock.wall)
            res["ours_cpu_s"].append(clock.cpu)
        if i < ref_repeats:
            with Clock() as clock:
                rv, rc = reference_point_labels(img, pts)
            res["reference_wall_s"].append(clock.wall)
            res["reference_cpu_s"].append(clock.cpu)
    known = (c != 255) & (rc != 255)
    return {**res, "size": size, "points": n,
            "cluster_agreement_on_both_known": float((c == rc)[known].mean()) if known.any() else None}


# ----------------------------------------------------------------------------- report
def med(xs):
    return statistics.median(xs) if xs else float("nan")


def summarise(raw: dict) -> list[dict]:
    """Rows of the table: medians; ratios of CPU-time medians (wall-time ratio alongside)."""
    rows = []
    st = raw["steps"]
    c = {k: med(v) for k, v in st["step_cpu_s"].items()}
    w = {k: med(v) for k, v in st["step_wall_s"].items()}

    def step_row(name, what, target=None, limit=None):
        r = c[name] / c["plain"]
        row = dict(what=what, cpu=f"{c[name] * 1e3:.0f} ms", wall=f"{w[name] * 1e3:.0f} ms", ratio=r,
                   ratio_wall=w[name] / w["plain"], target=target or "(report)")
        if limit is not None:
            row["ok"] = bool(r <= limit)
        return row

    rows.append(step_row("plain", "(a) plain WeakSegModule train step, Unet-r18, 8×3×128²", "denominator"))
    rows.append(step_row("boxes", "(b) BoxSegModule step, 4 boxes/image", "≤ 1.15×", 1.15))
    rows.append(step_row("coteaching", "(d) CoTeachingSegModule step (2 nets, class-balanced pixel selection, R = 0.7)",
                         "≤ 2.2×", 2.2))
    share = med(st["selection_share_cpu"])
    rows.append(dict(what="(d) small-loss selection's share of the co-teaching step", cpu=f"{share * 100:.1f} %",
                     wall="", ratio=None, target="≤ 5 %", ok=bool(share <= 0.05)))
    rows.append(step_row("points", "(e) PointSegModule step (Voronoi CE + cluster CE + gated CRF, r = 5)"))
    t = raw["tightness"]
    sp = med(t["reference_cpu_s"]) / med(t["fast_cpu_s"])
    rows.append(dict(what=f"(c) tightness_prior fwd+bwd 8×256², 4 boxes/image ({t['bands']} bands); slow reference "
                          f"(dense mask per band): {med(t['reference_cpu_s']):.1f} s",
                     cpu=f"{med(t['fast_cpu_s']) * 1e3:.1f} ms", wall=f"{med(t['fast_wall_s']) * 1e3:.1f} ms",
                     ratio=sp, ratio_wall=med(t["reference_wall_s"]) / med(t["fast_wall_s"]),
                     target="≥ 20× faster", ok=bool(sp >= 20 and t["agree"])))
    if "ddp_selection" in raw:
        d = raw["ddp_selection"]
        b = d["bytes_sent_per_rank"]
        rows.append(dict(what=f"(f) DDP selection compute, {d['items_per_rank']} px on 1 rank: radix (sends "
                              f"{b['radix'] / 1024:.0f} KiB) vs gather (sends {b['gather'] / 1024:.0f} KiB, "
                              f"{med(d['gather_cpu_s']) * 1e3:.1f} ms); one-process path "
                              f"{med(d['single_process_cpu_s']) * 1e3:.1f} ms",
                         cpu=f"{med(d['radix_cpu_s']) * 1e3:.1f} ms", wall="",
                         ratio=med(d["radix_cpu_s"]) / med(d["gather_cpu_s"]), target="(report)"))
    if "point_pseudo" in raw:
        p = raw["point_pseudo"]
        sp = med(p["reference_cpu_s"]) / med(p["ours_cpu_s"])
        rows.append(dict(what=f"(g) Voronoi + cluster labels, {p['size']}² RGB, {p['points']} points; reference "
                              f"(scipy Voronoi + sklearn KMeans + per-cell skimage): {med(p['reference_cpu_s']):.2f} s",
                         cpu=f"{med(p['ours_cpu_s']):.2f} s", wall=f"{med(p['ours_wall_s']):.2f} s", ratio=sp,
                         ratio_wall=med(p["reference_wall_s"]) / med(p["ours_wall_s"]), target="≥ 10× faster",
                         ok=bool(sp >= 10)))
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| measurement | median CPU time | median wall | ratio (CPU) | ratio (wall) | target | met |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        ratio = "" if r.get("ratio") is None else f"{r['ratio']:.2f}×"
        ratio_w = "" if r.get("ratio_wall") is None else f"{r['ratio_wall']:.2f}×"
        ok = "" if "ok" not in r else ("yes" if r["ok"] else "no")
        lines.append(f"| {r['what']} | {r['cpu']} | {r['wall']} | {ratio} | {ratio_w} | {r['target']} | {ok} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=5, help="timed repeats per train step (median reported)")
    p.add_argument("--quick", action="store_true", help="smoke test: 2 repeats, (g) on 400² with 80 points")
    p.add_argument("--threads", type=int, default=1, help="torch / BLAS / OpenMP threads (default 1)")
    p.add_argument("--no-ddp", action="store_true", help="skip (f)")
    p.add_argument("--no-pseudo", action="store_true", help="skip (g)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "speed.json"))
    args = p.parse_args(argv)
    repeats = 2 if args.quick else args.repeats
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    load_start = os.getloadavg()[0]
    with threadpool_limits(args.threads):
        raw = {"steps": time_steps(repeats),
               "tightness": time_tightness(repeats=max(10, 3 * repeats), ref_repeats=1)}
        if not args.no_ddp:
            raw["ddp_selection"] = time_ddp_selection(20)
        if not args.no_pseudo:
            size, n = (400, 80) if args.quick else (1000, 500)
            raw["point_pseudo"] = time_point_pseudo(repeats=1 if args.quick else 3, ref_repeats=1, size=size, n=n)
    rows = summarise(raw)
    print(markdown(rows))
    given = argv if argv is not None else sys.argv[1:]
    meta = {"command": " ".join(["python", "benchmarks/speed.py", *given]), "repeats": repeats, "quick": args.quick,
            "threads": args.threads, "torch": torch.__version__, "python": platform.python_version(),
            "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "load_avg_1min": [load_start, os.getloadavg()[0]], "seconds": round(time.perf_counter() - t_start, 1),
            "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows, "raw": raw}, indent=1, default=float))
    print(f"\n{meta['seconds']} s, load average {meta['load_avg_1min']}; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
