"""Multi-node DDP: two single-process "nodes" started by torchrun equal two processes on one node.

Three layouts of world size 2 run ``scripts/ddp_multinode_check.py`` (co-teaching, shuffled ``EpochSampler``,
uneven validation shards through ``PaddedEvalSampler``) on localhost, gloo, in subprocesses (never
``strategy="ddp"`` inside pytest):

* ``two_nodes``: two ``torchrun --nnodes 2 --nproc_per_node 1 --node_rank 0|1`` started at once, each in its own
  working directory, meeting at ``--master_addr 127.0.0.1 --master_port <free port>``;
* ``one_node``: ``torchrun --nnodes 1 --nproc_per_node 2``;
* ``lightning``: Lightning's own launcher (``devices=2``, no torchrun).

Global rank 0 gathers every rank's records across the process group. The test checks that the layouts really
differ (environment, node and local ranks) and that everything the library promises is identical: each rank's
sample order per step (and equal to a reference ``DistributedSampler`` written here), the validation shards and
their flagged filler, the co-teaching selection (hashes, counts, losses), the validation metrics and the final
weights (SHA-256, both ranks equal); and that the 2-node selection equals one process selecting on the
concatenated batch.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "ddp_multinode_check.py"
TIMEOUT = 300


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), "GLOO_SOCKET_IFNAME": "lo",
           "OMP_NUM_THREADS": "1"}
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "NODE_RANK", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT",
                "LOCAL_WORLD_SIZE", "TORCHELASTIC_RUN_ID"):
        env.pop(key, None)  # a launcher around pytest must not leak its ranks into the runs
    return env


def _torchrun(nnodes: int, nproc: int, node_rank: int, port: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(nnodes), "--nproc_per_node", str(nproc),
            "--node_rank", str(node_rank), "--master_addr", "127.0.0.1", "--master_port", str(port)]


def _wait(procs: dict[str, subprocess.Popen]) -> None:
    failed = []
    for name, proc in procs.items():
        try:
            out, err = proc.communicate(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            for other in procs.values():
                other.kill()
            out, err = proc.communicate()
            failed.append(f"{name}: timed out after {TIMEOUT} s\n{out[-2000:]}\n{err[-6000:]}")
            continue
        if proc.returncode != 0:
            failed.append(f"{name}: exit code {proc.returncode}\n{out[-2000:]}\n{err[-6000:]}")
    assert not failed, "\n\n".join(failed)


def _launch(cmd: list[str], cwd: Path) -> subprocess.Popen:
    cwd.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(cmd, cwd=cwd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.fixture(scope="module")
def layouts(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("multinode")
    script = [str(SCRIPT), "--epochs", "2"]
    # two nodes: both agents at once (node 0 hosts the rendezvous store); each writes only below its own dir
    port = free_port()
    nodes = {f"node{r}": _launch(_torchrun(2, 1, r, port) + script + ["--num-nodes", "2", "--devices", "1",
                                                                        "--out", str(base / f"node{r}" / "out")],
                                 base / f"node{r}") for r in (0, 1)}
    _wait(nodes)
    port = free_port()
    _wait({"one_node": _launch(_torchrun(1, 2, 0, port) + script + ["--num-nodes", "1", "--devices", "2",
                                                                     "--out", str(base / "one_node" / "out")],
                               base / "one_node")})
    _wait({"lightning": _launch([sys.executable] + script + ["--num-nodes", "1", "--devices", "2",
                                                             "--out", str(base / "lightning" / "out")],
                                base / "lightning")})
    assert not (base / "node1" / "out" / "result.json").exists(), "only global rank 0 writes"
    return {"two_nodes": base / "node0" / "out", "one_node": base / "one_node" / "out",
            "lightning": base / "lightning" / "out"}


def load(path: Path) -> dict:
    return json.loads((path / "result.json").read_text())


def test_the_layouts_are_what_they_claim(layouts):
    two, one, light = (load(layouts[k]) for k in ("two_nodes", "one_node", "lightning"))
    assert [(r["global_rank"], r["node_rank"], r["local_rank"]) for r in two["ranks"]] == [(0, 0, 0), (1, 1, 0)]
    assert [(r["global_rank"], r["node_rank"], r["local_rank"]) for r in one["ranks"]] == [(0, 0, 0), (1, 0, 1)]
    assert [(r["global_rank"], r["node_rank"], r["local_rank"]) for r in light["ranks"]] == [(0, 0, 0), (1, 0, 1)]
    assert {r["cluster_environment"] for r in two["ranks"] + one["ranks"]} == {"TorchElasticEnvironment"}
    assert {r["cluster_environment"] for r in light["ranks"]} == {"LightningEnvironment"}
    for res in (two, one, light):
        assert res["world_size"] == 2 and {r["world_size"] for r in res["ranks"]} == {2}
        assert {r["backend"] for r in res["ranks"]} == {"gloo"}
    # each node ran in its own working directory
    assert two["ranks"][0]["cwd"] != two["ranks"][1]["cwd"]
    assert Path(two["ranks"][1]["cwd"]).name == "node1"


def _reference_order(n: int, world: int, rank: int, seed: int, epoch: int) -> list[int]:
    """DistributedSampler(shuffle=True, drop_last=False), written out: permute with seed + epoch, pad to a
    multiple of the world size by repeating the first ones, deal round-robin."""
    g = torch.Generator()
    g.manual_seed(seed + epoch)
    perm = torch.randperm(n, generator=g).tolist()
    perm += perm[: (-n) % world]
    return perm[rank::world]


def test_sample_order_is_the_same_and_the_samplers_own(layouts):
    two = load(layouts["two_nodes"])
    train, bs = two["train_indices"], two["batch_size"]
    assert len(train) == 15  # uneven: EpochSampler pads to 16
    for rank, r in enumerate(two["ranks"]):
        epochs = sorted({s["epoch"] for s in r["steps"]})
        assert epochs == [0, 1]
        for e in epochs:
            seen = [i for s in r["steps"] if s["epoch"] == e for i in s["index"]]
            expected = [train[p] for p in _reference_order(len(train), 2, rank, two["seed"], e)]
            assert seen == expected, f"rank {rank} epoch {e}"
            assert [len(s["index"]) for s in r["steps"] if s["epoch"] == e] == [bs, bs]
    # shuffled: the epochs differ, and together the ranks cover the training set each epoch
    r0 = two["ranks"][0]["steps"]
    assert [s["index"] for s in r0 if s["epoch"] == 0] != [s["index"] for s in r0 if s["epoch"] == 1]
    for e in (0, 1):
        together = {i for r in two["ranks"] for s in r["steps"] if s["epoch"] == e for i in s["index"]}
        assert together == set(train)
    # evaluation: 5 samples on 2 ranks, 3 + 3 with one flagged filler on rank 1
    val = two["val_indices"]
    assert len(val) == 5
    for e in (0, 1):
        real = [(i, rank) for rank, r in enumerate(two["ranks"]) for b in r["val_batches"] if b["epoch"] == e
                for i, pad in zip(b["index"], b["pad"]) if not pad]
        pads = [i for r in two["ranks"] for b in r["val_batches"] if b["epoch"] == e
                for i, pad in zip(b["index"], b["pad"]) if pad]
        assert sorted(i for i, _ in real) == sorted(val) and len(pads) == 1
        assert [i for i, rank in real if rank == 0] == [val[0], val[2], val[4]]
    for other in ("one_node", "lightning"):
        res = load(layouts[other])
        assert res["train_indices"] == train and res["val_indices"] == val
        for a, b in zip(two["ranks"], res["ranks"]):
            assert [s["index"] for s in a["steps"]] == [s["index"] for s in b["steps"]], other
            assert a["val_batches"] == b["val_batches"], other


@pytest.mark.parametrize("other", ["one_node", "lightning"])
def test_two_nodes_equal_one_node(layouts, other):
    two, one = load(layouts["two_nodes"]), load(layouts[other])
    keys = ("select_a", "select_b", "logits_a", "logits_b", "kept_a", "kept_b", "candidates", "loss_a", "loss_b")
    for rank, (a, b) in enumerate(zip(two["ranks"], one["ranks"])):
        assert len(a["steps"]) == len(b["steps"]) == 4
        for k, (sa, sb) in enumerate(zip(a["steps"], b["steps"])):
            for key in keys:
                assert sa[key] == sb[key], f"rank {rank} step {k} {key}: {sa[key]} vs {sb[key]}"
    # both ranks end bit-identical, and identical to the other layout's
    hashes = {r["weights_sha256"] for r in two["ranks"] + one["ranks"]}
    assert len(hashes) == 1, f"final weights differ: {[r['weights_sum'] for r in two['ranks'] + one['ranks']]}"
    assert two["metrics"].keys() == one["metrics"].keys() and "val/dice" in two["metrics"]
    for key, value in two["metrics"].items():
        assert value == one["metrics"][key], f"{key}: {value} vs {one['metrics'][key]}"


def test_two_node_selection_is_global(layouts):
    """Per step, one process selecting on the concatenated batch (rank 0's samples first) keeps exactly the
    pixels the two nodes kept, and the 2-node losses average to the 1-process loss."""
    from lightning_weakseg.losses.coteaching import coteaching_losses

    two = load(layouts["two_nodes"])
    records = torch.load(layouts["two_nodes"] / "selection.pt", weights_only=False)
    assert len(records) == 2 and len(records[0]) == len(records[1]) == 4
    kept = candidates = 0
    for k, (ra, rb) in enumerate(zip(*records)):
        assert ra["keep_ratio"] == rb["keep_ratio"] == two["keep_ratio"]
        cat = {key: torch.cat([ra[key], rb[key]]) for key in ("logits_a", "logits_b", "target", "has")}
        single = coteaching_losses(cat["logits_a"], cat["logits_b"], cat["target"], cat["has"], ra["keep_ratio"],
                                   **ra["kwargs"])
        for key in ("select_a", "select_b"):
            together = torch.cat([ra[key], rb[key]])
            assert torch.equal(single[key], together), f"step {k} {key}: {int((single[key] != together).sum())} differ"
        for key in ("loss_a", "loss_b"):
            assert float(single[key]) == pytest.approx(0.5 * (ra[key] + rb[key]), rel=1e-5), f"step {k} {key}"
        kept += int(single["select_a"].sum())
        candidates += int(single["candidates"].sum())
    assert 0.55 * candidates < kept < 0.65 * candidates  # keep ratio 0.6 of the labelled pixels
