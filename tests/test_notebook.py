"""Runs notebooks/compare_cam_variants.ipynb with nbclient (synthetic data only) and checks what it found:
trained CAMs beat trivial baselines, the random walk improves Grad-CAM, and the variants that are the same map
for a global-average-pooling + linear head give the same pseudo-masks.

The committed notebook keeps the outputs of its last run, so that its pictures show without running it; after
changing it, store fresh outputs with ``python tests/test_notebook.py`` (about 1–2 minutes on 2 CPU cores)."""
import json
import os
import time
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NB = Path(__file__).resolve().parents[1] / "notebooks" / "compare_cam_variants.ipynb"
BUDGET_S = 240  # ≈ 60–100 s on the shared 2-core machine, more under load


def execute(out: Path):
    """The notebook run with nbclient (results written to ``out``) and the seconds it took."""
    saved = {k: os.environ.get(k) for k in ("CAM_NOTEBOOK_OUT", "CAM_NOTEBOOK_ACDC", "MPLBACKEND")}
    os.environ.update({"CAM_NOTEBOOK_OUT": str(out), "MPLBACKEND": "module://matplotlib_inline.backend_inline"})
    os.environ.pop("CAM_NOTEBOOK_ACDC", None)  # the test never needs ../shared/data
    try:
        nb = nbformat.read(NB, as_version=4)
        client = NotebookClient(nb, timeout=BUDGET_S, kernel_name="python3",
                                resources={"metadata": {"path": str(NB.parent)}})
        start = time.time()
        client.execute()
        return nb, time.time() - start
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="module")
def executed(tmp_path_factory):
    out = tmp_path_factory.mktemp("notebook") / "results.json"
    nb, seconds = execute(out)
    return nb, json.loads(out.read_text()), seconds


def test_notebook_runs_within_budget_and_shows_a_grid(executed):
    nb, res, seconds = executed
    assert seconds < BUDGET_S, f"notebook took {seconds:.0f} s"
    images = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
              if "image/png" in o.get("data", {})]
    assert len(images) >= 1, "the tiles × variants grid was not drawn"
    assert res["acdc"] is None  # no real data in the test


def test_the_committed_notebook_shows_its_outputs():
    """Readers see the grid and the table without running anything: the file holds a complete run."""
    nb = nbformat.read(NB, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert [c.execution_count for c in code] == list(range(1, len(code) + 1)), "not one run, in order"
    outputs = [o for c in code for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    assert any("image/png" in o.get("data", {}) for o in outputs), "the grid is not stored"
    assert any("| CAM variant |" in o.get("text", "") for o in outputs), "the IoU table is not stored"


def test_cam_pseudo_masks_beat_baselines(executed):
    _, res, _ = executed
    iou, base = res["iou"], res["baselines"]
    assert set(iou) == {"CAM", "GradCAM", "GradCAMPlusPlus", "XGradCAM", "LayerCAM", "HiResCAM", "ScoreCAM",
                        "EigenCAM"}
    # the classifier learned the tags: better than always answering the majority (32 held-out tiles; the organ is
    # in 94 % of them, so it can only tie there). The exact accuracies move with the CPU's float kernels (lesion
    # 0.78-0.91 on machines that otherwise agree), hence the comparison with the majority, not a fixed bound
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
    # both refinements sharpen Grad-CAM along intensity edges. The margins move with the CPU's float kernels like
    # the accuracies above (random walk +0.048 / +0.016, CRF +0.052 / +0.039 over raw on two CPUs, each run
    # repeatable), hence a fixed margin only for the CRF and "better than raw" for the random walk
    assert iou["GradCAM"]["crf"] > iou["GradCAM"]["raw"] + 0.02, iou["GradCAM"]
    assert iou["GradCAM"]["random_walk"] > iou["GradCAM"]["raw"], iou["GradCAM"]


def test_equivalent_variants_agree(executed):
    """GAP + linear after the target layer: spatially constant gradients, so Grad-CAM, XGrad-CAM and HiResCAM
    are CAM up to scale — the same pseudo-masks."""
    _, res, _ = executed
    iou = res["iou"]
    for name in ("GradCAM", "XGradCAM", "HiResCAM"):
        for how in ("raw", "crf", "random_walk"):
            assert iou[name][how] == pytest.approx(iou["CAM"][how], abs=1e-3), (name, how)
    assert iou["GradCAMPlusPlus"]["raw"] != pytest.approx(iou["CAM"]["raw"], abs=1e-6)


if __name__ == "__main__":  # store the outputs of a fresh run in the notebook (see the module docstring)
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        nb, seconds = execute(Path(tmp) / "results.json")
    for cell in nb.cells:
        cell.metadata.pop("execution", None)  # per-cell timestamps: noise in the diff
    nbformat.write(nb, NB)
    print(f"wrote {NB} ({seconds:.0f} s)")
