"""DDP equivalence: a 2-process CPU DDP run (gloo) equals a 1-process run on the same global batch.

One subprocess runs ``scripts/ddp_regime_check.py`` for every case (never ``strategy="ddp"`` inside pytest: it
would re-run pytest). Per regime we compare, step by step, the samples each step saw, every loss term (the DDP
value is the mean of the two ranks' terms), co-teaching's selected pixels, the callbacks' state (barrier t, keep
ratio, pseudo-label round and labels), the validation metrics, and the final weights (both ranks bit-identical,
and equal to the 1-process weights). Runs are in float64 (``precision="64-true"``) with GroupNorm: the only
differences left are summation order (~1e-15), so an argmax can't flip on an undecided pixel and the metric
comparison at 1e-5 is meaningful; in float32 a barely trained model's Dice can move by a flipped pixel.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "ddp_regime_check.py"

# one line per regime: a case name of scripts/ddp_regime_check.py's CASES
REGIMES = [
    "plain",
    "boxes",
    "points",
    "coteaching",
    "coteaching_pc",
    "coteaching_dice",
    "robust",
    "scribbles",
    "mixed",
    "tags",
]
TERM_RTOL = 1e-5    # some losses compute in float32 internally (probs.float()), the rest is float64
WEIGHT_ATOL = 1e-9  # float64 weights after 4 AdamW steps differ by ~1e-14 (summation order of the all-reduce)
METRIC_ATOL = 1e-5


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ddp")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, str(SCRIPT), "--out", str(out), "--case", *REGIMES, "uneven", "skip"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=500)
    assert proc.returncode == 0, f"ddp_regime_check failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-6000:]}"
    return out


def load(run: Path) -> dict:
    ranks = sorted(int(p.stem[len("records_rank"):]) for p in run.glob("records_rank*.pt"))
    return {"weights": [torch.load(run / f"weights_rank{r}.pt") for r in ranks],
            "records": [torch.load(run / f"records_rank{r}.pt", weights_only=False) for r in ranks],
            "metrics": json.loads((run / "metrics.json").read_text())}


def max_weight_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a if a[k].numel())


def assert_same_state(x, y, where: str):
    if torch.is_tensor(x) or torch.is_tensor(y):
        assert torch.is_tensor(x) and torch.is_tensor(y) and torch.equal(x, y), where
    elif isinstance(x, dict):
        assert x.keys() == y.keys(), where
        for k in x:
            assert_same_state(x[k], y[k], f"{where}.{k}")
    else:
        assert x == y, f"{where}: {x!r} != {y!r}"


def compare(one: dict, two: dict, regime: str) -> dict:
    """Assert that the 2-process run ``two`` equals the 1-process run ``one``; return a few facts for more checks."""
    r1, (ra, rb) = one["records"][0], two["records"]
    assert r1["world_size"] == 1 and ra["world_size"] == rb["world_size"] == 2
    # both ranks ended bit-identical, and equal to the one-process weights
    w0, w1 = two["weights"]
    assert all(torch.equal(w0[k], w1[k]) for k in w0), f"{regime}: ranks ended with different weights"
    diff = max_weight_diff(one["weights"][0], w0)
    assert diff <= WEIGHT_ATOL, f"{regime}: 1-process vs DDP weights differ by {diff:.3g}"
    # step by step: the same samples, the same loss terms
    steps1, steps_a, steps_b = r1["records"], ra["records"], rb["records"]
    assert len(steps1) == len(steps_a) == len(steps_b) > 0
    facts = {"kept": 0, "candidates": 0}
    for k, (s1, sa, sb) in enumerate(zip(steps1, steps_a, steps_b)):
        together = sa["index"].tolist() + sb["index"].tolist()
        assert sorted(s1["index"].tolist()) == sorted(together), f"{regime} step {k}: other samples"
        assert len(sa["index"]) == len(sb["index"]), f"{regime} step {k}: ranks hold different batch sizes"
        # a term whose label no sample of a rank carries is absent there, i.e. 0 (mixed supervision)
        assert s1["terms"].keys() == sa["terms"].keys() | sb["terms"].keys()
        for name, v in s1["terms"].items():
            ddp = 0.5 * (sa["terms"].get(name, 0.0) + sb["terms"].get(name, 0.0))
            assert math.isclose(v, ddp, rel_tol=TERM_RTOL, abs_tol=1e-9), f"{regime} step {k} {name}: {v} vs {ddp}"
        if "select_a" in s1:  # co-teaching: the very same pixels selected, sample by sample
            row = {i: j for j, i in enumerate(s1["index"].tolist())}
            for s in (sa, sb):
                for j, i in enumerate(s["index"].tolist()):
                    for key in ("select_a", "select_b"):
                        assert torch.equal(s[key][j], s1[key][row[i]]), f"{regime} step {k} sample {i} {key}"
            facts["kept"] += int(s1["select_a"].sum())
            facts["candidates"] += int(s1["select_a"].numel())
    # callback state on both ranks equals the one-process state (t, keep ratio, pseudo round + labels)
    for r in (ra, rb):
        assert_same_state(r1["callbacks"], r["callbacks"], f"{regime} callbacks")
    # validation metrics (synced over ranks by torchmetrics) equal
    m1, m2 = one["metrics"], two["metrics"]
    assert m1.keys() == m2.keys() and "val/dice" in m1
    for key in m1:
        a, b = m1[key], m2[key]
        assert (math.isnan(a) and math.isnan(b)) or abs(a - b) <= METRIC_ATOL, f"{regime} {key}: {a} vs {b}"
    return facts


def test_foundation_val_dice_and_identical_ranks(runs):
    one, two = load(runs / "plain" / "d1"), load(runs / "plain" / "d2")
    assert abs(one["metrics"]["val/dice"] - two["metrics"]["val/dice"]) <= 1e-5
    w0, w1 = two["weights"]
    assert all(torch.equal(w0[k], w1[k]) for k in w0)
    assert max_weight_diff(one["weights"][0], w0) <= WEIGHT_ATOL
    # the run trained: weights moved away from their (seeded, shared) initialisation
    steps = one["records"][0]["records"]
    assert len(steps) == 4 and steps[-1]["terms"]["seg/ce"] < steps[0]["terms"]["seg/ce"]


@pytest.mark.parametrize("regime", REGIMES)
def test_regime_ddp_equals_one_process(runs, regime):
    one, two = load(runs / regime / "d1"), load(runs / regime / "d2")
    facts = compare(one, two, regime)
    cbs = one["records"][0]["callbacks"]
    if regime in ("coteaching", "coteaching_dice"):
        assert 0 < facts["kept"] < facts["candidates"]  # a real selection, not all or nothing
        assert cbs["ForgetRateSchedule"]["keep_ratio"] == 0.5
    if regime == "coteaching_pc":
        assert 0 < facts["kept"] < facts["candidates"]
        assert cbs["ForgetRateSchedule"]["keep_ratio"] == pytest.approx([0.9, 0.5, 0.6, 0.7])
        assert all("noisy/relabel_a" in step["terms"] for step in one["records"][0]["records"])
    if "PseudoLabelRefresh" in cbs:  # points, scribbles, mixed, tags: two rounds of real labels, gathered
        state = cbs["PseudoLabelRefresh"]
        assert state["round"] == 2 and state["labels"].shape[0] == one["records"][0]["train_size"]
        assert state["indices"].unique().numel() == state["labels"].shape[0]
        assert (state["labels"] != 255).sum() > state["labels"].numel() // 2
    if regime == "boxes":
        assert cbs["LogBarrierSchedule"]["t"] == 7.5  # t0 * mu at the last epoch (1)


def test_uneven_shards_equal_the_padded_order(runs):
    """15 training samples on 2 ranks: DistributedSampler pads to 16 by dealing sample 0 again (to rank 1), so
    both ranks hold 8 samples and 2 batches of 4 per epoch. The DDP run therefore equals one process trained on
    the padded order (samples 0..14 then 0), and differs from one process on the plain 15 samples."""
    padded, plain, two = (load(runs / "uneven" / v) for v in ("d1_padded", "d1", "d2"))
    ra, rb = two["records"]
    first = plain["records"][0]["records"][0]["index"][0].item()
    assert ra["train_size"] == 15
    assert [len(s["index"]) for s in ra["records"]] == [len(s["index"]) for s in rb["records"]] == [4, 4, 4, 4]
    assert rb["records"][1]["index"][-1].item() == first  # the repeated sample closes rank 1's epoch
    # 5 validation samples: 3 + 2 real ones; the filler that evens rank 1 out is not scored, so the metrics
    # (compared in compare()) equal the one-process metrics over the 5 samples exactly
    assert ra["val_size"] == 5
    compare(padded, two, "uneven")
    assert [len(s["index"]) for s in plain["records"][0]["records"]] == [8, 7, 8, 7]
    assert max_weight_diff(plain["weights"][0], two["weights"][0]) > 1e-4  # the duplicate does matter


def test_nonfinite_skip_is_collective(runs):
    """on_nonfinite="skip" under DDP: a NaN loss on rank 1 only makes *every* rank skip that step (one all-reduce
    of the decision), so the run equals one process skipping the same global batch, and the ranks stay identical.
    Without the shared decision rank 0 would step alone and the ranks would drift apart (or hang)."""
    one, two = load(runs / "skip" / "d1"), load(runs / "skip" / "d2")
    r1, (ra, rb) = one["records"][0], two["records"]
    nan_steps = [[s["step"] for s in r["records"] if any(math.isnan(v) for v in s["terms"].values())]
                 for r in (r1, ra, rb)]
    assert nan_steps[0] == [0] and nan_steps[1] == [] and nan_steps[2] == [0]  # seen on rank 1 only
    for r in (r1, ra, rb):
        assert r["optimizer_steps"] == 4   # Lightning counts the skipped step (as in one process) ...
        assert r["adamw_steps"] == [3.0]   # ... but AdamW saw no gradient for it
    w0, w1 = two["weights"]
    assert all(torch.equal(w0[k], w1[k]) for k in w0), "ranks ended with different weights"
    assert max_weight_diff(one["weights"][0], w0) <= WEIGHT_ATOL
