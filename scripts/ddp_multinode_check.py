"""Train co-teaching for a few steps under any DDP layout and write what ``tests/test_multinode.py`` compares.

The same script runs under every launcher; only the layout flags change:

    # two "nodes" of one process each (run both commands at once; on real machines --master_addr is node 0's)
    torchrun --nnodes 2 --nproc_per_node 1 --node_rank 0 --master_addr 127.0.0.1 --master_port 29533 \\
        scripts/ddp_multinode_check.py --num-nodes 2 --devices 1 --out /tmp/two_nodes
    torchrun --nnodes 2 --nproc_per_node 1 --node_rank 1 --master_addr 127.0.0.1 --master_port 29533 \\
        scripts/ddp_multinode_check.py --num-nodes 2 --devices 1 --out /tmp/node1
    # one node, two processes, started by torchrun ...
    torchrun --nnodes 1 --nproc_per_node 2 --master_addr 127.0.0.1 --master_port 29534 \\
        scripts/ddp_multinode_check.py --num-nodes 1 --devices 2 --out /tmp/one_node
    # ... or by Lightning itself
    python scripts/ddp_multinode_check.py --num-nodes 1 --devices 2 --out /tmp/lightning

Under torchrun Lightning picks ``TorchElasticEnvironment`` (ranks from ``RANK``/``LOCAL_RANK``/``GROUP_RANK``),
without it ``LightningEnvironment`` (its own launcher); the trainer is ``Trainer(accelerator="cpu",
devices=--devices, num_nodes=--num-nodes, strategy="ddp")`` with gloo either way.

What is trained: ``CoTeachingSegModule`` (Unet-resnet18, GroupNorm, ``encoder_weights=None``) on the synthetic
organ set, 32 px, 15 training samples (``EpochSampler`` pads them to 16, ``shuffle=True``), 5 validation samples
(``PaddedEvalSampler`` adds one flagged filler), per-rank batch 4, 2 epochs = 4 steps, keep ratio 0.6 (a real
per-pixel small-loss selection, global over the ranks).

Global rank 0 gathers every rank's records (``all_gather_object`` over the process group, i.e. across the
nodes) and writes to ``--out``:

* ``result.json`` — the layout (cluster environment, node/local/global rank of every process), per rank and
  step the raw sample indices, per validation batch the indices and ``pad`` flags, per step hashes of each
  rank's co-teaching selection and logits, the selected/candidate counts, the loss terms, the validation
  metrics, and a SHA-256 of each rank's final weights;
* ``selection.pt`` — per step and rank the inputs and outputs of ``coteaching_losses`` (logits of both
  networks, noisy target, keep ratio, selections), so that one process can redo the selection on the
  concatenated batch.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lightning as L  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import lightning_weakseg.regimes.coteaching as _coteaching_regime  # noqa: E402
from lightning_weakseg.data import WeakSegDataModule  # noqa: E402
from lightning_weakseg.regimes import CoTeachingSegModule  # noqa: E402

KEEP_RATIO = 0.6


def tensor_hash(t: torch.Tensor) -> str:
    t = t.detach().cpu().contiguous()
    h = hashlib.sha256(str((tuple(t.shape), str(t.dtype))).encode())
    h.update(t.view(torch.uint8).numpy().tobytes() if t.dtype != torch.bool else t.numpy().tobytes())
    return h.hexdigest()


def weights_hash(state: dict) -> str:
    h = hashlib.sha256()
    for k in sorted(state):
        h.update(k.encode())
        h.update(tensor_hash(state[k]).encode())
    return h.hexdigest()


class Recorder(L.Callback):
    """Per training step: the raw sample indices, the loss terms and co-teaching's inputs and selections; per
    validation batch: the raw indices and the ``pad`` flags of the evaluation filler."""

    def __init__(self):
        self.steps: list[dict] = []
        self.val_batches: list[dict] = []
        self._current: dict | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._current = {"epoch": int(trainer.current_epoch), "step": int(trainer.global_step),
                         "index": batch["index"].tolist()}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self._current is not None:
            self.steps.append(self._current)
            self._current = None

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        if not trainer.sanity_checking:
            pad = batch.get("pad", torch.zeros(len(batch["index"]), dtype=torch.bool))
            self.val_batches.append({"epoch": int(trainer.current_epoch), "index": batch["index"].tolist(),
                                     "pad": pad.tolist()})

    def record_selection(self, args, kwargs, res) -> None:
        if self._current is None:  # validation also computes the terms; only training steps are recorded
            return
        logits_a, logits_b, target, has, ratio = args
        self._current["coteaching"] = {
            "logits_a": logits_a.detach().cpu().clone(), "logits_b": logits_b.detach().cpu().clone(),
            "target": target.detach().cpu().clone(), "has": has.detach().cpu().clone(), "keep_ratio": ratio,
            "kwargs": {k: v for k, v in kwargs.items() if k != "group"},
            "select_a": res["select_a"].detach().cpu().clone(), "select_b": res["select_b"].detach().cpu().clone(),
            "candidates": res["candidates"].detach().cpu().clone(),
            "loss_a": float(res["loss_a"].detach()), "loss_b": float(res["loss_b"].detach())}


RECORDER = Recorder()
_original_coteaching_losses = _coteaching_regime.coteaching_losses


def _recording_coteaching_losses(*args, **kwargs):
    res = _original_coteaching_losses(*args, **kwargs)
    RECORDER.record_selection(args, kwargs, res)
    return res


_coteaching_regime.coteaching_losses = _recording_coteaching_losses


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-nodes", type=int, default=1)
    p.add_argument("--devices", type=int, default=2, help="processes per node")
    p.add_argument("--out", required=True, help="global rank 0 writes result.json and selection.pt here")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=4, help="per rank")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    L.seed_everything(0, verbose=False)
    dm = WeakSegDataModule(synthetic_kind="organ", n_samples=20, image_size=32, train_labels=["noisy_mask"],
                           batch_size=args.batch_size, eval_batch_size=2, augment="none", shuffle=True, seed=0,
                           val_fraction=0.25)
    model = CoTeachingSegModule(arch="Unet", encoder="resnet18", encoder_weights=None, in_channels=1, num_classes=4,
                                norm="group", lr=1e-3, forget_rate=0.4, num_gradual=1, selection="pixel")
    model.keep_ratio = KEEP_RATIO  # fixed (no schedule): every step makes a real selection
    trainer = L.Trainer(accelerator="cpu", devices=args.devices, num_nodes=args.num_nodes, strategy="ddp",
                        max_epochs=args.epochs, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, deterministic=True, num_sanity_val_steps=0,
                        default_root_dir=os.getcwd(), callbacks=[RECORDER])
    trainer.fit(model, dm)

    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    mine = {"global_rank": trainer.global_rank, "local_rank": trainer.local_rank, "node_rank": trainer.node_rank,
            "world_size": trainer.world_size, "pid": os.getpid(), "cwd": os.getcwd(),
            "cluster_environment": type(trainer.strategy.cluster_environment).__name__,
            "backend": dist.get_backend() if dist.is_initialized() else None,
            "weights_sha256": weights_hash(state), "weights_sum": float(sum(v.double().sum() for v in state.values())),
            "steps": RECORDER.steps, "val_batches": RECORDER.val_batches}
    ranks = [None] * trainer.world_size
    dist.all_gather_object(ranks, mine)  # over the process group, i.e. across the nodes
    if trainer.global_rank == 0:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        torch.save([[s.get("coteaching") for s in r["steps"]] for r in ranks], out / "selection.pt")
        per_rank = []
        for r in ranks:
            steps = []
            for s in r["steps"]:
                c = s.pop("coteaching", None)
                if c is not None:
                    s.update(select_a=tensor_hash(c["select_a"]), select_b=tensor_hash(c["select_b"]),
                             logits_a=tensor_hash(c["logits_a"]), logits_b=tensor_hash(c["logits_b"]),
                             kept_a=int(c["select_a"].sum()), kept_b=int(c["select_b"].sum()),
                             candidates=int(c["candidates"].sum()), loss_a=c["loss_a"], loss_b=c["loss_b"])
                steps.append(s)
            per_rank.append({**r, "steps": steps})
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(("val/", "train/"))}
        result = {"num_nodes": args.num_nodes, "devices": args.devices, "world_size": trainer.world_size,
                  "train_indices": [int(i) for i in dm.train_dataset.indices],
                  "val_indices": [int(i) for i in dm.val_dataset.indices],
                  "seed": 0, "batch_size": args.batch_size, "keep_ratio": KEEP_RATIO,
                  "metrics": metrics, "ranks": per_rank, "seconds": round(time.perf_counter() - t0, 2)}
        (out / "result.json").write_text(json.dumps(result, indent=1))
        print(f"ddp_multinode_check: {args.num_nodes} node(s) x {args.devices} process(es), "
              f"{per_rank[0]['cluster_environment']}, {result['seconds']} s -> {out}")
    dist.barrier()
    return 0


if __name__ == "__main__":
    sys.exit(main())
