"""A model to ship: ``WeakSegModule.save_pretrained(dir)`` → ``segmentation_models_pytorch.from_pretrained(dir)``
gives the same logits, without importing lightning_weakseg, plus the metadata needed to use it."""
import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import segmentation_models_pytorch as smp
import torch

from lightning_weakseg import WeakSegModule
from lightning_weakseg.data import WeakSegDataModule
from lightning_weakseg.regimes import CoTeachingSegModule


def _moved_bn(model: torch.nn.Module) -> None:
    """Train-mode forwards move the BatchNorm running statistics away from (0, 1), so that a loader that dropped
    them (or the weights) would give other logits."""
    model.train()
    with torch.no_grad():
        for _ in range(2):
            model(torch.rand(4, model.hparams.in_channels, 64, 64) * 3)
    model.eval()


def test_fit_checkpoint_save_pretrained_from_pretrained_same_logits(tmp_path):
    L.seed_everything(0)
    dm = WeakSegDataModule(synthetic_kind="organ", n_samples=12, image_size=32, batch_size=4, augment="none")
    m = WeakSegModule(encoder="resnet18", in_channels=1, num_classes=4)
    tr = L.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_progress_bar=False,
                   enable_model_summary=False, default_root_dir=tmp_path, limit_val_batches=0)
    tr.fit(m, dm)
    tr.save_checkpoint(tmp_path / "m.ckpt")
    loaded = WeakSegModule.load_from_checkpoint(tmp_path / "m.ckpt").eval()
    out = loaded.save_pretrained(tmp_path / "ship", class_names=["background", "rv", "myo", "lv"])
    assert out == tmp_path / "ship"
    net = smp.from_pretrained(str(tmp_path / "ship")).eval()
    x = torch.rand(3, 1, 64, 96)
    with torch.no_grad():
        torch.testing.assert_close(net(x), loaded(x)["logits"], atol=1e-6, rtol=1e-6)
    meta = json.loads((tmp_path / "ship" / "weakseg.json").read_text())
    assert meta["num_classes"] == 4 and meta["in_channels"] == 1 and meta["arch"] == "Unet"
    assert meta["encoder"] == "resnet18" and meta["class_names"] == ["background", "rv", "myo", "lv"]
    assert meta["output_stride"] == 32 and meta["input"]["range"] == [0.0, 1.0]
    # the data's preprocessing travelled through the checkpoint (no data module attached any more)
    assert meta["preprocessing"]["image_size"] == 32 and meta["preprocessing"]["resize"] == "longest"


def test_from_pretrained_needs_no_lightning_weakseg(tmp_path):
    torch.manual_seed(0)
    m = WeakSegModule(encoder="resnet18", in_channels=3, num_classes=3)
    _moved_bn(m)
    m.save_pretrained(tmp_path / "ship")
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        torch.save({"x": x, "logits": m(x)["logits"]}, tmp_path / "io.pt")
    code = (
        "import sys, torch, segmentation_models_pytorch as smp\n"
        f"d = torch.load({str(tmp_path / 'io.pt')!r})\n"
        f"net = smp.from_pretrained({str(tmp_path / 'ship')!r}).eval()\n"
        "with torch.no_grad(): y = net(d['x'])\n"
        "assert torch.allclose(y, d['logits'], atol=1e-6), float((y - d['logits']).abs().max())\n"
        "assert not any(k.startswith('lightning_weakseg') for k in sys.modules), 'imported lightning_weakseg'\n"
        "print('ok')\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"}, cwd=tmp_path)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-3000:]


def test_frozen_norm_ships_and_group_norm_refuses(tmp_path):
    torch.manual_seed(0)
    frozen = WeakSegModule(encoder="resnet18", in_channels=3, num_classes=2, norm="frozen").eval()
    with torch.no_grad():
        for mod in frozen.model.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.5, 0.5)
                mod.running_var.uniform_(0.5, 2.0)
    frozen.save_pretrained(tmp_path / "frozen")
    x = torch.rand(1, 3, 64, 64)
    net = smp.from_pretrained(str(tmp_path / "frozen")).eval()
    with torch.no_grad():
        torch.testing.assert_close(net(x), frozen(x)["logits"], atol=1e-6, rtol=1e-6)
    group = WeakSegModule(encoder="resnet18", in_channels=3, num_classes=2, norm="group")
    with pytest.raises(ValueError, match="norm='group'"):
        group.save_pretrained(tmp_path / "group")
    with pytest.raises(ValueError, match="class_names"):
        frozen.save_pretrained(tmp_path / "x", class_names=["one"])


def test_coteaching_ships_the_network_inference_uses(tmp_path):
    torch.manual_seed(0)
    x = torch.rand(2, 3, 64, 64)
    peer = CoTeachingSegModule(encoder="resnet18", in_channels=3, num_classes=2, inference="b").eval()
    peer.save_pretrained(tmp_path / "b")
    net = smp.from_pretrained(str(tmp_path / "b")).eval()
    with torch.no_grad():
        torch.testing.assert_close(net(x), peer(x)["logits"], atol=1e-6, rtol=1e-6)
        assert not torch.allclose(net(x), peer.model(x), atol=1e-3)  # the peer, not the main network
    assert json.loads((tmp_path / "b" / "weakseg.json").read_text())["network"] == "peer_model"
    avg = CoTeachingSegModule(encoder="resnet18", in_channels=3, num_classes=2, inference="average").eval()
    with pytest.warns(UserWarning, match="main network"):
        avg.save_pretrained(tmp_path / "avg")
    net = smp.from_pretrained(str(tmp_path / "avg")).eval()
    with torch.no_grad():
        torch.testing.assert_close(net(x), avg.model(x), atol=1e-6, rtol=1e-6)
