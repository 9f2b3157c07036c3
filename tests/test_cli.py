"""The command line: every shipped config fits (one fast_dev_run batch), the data decides the model's classes and
channels, and ``weakseg demo`` prints its table."""
from pathlib import Path

import pytest
import torch

from lightning_weakseg.cli import cli_main, demo, main

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))
TINY = ["--data.n_samples", "12", "--data.image_size", "32", "--data.batch_size", "4",
        "--trainer.fast_dev_run", "1", "--trainer.enable_progress_bar", "false"]


def test_configs_exist():
    names = {p.stem for p in CONFIGS}
    assert {"full", "boxes", "points", "noisy"} <= names, names


def missing_data_root(config: Path) -> str | None:
    """The config's ``data.root`` when it names a folder that is not on this machine (real data sets live in
    ../shared/data, which a fresh machine lacks), else None."""
    import yaml

    root = (yaml.safe_load(config.read_text()).get("data") or {}).get("root")
    return root if root and not Path(root).exists() else None


@pytest.mark.parametrize("config", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_config_fits_one_batch(config, tmp_path):
    if missing_data_root(config):
        pytest.skip(f"{config.name} reads {missing_data_root(config)}, which is not on this machine")
    cli = cli_main(["fit", "--config", str(config), "--trainer.default_root_dir", str(tmp_path), *TINY])
    assert cli.trainer.state.finished
    assert torch.isfinite(cli.trainer.callback_metrics["train/loss"])
    # the data module decided the number of classes and channels; the model followed
    dm, model = cli.datamodule, cli.model
    assert model.hparams.num_classes == dm.num_classes and model.hparams.in_channels == dm.in_channels
    # every regime logs its predictions beside the weak label it trained on
    loggers = [c for c in cli.trainer.callbacks if type(c).__name__ == "SegmentationImageLogger"]
    assert loggers and loggers[0].weak_labels and loggers[0].last_weak_grid is not None


def test_data_decides_classes_and_channels(tmp_path):
    cfg = CONFIGS[[p.stem for p in CONFIGS].index("full")]
    cli = cli_main(["fit", "--config", str(cfg), "--data.synthetic_kind", "nuclei",
                    "--trainer.default_root_dir", str(tmp_path), *TINY])
    assert (cli.model.hparams.num_classes, cli.model.hparams.in_channels) == (2, 3)
    assert cli.model.model.encoder.conv1.in_channels == 3


def test_demo_prints_table(capsys):
    rows = demo(["--epochs", "1", "--n-samples", "24", "--image-size", "32", "--regime", "scribbles"])
    assert [r["regime"] for r in rows] == ["full masks", "scribbles"]
    assert all(0.0 <= r["dice"] <= 1.0 for r in rows)
    out = capsys.readouterr().out
    assert "| full masks | mask |" in out and "| scribbles | scribble |" in out


def test_main_dispatches_demo(monkeypatch):
    seen = {}
    monkeypatch.setattr("lightning_weakseg.cli.demo", lambda argv: seen.setdefault("argv", argv))
    main(["demo", "--epochs", "2"])
    assert seen["argv"] == ["--epochs", "2"]


def test_command_line_run_passes_no_args_to_lightningcli(monkeypatch):
    """From the command line LightningCLI must read sys.argv itself: passing it as ``args`` as well makes it warn
    ("not recommended to provide both args and command line arguments") on every ``weakseg fit``."""
    seen = {}
    monkeypatch.setattr("lightning_weakseg.cli.cli_main", lambda args=None: seen.setdefault("args", args))
    monkeypatch.setattr("sys.argv", ["weakseg", "fit", "--config", "configs/full.yaml"])
    main()
    assert seen["args"] is None
    seen.clear()
    main(["fit", "--config", "x.yaml"])                    # called from Python: the list is passed on
    assert seen["args"] == ["fit", "--config", "x.yaml"]


def test_tags_config_trains_on_tags_that_vary(tmp_path):
    cfg = CONFIGS[[p.stem for p in CONFIGS].index("tags")]
    cli = cli_main(["fit", "--config", str(cfg), "--trainer.default_root_dir", str(tmp_path), *TINY])
    ds = cli.datamodule.train_dataset
    tags = torch.stack([ds[i]["tags"] for i in range(min(len(ds), 40))])
    # each foreground class is present in some training images and absent from others
    frac = tags[:, 1:].mean(0)
    assert ((frac > 0.2) & (frac < 0.8)).all(), frac
