"""Check that co-teaching's small-loss selection is global across DDP ranks.

Spawns ``--world-size`` CPU processes (gloo). Every process builds the same global batch from a seed, keeps
its own rank-major slice along dim 0 (ranks may hold different batch sizes, one may hold nothing valid),
runs ``small_loss_selection`` (both methods) and, when ``--model`` is given, the per-pixel and per-sample
selection of two tiny peer networks through ``CoTeachingMixin``'s code path. Rank 0 gathers the selections
and compares them with one process selecting on the concatenated batch and with a brute-force sort.

    python scripts/ddp_coteaching_check.py --out /tmp/ddp.json          # exit code 0 = identical
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from lightning_weakseg.losses.coteaching import small_loss_selection  # noqa: E402

RATIOS = (0.0, 0.3, 0.5, 0.7, 0.913, 1.0)


def brute_force(losses: torch.Tensor, valid: torch.Tensor, ratio: float) -> torch.Tensor:
    """The definition, written slowly: sort (loss, position) pairs, keep the first floor(R N + 1/2)."""
    flat, ok = losses.reshape(-1).float().tolist(), valid.reshape(-1).tolist()
    items = sorted((v, i) for i, (v, good) in enumerate(zip(flat, ok)) if good)
    k = int(len(items) * ratio + 0.5)
    keep = torch.zeros(len(flat), dtype=torch.bool)
    for _, i in items[:k]:
        keep[i] = True
    return keep.reshape(losses.shape)


def make_cases(seed: int, sizes: list[int], hw: int):
    """Global (losses, valid) tensors with many exact ties, split rank-major by ``sizes``."""
    g = torch.Generator().manual_seed(seed)
    b = sum(sizes)
    pix = torch.randint(0, 12, (b, hw, hw), generator=g).float() / 7.0          # only 12 distinct values
    pix_valid = torch.rand(b, hw, hw, generator=g) > 0.2
    one_empty = pix_valid.clone()
    one_empty[sizes[0]:sizes[0] + sizes[1]] = False                              # rank 1 holds nothing valid
    smp = torch.randint(0, 4, (b,), generator=g).float()
    smp_valid = torch.rand(b, generator=g) > 0.25
    cont = torch.rand(b, hw, hw, generator=g)                                    # continuous, ties unlikely
    return {"pixel_ties": (pix, pix_valid), "pixel_rank1_empty": (pix, one_empty),
            "sample_ties": (smp, smp_valid), "pixel_continuous": (cont, torch.ones_like(cont, dtype=torch.bool))}


def _slice(t: torch.Tensor, sizes: list[int], rank: int) -> torch.Tensor:
    start = sum(sizes[:rank])
    return t[start:start + sizes[rank]]


def _gather_rank_major(local: torch.Tensor, sizes: list[int], world: int) -> torch.Tensor:
    """All-gather tensors of different batch sizes and concatenate them in rank order."""
    pad = torch.zeros((max(sizes),) + tuple(local.shape[1:]), dtype=local.dtype)
    pad[: local.shape[0]] = local
    parts = [torch.empty_like(pad) for _ in range(world)]
    dist.all_gather(parts, pad)
    return torch.cat([p[:s] for p, s in zip(parts, sizes)])


def model_inputs(seed: int, b: int):
    g = torch.Generator().manual_seed(seed + 1)
    images = torch.rand(b, 3, 32, 32, generator=g)
    noisy = torch.randint(0, 2, (b, 32, 32), generator=g)
    noisy[torch.rand(b, 32, 32, generator=g) < 0.1] = 255
    return images, noisy


def model_selections(images: torch.Tensor, noisy: torch.Tensor, ratio: float) -> dict:
    """Selections of the co-teaching mixin's code path on two fixed tiny networks (same weights everywhere):
    class-balanced pixel and Dice-ranked sample selection, each also with co-teaching+ (its fallback counts the
    disagreement items over all ranks)."""
    import segmentation_models_pytorch as smp
    from lightning_weakseg.losses.coteaching import coteaching_losses

    torch.manual_seed(0)
    kw = dict(encoder_name="resnet18", encoder_weights=None, encoder_depth=3, decoder_channels=(16, 8, 4), classes=2)
    net_a, net_b = smp.create_model("Unet", **kw).eval(), smp.create_model("Unet", **kw).eval()
    with torch.no_grad():
        la, lb = net_a(images), net_b(images)
    out = {}
    for selection in ("pixel", "sample"):
        for plus in (False, True):
            sel = coteaching_losses(la, lb, noisy, torch.ones(len(noisy), dtype=torch.bool), ratio,
                                    selection=selection, experimental={"coteach_plus": plus})
            out[f"model_{selection}{'_plus' if plus else ''}/R={ratio}"] = (sel["select_a"], sel["select_b"])
    return out


def worker(rank: int, world: int, init_file: str, args, result_file: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    sizes = args.sizes
    gathered, timing = {}, {}
    for name, (losses, valid) in make_cases(args.seed, sizes, args.hw).items():
        for method in ("radix", "gather"):
            for ratio in RATIOS:
                local = small_loss_selection(_slice(losses, sizes, rank), ratio, _slice(valid, sizes, rank),
                                             method=method)
                gathered[(name, method, ratio)] = _gather_rank_major(local, sizes, world)
    if args.model:
        images, noisy = model_inputs(args.seed, sum(sizes))
        for ratio in (0.5, 0.8):
            sel = model_selections(_slice(images, sizes, rank), _slice(noisy, sizes, rank), ratio)
            for key, (sa, sb) in sel.items():
                gathered[key] = (_gather_rank_major(sa, sizes, world), _gather_rank_major(sb, sizes, world))
    if args.time:
        # cost of one global per-pixel selection, batch 8x128x128 per rank
        x = torch.rand(8, 128, 128)
        for method in ("radix", "gather"):
            small_loss_selection(x, 0.7, method=method)
            dist.barrier()
            t0 = time.perf_counter()
            for _ in range(args.time):
                small_loss_selection(x, 0.7, method=method)
            timing[method] = 1000 * (time.perf_counter() - t0) / args.time
    if rank == 0:
        torch.save({"gathered": gathered, "timing_ms": timing}, result_file)
    dist.barrier()
    dist.destroy_process_group()


def compare(args, gathered: dict) -> dict:
    """Single process (no process group here) on the concatenated batch, and the brute-force definition."""
    report = {"checked": 0, "mismatches": []}
    cases = make_cases(args.seed, args.sizes, args.hw)
    for (name, method, ratio), together in ((k, v) for k, v in gathered.items() if isinstance(k, tuple)):
        losses, valid = cases[name]
        single = small_loss_selection(losses, ratio, valid, method=method)
        ref = brute_force(losses, valid, ratio)
        report["checked"] += 1
        if not (torch.equal(together, single) and torch.equal(single, ref)):
            report["mismatches"].append(
                f"{name}/{method}/R={ratio}: ddp kept {int(together.sum())}, single {int(single.sum())}, "
                f"reference {int(ref.sum())}, ddp differs from the reference on {int((together != ref).sum())}")
    if args.model:
        images, noisy = model_inputs(args.seed, sum(args.sizes))
        single = {}
        for ratio in (0.5, 0.8):
            single.update(model_selections(images, noisy, ratio))
        for key, (ra, rb) in single.items():
            ga, gb = gathered[key]
            report["checked"] += 1
            if not (torch.equal(ga, ra) and torch.equal(gb, rb)):
                report["mismatches"].append(f"{key}: ddp and single-process selections differ on "
                                            f"{int((ga != ra).sum())} + {int((gb != rb).sum())} items")
            elif not (0 < int(ra.sum()) < ra.numel()):
                report["mismatches"].append(f"{key}: degenerate selection of {int(ra.sum())} items")
    return report


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world-size", type=int, default=2)
    p.add_argument("--sizes", type=int, nargs="+", default=None,
                   help="batch size held by each rank (default 3 2 for 2 ranks)")
    p.add_argument("--hw", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", action="store_true", help="also check the mixin's selection on two tiny networks")
    p.add_argument("--time", type=int, default=0, help="time N global selections of 8x128x128 per rank")
    p.add_argument("--out", default=None, help="write the JSON report here")
    args = p.parse_args(argv)
    if args.sizes is None:
        args.sizes = [3, 2] + [2] * (args.world_size - 2)
    if len(args.sizes) != args.world_size:
        p.error(f"--sizes needs {args.world_size} values, got {len(args.sizes)}")
    with tempfile.TemporaryDirectory() as tmp:
        init_file, result_file = os.path.join(tmp, "init"), os.path.join(tmp, "report.json")
        t0 = time.perf_counter()
        mp.spawn(worker, args=(args.world_size, init_file, args, result_file), nprocs=args.world_size, join=True)
        result = torch.load(result_file, weights_only=False)
    report = compare(args, result["gathered"])
    report["timing_ms_per_selection_8x128x128_per_rank"] = result["timing_ms"]
    report["seconds"] = round(time.perf_counter() - t0, 2)
    report["ok"] = not report["mismatches"] and report["checked"] > 0
    report["world_size"], report["sizes"] = args.world_size, args.sizes
    text = json.dumps(report, indent=1)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
