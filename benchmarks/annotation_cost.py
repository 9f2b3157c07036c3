r"""Annotation cost vs Dice: what each labelling choice buys, per second of annotator time.

    python benchmarks/annotation_cost.py benchmarks/results/acdc_*.json --dataset acdc --metric ratio

reads result files of ``benchmarks/run.py`` (``{"rows": [{"dataset", "regime", "labels", "dice", ...}], ...}``),
prices every regime with the time model below and plots Dice (``--metric dice``) or Dice / full masks
(``--metric ratio``) against annotation seconds per image (log axis) into ``docs/annotation_cost.png``; it also
prints the table.

Time model (seconds per image). Published per-unit times, all measured on natural images (PASCAL VOC, COCO) by
crowd workers — medical annotators are slower and pricier, but the *ratios* are what the plot is about:

=================== ============ =================================================================================
unit                seconds      source
=================== ============ =================================================================================
tag, per class      1.0          Bearman et al., "What's the point", ECCV 2016: image-level labels for the 20
                                 PASCAL classes take 20.0 s per image (≈ 1 s per class asked about).
point, per object   2.4          Bearman et al. 2016: one click per object takes 2.4 s (their one-point-per-class
                                 labels: 22.1 s per PASCAL image, tags included).
scribble, per       10.0         derived from Bearman et al. 2016's squiggle labels, 34.9 s per PASCAL image
object                           (tags included): (34.9 − 20.0) s over ≈ 1.5 classes per image. Scribble labels
                                 as in ScribbleSup (Lin et al., CVPR 2016); ACDC's scribbles: Valvano et al.,
                                 IEEE TMI 2021.
box, per object     7.0          Papadopoulos et al., "Extreme clicking", ICCV 2017: 7.0 s per box, against
                    (34.5)       34.5 s for the conventional draw-and-adjust protocol (``--box-seconds 34.5``).
mask, per object    79.2         COCO polygons (Lin et al., ECCV 2014), 79.2 s per instance as quoted by Bearman
                                 et al. and Papadopoulos et al.; 2.8 objects × 79.2 s + 20 s of tags ≈ 242 s is
                                 Bearman et al.'s 239.7 s per full PASCAL image.
=================== ============ =================================================================================

Per image, with C foreground classes and n objects (structures, polyps, nuclei) per image:

    tags = 1.0·C        points = 1.0·C + 2.4·n        scribble = 1.0·C + 10.0·n
    boxes = 7.0·n       mask = 79.2·n

Objects per image, counted on the data in ``../shared/data``: ACDC 2.71 structures per slice (of RV, Myo, LV;
1512 slices), Kvasir 1.07 boxes per image (998 images), DSB2018 43.2 nuclei per image (564 images). A mixed regime
costs the fraction-weighted sum, e.g. {mask: 0.1, boxes: 0.9} → 0.1·mask + 0.9·boxes; a label key "mask+tags"
costs both. Override any unit with ``--unit-seconds '{"box": 34.5}'`` and the objects with ``--objects``.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Iterable

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE.parent / "docs" / "annotation_cost.png"

# seconds per unit (see the module docstring for the sources)
UNIT_SECONDS: dict[str, float] = {"tag": 1.0, "point": 2.4, "scribble": 10.0, "box": 7.0, "mask": 79.2}
# (foreground classes C, objects per image n), counted on ../shared/data
DATASET_STATS: dict[str, tuple[int, float]] = {"acdc": (3, 2.71), "kvasir": (1, 1.07), "dsb2018": (1, 43.2)}


def label_seconds(label: str, classes: int, objects: float, units: dict[str, float] | None = None) -> float:
    """Seconds to give one image the label ``label`` (``tags``, ``points``, ``scribble``, ``boxes``, ``mask``, or
    several joined by ``+``)."""
    u = {**UNIT_SECONDS, **(units or {})}
    cost = {"tags": u["tag"] * classes,
            "points": u["tag"] * classes + u["point"] * objects,
            "scribble": u["tag"] * classes + u["scribble"] * objects,
            "boxes": u["box"] * objects,
            "mask": u["mask"] * objects}
    total = 0.0
    for part in label.split("+"):
        if part not in cost:
            raise ValueError(f"no annotation time for label {part!r}; expected one of {sorted(cost)}")
        total += cost[part]
    return total


def regime_seconds(fractions: dict[str, float], classes: int, objects: float,
                   units: dict[str, float] | None = None) -> float:
    """Fraction-weighted seconds per image of a label mix, e.g. ``{"mask": 0.1, "boxes": 0.9}``."""
    total = sum(fractions.values())
    if abs(total - 1) > 1e-6:
        raise ValueError(f"label fractions must sum to 1, got {fractions} (sum {total})")
    return sum(f * label_seconds(k, classes, objects, units) for k, f in fractions.items())


def row_fractions(row: dict[str, Any], registry: dict[str, Any] | None = None) -> dict[str, float]:
    """The label mix of a result row: its own ``label_fractions``, else the registry entry's, else every image
    carries all of ``labels`` (``"mask+boxes"`` → ``{"mask+boxes": 1}``)."""
    if row.get("label_fractions"):
        return dict(row["label_fractions"])
    reg = (registry or {}).get(row["regime"])
    if reg is not None and getattr(reg, "label_fractions", None):
        return dict(reg.label_fractions)
    return {row["labels"]: 1.0}


def load_rows(paths: Iterable[str | Path], dataset: str | None = None) -> list[dict[str, Any]]:
    """Rows of the result files; for a repeated (dataset, regime) the later file wins."""
    rows: dict[tuple[str, str], dict] = {}
    for p in paths:
        payload = json.loads(Path(p).read_text())
        if "rows" not in payload:
            raise ValueError(f"{p}: expected a benchmarks/run.py result with a 'rows' list")
        for r in payload["rows"]:
            if dataset is None or r["dataset"] == dataset:
                rows[(r["dataset"], r["regime"])] = r
    return list(rows.values())


def cost_table(rows: list[dict[str, Any]], registry: dict[str, Any] | None = None,
               units: dict[str, float] | None = None,
               objects: dict[str, float] | None = None) -> list[dict[str, Any]]:
    """Each row with ``seconds_per_image`` and ``ratio`` (Dice / the same data set's ``full`` Dice, or None)."""
    full = {r["dataset"]: r["dice"] for r in rows if r["regime"] == "full"}
    out = []
    for r in rows:
        ds = r["dataset"]
        if ds not in DATASET_STATS:
            raise ValueError(f"no class/object counts for data set {ds!r}; known: {sorted(DATASET_STATS)}")
        classes, n = DATASET_STATS[ds]
        n = (objects or {}).get(ds, n)
        fr = row_fractions(r, registry)
        out.append({**r, "fractions": fr, "seconds_per_image": regime_seconds(fr, classes, n, units),
                    "ratio": r["dice"] / full[ds] if ds in full and full[ds] > 0 else None})
    return sorted(out, key=lambda r: (r["dataset"], r["seconds_per_image"]))


def markdown(table: list[dict[str, Any]]) -> str:
    lines = ["| data set | regime | label mix | s / image | Dice | Dice / full |", "|---|---|---|---|---|---|"]
    for r in table:
        mix = ", ".join(f"{k} {v:.0%}" for k, v in r["fractions"].items())
        ratio = "—" if r["ratio"] is None else f"{r['ratio']:.3f}"
        lines.append(f"| {r['dataset']} | {r['regime']} | {mix} | {r['seconds_per_image']:.1f} | {r['dice']:.3f} | "
                     f"{ratio} |")
    return "\n".join(lines)


def plot(table: list[dict[str, Any]], out: str | Path, metric: str = "ratio", title: str | None = None) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if metric not in ("dice", "ratio"):
        raise ValueError(f"metric must be 'dice' or 'ratio', got {metric!r}")
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for ds in sorted({r["dataset"] for r in table}):
        pts = [r for r in table if r["dataset"] == ds and (metric == "dice" or r["ratio"] is not None)]
        if not pts:
            continue
        xs = [r["seconds_per_image"] for r in pts]
        ys = [r["dice"] if metric == "dice" else r["ratio"] for r in pts]
        ax.scatter(xs, ys, label=ds, zorder=3)
        for r, x, y in zip(pts, xs, ys):
            ax.annotate(r["regime"], (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("annotation time per image, s (log; time model in benchmarks/annotation_cost.py)")
    ax.set_ylabel("Dice" if metric == "dice" else "Dice / Dice with full masks")
    if metric == "ratio":
        ax.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(title="data set")
    ax.set_title(title or "Segmentation quality vs annotation cost")
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out


def _registry() -> dict[str, Any]:
    sys.path.insert(0, str(HERE))
    try:
        from common import REGIMES
    except ImportError:  # the cost model does not need the training stack
        return {}
    return REGIMES


def main(argv=None) -> list[dict[str, Any]]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", nargs="+", help="result JSON files of benchmarks/run.py")
    p.add_argument("--dataset", default=None, help="keep only this data set's rows")
    p.add_argument("--metric", choices=("dice", "ratio"), default="ratio")
    p.add_argument("--out", default=str(DEFAULT_OUT))
    p.add_argument("--unit-seconds", default=None, help='JSON overrides of the unit times, e.g. \'{"box": 34.5}\'')
    p.add_argument("--objects", default=None, help='JSON objects per image by data set, e.g. \'{"acdc": 3}\'')
    p.add_argument("--title", default=None)
    p.add_argument("--regimes", default=None, help="comma-separated regimes to plot (default: every row; e.g. leave "
                   "out tuning variants)")
    a = p.parse_args(argv)
    units = json.loads(a.unit_seconds) if a.unit_seconds else None
    unknown = set(units or {}) - set(UNIT_SECONDS)
    if unknown:
        p.error(f"unknown units {sorted(unknown)}; known: {sorted(UNIT_SECONDS)}")
    rows = load_rows(a.results, a.dataset)
    if a.regimes:
        keep = {r.strip() for r in a.regimes.split(",")}
        rows = [r for r in rows if r["regime"] in keep]
    if not rows:
        p.error(f"no rows{' for data set ' + a.dataset if a.dataset else ''} in {a.results}")
    table = cost_table(rows, _registry(), units, json.loads(a.objects) if a.objects else None)
    out = plot(table, a.out, a.metric, a.title)
    print(markdown(table))
    print(f"wrote {out}")
    return table


if __name__ == "__main__":
    main()
