"""Recipes: every benchmark regime is a config of ``configs/`` plus overrides, builds its module and callbacks on the
synthetic data (one forward on a 32-px batch, no training), and is what the snapshot says; every regime named in a
result file or a documented command resolves; the recipe reader agrees with LightningCLI; the data configs describe
the benchmarks' folder layouts.

``python tests/test_recipes.py`` rewrites ``tests/data/benchmark_recipes.json`` (after a deliberate change of what
a benchmark regime trains).
"""
from __future__ import annotations

import json
import re
import sys
from functools import lru_cache
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import common  # noqa: E402
import semi as semi_benchmark  # noqa: E402
import volumes as volume_benchmark  # noqa: E402
from lightning_weakseg.data import WeakSegDataModule  # noqa: E402
from lightning_weakseg.recipes import CONFIG_DIR, config_path, load_data_config, load_recipe  # noqa: E402

SNAPSHOT = Path(__file__).resolve().parent / "data" / "benchmark_recipes.json"
TINY = {"encoder_depth": 3, "decoder_channels": (16, 8, 4)}
NAMES = sorted(common.REGIMES)


def resolved(name: str) -> dict:
    """What a benchmark row trains, apart from the run's own settings (arch, encoder, lr, data set, noise)."""
    regime = common.REGIMES[name]
    recipe = regime.recipe()
    model = {k: v for k, v in recipe.model.items() if k not in ("arch", "encoder", "lr")}
    callbacks = [[c, kw] for c, kw in recipe.callbacks if c.rsplit(".", 1)[-1] not in common.LOGGING_CALLBACKS]
    return json.loads(json.dumps({"config": recipe.path.name, "class_path": recipe.class_path, "model": model,
                                  "callbacks": callbacks, "data": common.label_args(recipe),
                                  "pseudo_from_boxes": regime.pseudo_from_boxes}))


@lru_cache(maxsize=None)
def synthetic_batch(kind: str, labels: str) -> tuple[WeakSegDataModule, dict]:
    args = json.loads(labels)
    dm = WeakSegDataModule(source="synthetic", synthetic_kind=kind, n_samples=10, image_size=32, batch_size=4,
                           augment="none", check=False, **args)
    dm.setup("fit")
    return dm, next(iter(dm.train_dataloader()))


def synthetic_kind(recipe) -> str:
    """Nuclei (2 classes, RGB) for the point regimes and forget rates for two classes; the organ set otherwise."""
    tau = recipe.model.get("forget_rate")
    two = isinstance(tau, list) and len(tau) == 2
    labels = set(recipe.train_labels) | set(recipe.data.get("label_fractions") or {})
    return "nuclei" if two or "points" in labels else "organ"


@pytest.mark.parametrize("name", NAMES)
def test_every_benchmark_regime_builds_on_synthetic_data(name):
    regime = common.REGIMES[name]
    assert regime.path.is_file() and regime.path.parent == CONFIG_DIR
    recipe = regime.recipe()
    dm, batch = synthetic_batch(synthetic_kind(recipe), json.dumps(common.label_args(recipe), sort_keys=True))
    if regime.pseudo_from_boxes:
        common._box_pseudo(dm, regime.pseudo_from_boxes)
        assert (dm.train_dataset[0]["pseudo"] != 255).any()
    torch.manual_seed(0)
    model = recipe.build_model(in_channels=dm.in_channels, num_classes=dm.num_classes, model_kwargs=TINY)
    assert isinstance(model, recipe.model_class)
    callbacks = recipe.build_callbacks()
    assert [type(c).__name__ for c in callbacks] == list(recipe.callback_names)
    with torch.no_grad():
        out = model(batch["image"])
    assert out["probs"].shape == (4, dm.num_classes, 32, 32)
    if regime.pseudo_variants:  # the same weights under another CAM method, through the public constructor
        variant = common.with_hparams(model, tag_cam="CAM", tag_cam_layer="model.encoder.layer4", tag_refine="crf")
        assert variant.tag_cam == "CAM" and torch.equal(variant.model.encoder.conv1.weight,
                                                        model.model.encoder.conv1.weight)


def test_benchmark_regimes_train_what_the_snapshot_says():
    """A change to configs/ must not change what a reported benchmark row trains without saying so: the resolved
    recipe of every regime equals tests/data/benchmark_recipes.json (rewrite it with ``python
    tests/test_recipes.py`` after a deliberate change, and add overrides to the rows that must keep their meaning)."""
    want = json.loads(SNAPSHOT.read_text())
    got = {name: resolved(name) for name in NAMES}
    assert sorted(got) == sorted(want), "regimes added or removed: rewrite the snapshot"
    changed = {name: (want[name], got[name]) for name in NAMES if got[name] != want[name]}
    assert not changed, f"benchmark regimes now train something else: {json.dumps(changed, indent=1)[:3000]}"


def test_regimes_of_the_result_files_and_documented_commands_resolve():
    # the quality benchmarks' regimes (benchmarks/common.py), the per-volume and the semi-supervised benchmarks'
    known = set(common.REGIMES) | set(volume_benchmark.REGIMES) | set(semi_benchmark.REGIMES)
    for name, (config, _) in [*volume_benchmark.REGIMES.items(), *semi_benchmark.REGIMES.items()]:
        assert (CONFIG_DIR / f"{config}.yaml").exists(), (name, config)
    named = {row["regime"] for path in (ROOT / "benchmarks" / "results").glob("*.json")
             for row in json.loads(path.read_text()).get("rows", []) if isinstance(row, dict) and "regime" in row}
    assert named and not named - known, sorted(named - known)
    documented = set()
    for doc in [ROOT / "README.md", *(ROOT / "docs").rglob("*.md"), *(ROOT / "benchmarks" / "results").glob("*.json")]:
        for match in re.finditer(r"--regimes[ =]([\w,]+)", doc.read_text()):
            documented |= set(filter(None, match.group(1).split(",")))
    assert documented and not documented - known, sorted(documented - known)


@pytest.mark.parametrize("config", sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
def test_recipe_reads_a_config_as_lightningcli_does(config):
    from lightning_weakseg.cli import WeakSegCLI
    from lightning_weakseg.module import WeakSegModule

    cli = WeakSegCLI(WeakSegModule, WeakSegDataModule, subclass_mode_model=True, run=False,
                     args=["--config", str(config_path(config)), "--trainer.logger", "false"],
                     save_config_callback=None)
    recipe = load_recipe(config)
    assert type(cli.model) is recipe.model_class
    for key, value in recipe.model.items():
        want = cli.model.hparams[key]
        assert (list(want) if isinstance(want, tuple) else want) == value, key
    for key, value in recipe.data.items():
        assert cli.datamodule.hparams[key] == value, key
    cli_callbacks = [type(c).__name__ for c in cli.trainer.callbacks]
    assert all(name in cli_callbacks for name in recipe.callback_names)


@pytest.mark.parametrize("dataset", ["kvasir", "acdc", "dsb2018"])
def test_data_configs_lay_a_folder_layout_over_a_regime(dataset):
    """``--config <regime> --config configs/data/<name>.yaml``: the data set decides source, root, layout, classes
    and channels (and the model follows); the benchmarks read the same file."""
    from lightning_weakseg.cli import WeakSegCLI
    from lightning_weakseg.module import WeakSegModule

    spec = load_data_config(dataset)
    assert spec == common.DATASETS[dataset] and spec["source"] == "folder"
    cli = WeakSegCLI(WeakSegModule, WeakSegDataModule, subclass_mode_model=True, run=False,
                     args=["--config", str(config_path("noisy")), "--config", str(config_path(dataset, "data")),
                           "--trainer.logger", "false"], save_config_callback=None)
    hp = cli.datamodule.hparams
    assert all(hp[k] == v for k, v in spec.items())
    assert (cli.model.hparams.num_classes, cli.model.hparams.in_channels) == (spec["num_classes"], spec["in_channels"])
    assert common.data_spec("/data", dataset)["root"] == f"/data/{dataset}"
    layout = {"kvasir": {"mask_dir": "masks", "boxes_json": "boxes.json"},
              "acdc": {"mask_dir": "masks", "scribble_dir": "scribbles", "group_regex": r"^(patient\d+)"},
              "dsb2018": {"mask_dir": None, "instance_dir": "instances"}}[dataset]
    assert {k: spec[k] for k in layout} == layout


def test_overrides():
    base = load_recipe("boxes")
    r = load_recipe("boxes", {"model": {"loss_weights": None, "box_band_width": 3},
                              "callbacks": {"LogBarrierSchedule": {"mu": 1.3}, "SegmentationImageLogger": None,
                                            "PseudoLabelRefresh": {"every_n_epochs": 2}},
                              "data": {"train_labels": ["boxes", "mask"]}})
    assert r.model["loss_weights"] is None and r.model["box_band_width"] == 3 and base.model["box_band_width"] == 5
    assert r.callbacks == (("lightning_weakseg.callbacks.LogBarrierSchedule", {"mu": 1.3}),
                           ("lightning_weakseg.callbacks.PseudoLabelRefresh", {"every_n_epochs": 2}))
    assert r.train_labels == ("boxes", "mask") and base.train_labels == ("boxes",)
    other = load_recipe("full", {"class_path": "lightning_weakseg.regimes:BoxSegModule"})
    assert other.model_class.__name__ == "BoxSegModule"
    with pytest.raises(ValueError, match="unknown sections"):
        load_recipe("boxes", {"models": {}})
    with pytest.raises(FileNotFoundError, match="no config 'nope'"):
        load_recipe("nope")


if __name__ == "__main__":
    SNAPSHOT.parent.mkdir(parents=True, exist_ok=True)
    SNAPSHOT.write_text(json.dumps({name: resolved(name) for name in NAMES}, indent=1) + "\n")
    print(f"wrote {SNAPSHOT} ({len(NAMES)} regimes)")
