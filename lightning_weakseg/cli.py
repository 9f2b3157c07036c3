"""Command line: ``weakseg fit|validate|test|predict --config ...`` (LightningCLI), ``weakseg demo``, ``weakseg check``
and ``weakseg audit`` (label quality, :mod:`lightning_weakseg.audit`).

``--model`` takes a class path or a short class name of any module of :mod:`lightning_weakseg.regimes`
(``--model BoxSegModule``). ``weakseg predict ... --output_dir out/`` is short for
``--trainer.callbacks+=lightning_weakseg.callbacks.MaskWriter --trainer.callbacks.output_dir=out/
--return_predictions=false``: one mask per image of ``--data.predict_dir``.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from jsonargparse import DefaultHelpFormatter
from lightning.pytorch.cli import LightningCLI

from . import regimes
from .data import WeakSegDataModule
from .module import WeakSegModule


class WeakSegCLI(LightningCLI):
    def add_arguments_to_parser(self, parser):
        # one source of truth: the data decides classes and channels, the model follows
        parser.link_arguments("data.num_classes", "model.init_args.num_classes", apply_on="instantiate")
        parser.link_arguments("data.in_channels", "model.init_args.in_channels", apply_on="instantiate")

    def before_predict(self):
        from lightning.pytorch.callbacks import BasePredictionWriter
        from lightning.pytorch.utilities import rank_zero_warn

        if not any(isinstance(c, BasePredictionWriter) for c in self.trainer.callbacks):
            rank_zero_warn("weakseg predict: no prediction writer, so no masks are written (the predictions stay in "
                           "memory); add --output_dir DIR to write one mask per image")


# what each ready-made module learns from (for --help)
REGIME_LABELS = {"WeakSegModule": "full masks (the baseline)", "BoxSegModule": "bounding boxes",
                 "PointSegModule": "points (a click per object)", "CoTeachingSegModule": "noisy masks, co-teaching",
                 "RobustSegModule": "noisy masks, GCE / SCE losses", "ScribbleSegModule": "scribbles",
                 "MixedSegModule": "masks, scribbles, boxes and points mixed", "TagSegModule": "image-level tags"}


def regime_modules() -> dict[str, str]:
    """The ready-made modules of :mod:`lightning_weakseg.regimes` (``--model <name>``) and the labels they
    learn from."""
    out = {"WeakSegModule": REGIME_LABELS["WeakSegModule"]}
    for name in sorted(dir(regimes)):
        cls = getattr(regimes, name)
        if isinstance(cls, type) and issubclass(cls, WeakSegModule) and cls is not WeakSegModule:
            out[name] = REGIME_LABELS.get(name, "")
    return out


def _help_epilog() -> str:
    lines = ["other subcommands:", "  demo                full supervision vs. one weak regime on synthetic data "
             "(weakseg demo --help)", "  check               the data check of a config's data, without training",
             "  audit               rank a config's dense labels by label quality (weakseg audit --help)",
             "", "regimes (--model <name>):"]
    lines += [f"  {name:<20}{doc}" for name, doc in regime_modules().items()]
    lines += ["", "write masks for a folder of new images:",
              "  weakseg predict --config CONFIG --ckpt_path CKPT --data.predict_dir DIR --output_dir OUT"]
    return "\n".join(lines)


class _HelpFormatter(DefaultHelpFormatter):
    """jsonargparse's help, with the epilog's lines kept as written."""

    def _fill_text(self, text, width, indent):
        return "".join(indent + line for line in text.splitlines(keepends=True))


def cli_main(args=None):
    return WeakSegCLI(WeakSegModule, WeakSegDataModule, subclass_mode_model=True, args=args,
                      save_config_kwargs={"overwrite": True},
                      parser_kwargs={"description": "lightning-weakseg: train segmentation-models-pytorch models "
                                                    "from weak labels (LightningCLI subcommands below).",
                                     "epilog": _help_epilog(), "formatter_class": _HelpFormatter})


def predict_shortcut(args: list[str]) -> list[str]:
    """``weakseg predict ... --output_dir OUT`` → a :class:`~lightning_weakseg.callbacks.MaskWriter` writing to
    OUT and ``--return_predictions=false`` (the masks are on disk, not collected in memory)."""
    if not args or args[0] != "predict":
        return args
    out, rest, i = None, [], 0
    while i < len(args):
        a = args[i]
        if a == "--output_dir" and i + 1 < len(args):
            out, i = args[i + 1], i + 2
            continue
        if a.startswith("--output_dir="):
            out, i = a.split("=", 1)[1], i + 1
            continue
        rest.append(a)
        i += 1
    if out is None:
        return args
    rest += ["--trainer.callbacks+=lightning_weakseg.callbacks.MaskWriter", f"--trainer.callbacks.output_dir={out}"]
    if not any(a.startswith("--return_predictions") for a in rest):
        rest.append("--return_predictions=false")
    return rest


# the weak regime the demo trains next to full supervision (configs/full.yaml): its recipe in configs/
# the weak regime the demo trains beside full masks: (config of configs/, overrides). boxes.yaml's constraint weights
# (0.3) were chosen on Kvasir; on the synthetic organ set the paper's weights (1, the module's default) do better
DEMO_REGIMES = {"scribbles": ("scribbles", {}), "boxes": ("boxes", {"model": {"loss_weights": None}})}


def demo(argv=None) -> list[dict]:
    """Train full supervision and one weak regime on the synthetic organ set, each with its recipe of
    ``configs/`` (:mod:`lightning_weakseg.recipes`), and print Dice side by side."""
    import lightning as L
    import torch

    from .recipes import load_recipe

    p = argparse.ArgumentParser(prog="weakseg demo", description=demo.__doc__)
    p.add_argument("--regime", default="boxes", choices=sorted(DEMO_REGIMES), help="weak regime (default: boxes)")
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--n-samples", type=int, default=240)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    torch.set_num_threads(min(torch.get_num_threads(), os.cpu_count() or 1))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    rows = []
    for name, recipe in (("full masks", load_recipe("full")), (a.regime, load_recipe(*DEMO_REGIMES[a.regime]))):
        L.seed_everything(a.seed, verbose=False)
        dm = recipe.build_datamodule(n_samples=a.n_samples, image_size=a.image_size, seed=a.seed)
        model = recipe.build_model(in_channels=dm.in_channels, num_classes=dm.num_classes)
        callbacks = recipe.build_callbacks(skip=("SegmentationImageLogger",))  # the demo runs without a logger
        trainer = L.Trainer(max_epochs=a.epochs, accelerator="cpu", devices=1, logger=False,
                            enable_checkpointing=False, callbacks=callbacks, enable_model_summary=False)
        t0 = time.time()
        trainer.fit(model, dm)
        rows.append({"regime": name, "labels": "+".join(recipe.train_labels),
                     "dice": float(trainer.callback_metrics["val/dice"]), "seconds": time.time() - t0})
    full = rows[0]["dice"]
    print("\n| regime | train labels | val Dice | Dice / full | train s |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['regime']} | {r['labels']} | {r['dice']:.3f} | {r['dice'] / full:.3f} | {r['seconds']:.0f} |")
    return rows


def check(argv=None) -> int:
    """``weakseg check --config cfg.yaml [--data.root ...]``: the up-front data check of the config's data (and of
    its ``unlabelled_dir``), printed, without training. Exit status 1 when it finds problems."""
    argv = list(argv or [])
    if any(a in ("-h", "--help") for a in argv):
        print("usage: weakseg check --config CONFIG [--data.<option> VALUE ...]\n\n" + check.__doc__)
        return 0
    # a data-only config is enough: the model defaults to the plain module (a config's model overrides it)
    saved, sys.argv = sys.argv, sys.argv[:1] + ["--model", "lightning_weakseg.WeakSegModule"] + argv
    try:
        cli = WeakSegCLI(WeakSegModule, WeakSegDataModule, subclass_mode_model=True, run=False,
                         save_config_callback=None, trainer_defaults={"logger": False})
    finally:
        sys.argv = saved
    report = cli.datamodule.check_data(use_cache=True)
    unlabelled = cli.datamodule.check_unlabelled_data(use_cache=True)
    if report is None and unlabelled is None:
        print("data check: synthetic data, nothing to check")
        return 0
    ok = True
    for name, r in (("data", report), ("unlabelled_dir", unlabelled)):
        if r is not None:
            print(("" if name == "data" else f"{name}: ") + r.format(limit=1000))
            ok = ok and r.ok
    return 0 if ok else 1


AUDIT_USAGE = """usage: weakseg audit --config CONFIG (--ckpt_path CKPT | --folds K) [--output_dir DIR]
                     [--label_key KEY] [--method {dice,softmin,self_confidence}] [--network {module,model,peer}]
                     [--num_worst N] [--split {train,val}] [--data.<option> VALUE ...]"""


def audit_command(argv=None) -> int:
    """``weakseg audit``: rank the dense labels of a config's data by label quality (:mod:`lightning_weakseg.audit`)
    and write ``<output_dir>/audit.csv`` (rank, image, score, suspected error type, ...), ``issue_maps/<id>.png``
    and a gallery of the worst images (``gallery/``, ``gallery.png``; also given to the config's logger).
    Probabilities: a trained checkpoint (``--ckpt_path``; with ``--network peer`` a co-teaching pair's peer), or
    ``--folds K`` models trained by the config's trainer settings, each scoring the fold it did not see."""
    import copy

    import lightning as L
    import torch

    from .audit import METHODS, audit, cross_val_audit

    argv = list(argv or [])
    p = argparse.ArgumentParser(prog="weakseg audit", usage=AUDIT_USAGE, description=audit_command.__doc__,
                                add_help=False)
    p.add_argument("--ckpt_path", default=None)
    p.add_argument("--folds", type=int, default=None)
    p.add_argument("--output_dir", default="audit")
    p.add_argument("--label_key", default=None, help="the label map to audit (default: the model's mask_key)")
    p.add_argument("--method", default="dice", choices=METHODS)
    p.add_argument("--network", default="module", choices=("module", "model", "peer"))
    p.add_argument("--num_worst", type=int, default=16)
    p.add_argument("--split", default="train", choices=("train", "val"))
    if any(a in ("-h", "--help") for a in argv):
        print(AUDIT_USAGE + "\n\n" + audit_command.__doc__)
        return 0
    a, rest = p.parse_known_args(argv)
    if (a.ckpt_path is None) == (a.folds is None):
        print("weakseg audit: give exactly one of --ckpt_path and --folds\n" + AUDIT_USAGE, file=sys.stderr)
        return 2
    saved, sys.argv = sys.argv, sys.argv[:1] + rest
    try:
        cli = WeakSegCLI(WeakSegModule, WeakSegDataModule, subclass_mode_model=True, run=False,
                         save_config_callback=None)
    finally:
        sys.argv = saved
    model, dm = cli.model, cli.datamodule
    dm.setup("fit")
    key = a.label_key or model.hparams.get("mask_key", "mask")
    source = dm.train_dataset if a.split == "train" else dm.val_dataset
    data = source.subset(source.indices, augment="none")
    if a.ckpt_path is not None:
        state = torch.load(a.ckpt_path, map_location="cpu", weights_only=False)
        model.load_state_dict(state.get("state_dict", state))
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        result = audit(model.to(device), data, label_key=key, method=a.method, network=a.network,
                       batch_size=dm.hparams.eval_batch_size or dm.hparams.batch_size, num_worst=a.num_worst,
                       issue_map_dir=Path(a.output_dir) / "issue_maps")
    else:
        callbacks = [c for c in cli.trainer.callbacks if type(c).__module__.startswith("lightning_weakseg.callbacks")
                     and type(c).__name__ != "SegmentationImageLogger"]

        def make_trainer():
            return L.Trainer(max_epochs=cli.trainer.max_epochs, accelerator="auto", devices=1, logger=False,
                             enable_checkpointing=False, enable_model_summary=False, num_sanity_val_steps=0,
                             callbacks=copy.deepcopy(callbacks))

        result = cross_val_audit(lambda: type(model)(**dict(model.hparams)), make_trainer,
                                 source if a.split == "train" else data, folds=a.folds, label_key=key,
                                 method=a.method, seed=int(dm.hparams.seed), batch_size=dm.hparams.batch_size,
                                 eval_dataset=data, network=a.network, num_worst=a.num_worst,
                                 issue_map_dir=Path(a.output_dir) / "issue_maps")
    paths = result.write(a.output_dir)
    result.log_gallery(cli.trainer.loggers)
    print(f"weakseg audit: {len(result.rows)} labels ({key}) ranked by {a.method}, worst first: {paths['csv']}")
    for r in result.rows[:min(10, len(result.rows))]:
        print(f"  {r['rank']:>4}  {r['id']}  {r['score']:.4f}  {r['error_type']}")
    return 0


def main(argv=None):
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] == "audit":
        code = audit_command(args[1:])
        if code:
            sys.exit(code)
        return
    if args and args[0] == "demo":
        demo(args[1:])
        return
    if args and args[0] == "check":
        code = check(args[1:])
        if code:
            sys.exit(code)
        return
    rewritten = predict_shortcut(args)
    if argv is None and rewritten != args:
        sys.argv = sys.argv[:1] + rewritten
    # from the command line LightningCLI reads sys.argv itself (passing it as ``args`` too makes it warn)
    cli_main(None if argv is None else rewritten)


if __name__ == "__main__":
    main()
