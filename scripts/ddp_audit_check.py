"""The label audit with 1 process and with 2 ``torch.distributed`` processes (gloo, CPU): what tests/test_audit.py
compares.

    python scripts/ddp_audit_check.py --out /tmp/audit_ddp

Writes ``<out>/<variant>.json``, the ranked table of :func:`lightning_weakseg.audit.audit` (rank zero's; every rank
checks that it holds the same table):

* ``d1`` — one process scores the whole training split of a small synthetic set (23 images: uneven shards);
* ``d2_dataset`` — two processes, each scores every second sample of the same data set;
* ``d2_loader`` — two processes, the library's own training loader under ``torch.distributed``
  (``DistributedSampler``, which repeats samples to even out the shards: the table must drop the repeats).

The model is a seeded float64 network (the same weights in every process), so the only differences left between
the variants are batch composition and summation order.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402


def build():
    from lightning_weakseg import WeakSegModule
    from lightning_weakseg.data import WeakSegDataModule

    dm = WeakSegDataModule(source="synthetic", synthetic_kind="organ", n_samples=29, image_size=32, batch_size=3,
                           eval_batch_size=3, train_labels=["noisy_mask"], val_fraction=0.2, shuffle=False,
                           weakify={"noise_rate": 1.0, "noise_fraction": 0.5}, seed=0, check=False)
    dm.setup("fit")
    torch.manual_seed(0)
    model = WeakSegModule(arch="Unet", encoder="tu-resnet18", in_channels=dm.in_channels,
                          num_classes=dm.num_classes, norm="group",
                          model_kwargs={"encoder_depth": 3, "decoder_channels": [16, 8, 4]}).double().eval()
    return dm, model


def table(result) -> list[dict]:
    return [{k: r[k] for k in ("rank", "key", "id", "index", "score", "score_dice", "score_softmin",
                               "score_self_confidence", "error_type", "flagged_fraction")} for r in result.rows]


def run(dm, model, variant: str):
    from lightning_weakseg.audit import audit

    data = dm.train_dataset.subset(dm.train_dataset.indices, augment="none")
    if variant == "d2_loader":
        return audit(model, dm.train_eval_dataloader(batch_size=2), label_key="noisy_mask", num_worst=3)
    return audit(model, data, label_key="noisy_mask", batch_size=4 if variant == "d1" else 3, num_worst=3)


def worker(rank: int, world: int, port: int, out: str):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        dm, model = build()
        for variant in ("d2_dataset", "d2_loader"):
            result = run(dm, model, variant)
            rows = table(result)
            gathered = [None] * world
            dist.all_gather_object(gathered, rows)
            assert all(g == rows for g in gathered), "ranks disagree on the table"
            if rank == 0:
                worst = [w["row"]["key"] for w in result.worst]
                Path(out, f"{variant}.json").write_text(json.dumps({"rows": rows, "worst": worst}))
    finally:
        dist.destroy_process_group()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    Path(a.out).mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    dm, model = build()
    result = run(dm, model, "d1")
    Path(a.out, "d1.json").write_text(json.dumps({"rows": table(result),
                                                  "worst": [w["row"]["key"] for w in result.worst]}))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # fork: the workers inherit the imports (a spawned worker re-imports torch, Lightning and SMP: ~10 s each)
    mp.start_processes(worker, args=(2, port, a.out), nprocs=2, join=True, start_method="fork")
    print("ok")


if __name__ == "__main__":
    main()
