"""Predictions out: a folder of new images of any size → one mask per image at its own size (also under DDP),
native-scale inference, test metrics at each image's own resolution, and the command line."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import lightning as L
import numpy as np
import pytest
import torch
from scipy.spatial.distance import cdist

from lightning_weakseg import WeakSegModule
from lightning_weakseg.callbacks import MaskWriter
from lightning_weakseg.data import WeakSegDataModule
from lightning_weakseg.data.predict import PredictDataset
from lightning_weakseg.inference import whole_image

ROOT = Path(__file__).resolve().parents[1]
SIZES = {"small": (97, 131), "tall": (256, 216), "square": (300, 300)}


def write_images(folder: Path, sizes=SIZES, channels=3, seed=0) -> Path:
    """Smooth random images (a blurred noise field: a random network's output varies over them) of the given
    sizes, written as PNG files; no labels."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for name, (h, w) in sizes.items():
        img = cv2.GaussianBlur(rng.random((h, w, channels)).astype(np.float32), (0, 0), 6)
        img = (img - img.min()) / (img.max() - img.min())
        cv2.imwrite(str(folder / f"{name}.png"), (img * 255).astype(np.uint8).squeeze())
    return folder


def trainer(**kw):
    return L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                     enable_model_summary=False, **kw)


def unet(num_classes=3, seed=0):
    torch.manual_seed(seed)
    return WeakSegModule(encoder="resnet18", in_channels=3, num_classes=num_classes).eval()


class IntensityModule(WeakSegModule):
    """A per-pixel rule instead of a network: foreground where the image is bright. Its errors at native size come
    only from the resize, so native and training-size scores are both well defined and differ."""

    def forward(self, x):
        z = (x.mean(1, keepdim=True) - 0.5) * 12 + 0.0 * self.model.segmentation_head[0].bias.sum()
        logits = torch.cat([-z, z], 1)
        return {"logits": logits, "probs": logits.softmax(1)}


def test_mask_writer_one_png_per_image_at_its_own_size(tmp_path):
    images = write_images(tmp_path / "new")
    model = unet()
    dm = WeakSegDataModule(synthetic_kind="nuclei", image_size=64, predict_dir=str(images), batch_size=2)
    writer = MaskWriter(tmp_path / "out", probabilities=True)
    assert trainer(callbacks=[writer]).predict(model, dm, return_predictions=False) is None
    pngs = sorted(p.name for p in (tmp_path / "out").glob("*.png"))
    assert pngs == sorted(f"{n}.png" for n in SIZES)
    # the slow reference: each image's base view through the network, the letterbox crop resized with OpenCV
    ds = PredictDataset(images, in_channels=3, image_size=64)
    for i, name in enumerate(ds.ids):
        lab = cv2.imread(str(tmp_path / "out" / f"{name}.png"), cv2.IMREAD_UNCHANGED)
        assert lab.dtype == np.uint8 and lab.shape == SIZES[name]
        assert lab.max() < 3
        s = ds[i]
        with torch.no_grad():
            p = model(s["image"][None])["probs"][0].numpy()
        top, left, h, w = s["content"].tolist()
        h0, w0 = SIZES[name]
        ref = np.stack([cv2.resize(np.ascontiguousarray(p[k, top:top + h, left:left + w]), (w0, h0),
                                   interpolation=cv2.INTER_LINEAR) for k in range(3)])
        assert (lab == ref.argmax(0)).mean() > 0.999
        assert len(np.unique(lab)) > 1  # a real map, not a constant
        probs = np.load(tmp_path / "out" / "probs" / f"{name}.npy")
        assert probs.shape == (3, h0, w0) and probs.dtype == np.float16
        np.testing.assert_allclose(probs.astype(np.float32), ref, atol=2e-3)


def test_predict_step_drops_ddp_filler_and_maps_back(tmp_path):
    images = write_images(tmp_path / "new", {"a": (40, 50), "b": (70, 30)})
    model = unet(num_classes=2)
    ds = PredictDataset(images, in_channels=3, image_size=64)
    from lightning_weakseg.data.predict import predict_collate
    from lightning_weakseg.data.sampling import PadFlagged
    batch = predict_collate([ds[0], ds[1], PadFlagged(ds)[2]])  # the third is filler (sample 0 again)
    assert batch["pad"].tolist() == [False, False, True]
    with torch.no_grad():
        out = model.predict_step(batch, 0)
    assert out["id"] == ["a", "b"] and out["orig_size"].tolist() == [[40, 50], [70, 30]]
    assert [tuple(p.shape) for p in out["probs"]] == [(2, 40, 50), (2, 70, 30)]
    assert all(torch.equal(lab, p.argmax(0)) for lab, p in zip(out["labels"], out["probs"]))


def test_overlay_and_png16(tmp_path):
    images = write_images(tmp_path / "new", {"a": (50, 70)})
    dm = WeakSegDataModule(synthetic_kind="nuclei", image_size=64, predict_dir=str(images))
    writer = MaskWriter(tmp_path / "out", probabilities="png16", overlay=True)
    preds = trainer(callbacks=[writer]).predict(unet(num_classes=2), dm)
    probs = preds[0]["probs"][0].numpy()
    p16 = np.stack([cv2.imread(str(tmp_path / "out" / "probs" / f"a_{k}.png"), cv2.IMREAD_UNCHANGED)
                    for k in range(2)])
    assert p16.dtype == np.uint16 and p16.shape == (2, 50, 70)
    np.testing.assert_allclose(p16 / 65535, probs, atol=1e-4)
    ov = cv2.imread(str(tmp_path / "out" / "overlay" / "a.png"))
    assert ov.shape == (50, 70, 3)
    lab = preds[0]["labels"][0].numpy()
    img = cv2.imread(str(images / "a.png"))
    assert np.array_equal(ov[lab == 0], img[lab == 0])  # background pixels show the image unchanged


def test_mask_writer_under_ddp_writes_each_image_once(tmp_path):
    """2 CPU processes (gloo), 5 images: rank 0 gets 3, rank 1 gets 2 plus one filler sample. Every image is
    written by exactly one rank, the filler by none, and the masks equal one process's."""
    sizes = {"i0": (97, 131), "i1": (256, 216), "i2": (300, 300), "i3": (64, 64), "i4": (40, 90)}
    images = write_images(tmp_path / "new", sizes)
    model = unet(num_classes=2)
    torch.save(model.state_dict(), tmp_path / "w.pt")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "predict_ddp_check.py"), "--images", str(images),
                           "--weights", str(tmp_path / "w.pt"), "--out", str(tmp_path / "ddp"), "--devices", "2"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    written = [json.loads((tmp_path / "ddp" / f"written_rank{r}.json").read_text()) for r in (0, 1)]
    assert sorted(len(w) for w in written) == [2, 3]
    together = written[0] + written[1]
    assert sorted(together) == sorted(f"{n}.png" for n in sizes)  # each exactly once
    files = sorted(p.name for p in (tmp_path / "ddp" / "masks").glob("*.png"))
    assert files == sorted(f"{n}.png" for n in sizes)
    # one process, same weights
    dm = WeakSegDataModule(synthetic_kind="nuclei", image_size=64, predict_dir=str(images), batch_size=2)
    trainer(callbacks=[MaskWriter(tmp_path / "one")]).predict(model, dm, return_predictions=False)
    for n, hw in sizes.items():
        a = cv2.imread(str(tmp_path / "ddp" / "masks" / f"{n}.png"), cv2.IMREAD_UNCHANGED)
        b = cv2.imread(str(tmp_path / "one" / f"{n}.png"), cv2.IMREAD_UNCHANGED)
        assert a.shape == b.shape == hw
        assert (a == b).mean() > 0.999


def test_native_scale_whole_image_and_sliding_windows(tmp_path):
    """predict_scale="native": the network sees the file's pixels. With a per-pixel rule, sliding windows (300 px
    image, 128 px windows) give exactly the whole-image result, and both equal the rule on the raw image."""
    images = write_images(tmp_path / "new", {"big": (300, 300), "small": (60, 90)})
    dm = WeakSegDataModule(synthetic_kind="nuclei", image_size=64, predict_dir=str(images), batch_size=2)
    whole = trainer().predict(IntensityModule(in_channels=3, num_classes=2, predict_scale="native"), dm)
    windows = trainer().predict(IntensityModule(in_channels=3, num_classes=2, predict_scale="native",
                                                predict_window=128), dm)
    raw = cv2.cvtColor(cv2.imread(str(images / "big.png")), cv2.COLOR_BGR2RGB).astype(np.float32) / 255
    z = (raw.mean(2) - 0.5) * 12
    ref = 1 / (1 + np.exp(-2 * z))  # softmax of [-z, z], class 1
    ids = whole[0]["id"]
    big = ids.index("big")
    np.testing.assert_allclose(whole[0]["probs"][big][1].numpy(), ref, atol=1e-5)
    for a, b in zip(whole[0]["probs"], windows[0]["probs"]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    # the default, training scale, differs: the image went through the 64 px base view
    train = trainer().predict(IntensityModule(in_channels=3, num_classes=2), dm)
    assert train[0]["probs"][big].shape == (2, 300, 300)
    assert not torch.allclose(train[0]["probs"][big], whole[0]["probs"][big], atol=1e-3)
    with pytest.raises(ValueError, match="native_image"):
        IntensityModule(in_channels=3, num_classes=2, predict_scale="native").native_probs(
            {"image": torch.rand(1, 3, 64, 64)})


def _write_labelled(folder: Path, sizes: dict, seed: int) -> None:
    """Bright discs on a dark noisy background; the mask is a slightly larger disc (so the intensity rule is
    imperfect and Dice / HD95 are informative)."""
    rng = np.random.default_rng(seed)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    (folder / "masks").mkdir(parents=True, exist_ok=True)
    for name, (h, w) in sizes.items():
        yy, xx = np.mgrid[:h, :w]
        cy, cx, r = rng.uniform(0.3, 0.7) * h, rng.uniform(0.3, 0.7) * w, rng.uniform(0.15, 0.3) * min(h, w)
        d = np.hypot(yy - cy, xx - cx)
        img = np.clip(0.2 + 0.6 * (d < r) + rng.normal(0, 0.08, (h, w)), 0, 1)
        mask = (d < r * 1.15).astype(np.uint8)
        cv2.imwrite(str(folder / "images" / f"{name}.png"), (img * 255).astype(np.uint8))
        cv2.imwrite(str(folder / "masks" / f"{name}.png"), mask)


def _boundary(m: np.ndarray) -> np.ndarray:
    p = np.pad(m, 1)
    inner = p[1:-1, 1:-1] & p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]
    return m & ~inner


def _hd95(a: np.ndarray, b: np.ndarray) -> float:
    pa, pb = np.argwhere(_boundary(a)), np.argwhere(_boundary(b))
    d = cdist(pa, pb)
    return max(np.percentile(d.min(1), 95), np.percentile(d.min(0), 95))


def test_test_metrics_at_native_resolution_match_a_per_image_reference(tmp_path):
    """test/dice, test/iou, test/hd95 are those of the prediction mapped back to each test image's own size,
    against the mask file; the reference resizes the base-view probabilities with OpenCV and scores with NumPy."""
    _write_labelled(tmp_path / "train", {f"t{i}": (80, 80) for i in range(4)}, seed=0)
    test_sizes = {"a": (97, 131), "b": (256, 216), "c": (300, 300)}
    _write_labelled(tmp_path / "test", test_sizes, seed=1)
    dm = WeakSegDataModule(source="folder", root=str(tmp_path / "train"), num_classes=2, in_channels=1,
                           image_size=64, test_dir=str(tmp_path / "test"), check=False, batch_size=2)
    model = IntensityModule(in_channels=1, num_classes=2)
    res = trainer().test(model, dm, verbose=False)[0]
    dm.setup("test")
    dice, iou, hd = [], [], []
    for i in range(len(dm.test_dataset)):
        s = dm.test_dataset[i]
        with torch.no_grad():
            p = model(s["image"][None])["probs"][0].numpy()
        top, left, h, w = s["content"].tolist()
        name = s["id"]
        h0, w0 = test_sizes[name]
        ref = np.stack([cv2.resize(np.ascontiguousarray(p[k, top:top + h, left:left + w]), (w0, h0),
                                   interpolation=cv2.INTER_LINEAR) for k in range(2)]).argmax(0).astype(bool)
        gt = cv2.imread(str(tmp_path / "test" / "masks" / f"{name}.png"), cv2.IMREAD_UNCHANGED).astype(bool)
        inter, ps, ts = (ref & gt).sum(), ref.sum(), gt.sum()
        dice.append(2 * inter / (ps + ts))
        iou.append(inter / (ps + ts - inter))
        hd.append(_hd95(ref, gt))
    assert 0.5 < np.mean(dice) < 0.99
    assert res["test/dice"] == pytest.approx(np.mean(dice), abs=1e-4)
    assert res["test/iou"] == pytest.approx(np.mean(iou), abs=1e-4)
    assert res["test/hd95"] == pytest.approx(np.mean(hd), rel=1e-3)
    # the base-view scores are kept apart and are not the native ones (HD95 in 64 px units is much smaller)
    assert {"test/dice_train_size", "test/hd95_train_size"} <= set(res)
    assert res["test/hd95_train_size"] < 0.6 * res["test/hd95"]


def test_test_without_test_set_warns_that_it_scores_validation():
    dm = WeakSegDataModule(synthetic_kind="organ", n_samples=10, image_size=32, batch_size=5)
    model = WeakSegModule(encoder="resnet18", in_channels=1, num_classes=4)
    with pytest.warns(UserWarning, match="VALIDATION split"):
        trainer(limit_test_batches=1).test(model, dm, verbose=False)


def test_cli_fit_then_predict_a_folder(tmp_path, capsys):
    from lightning_weakseg.cli import cli_main, main

    cfg = ROOT / "configs" / "full.yaml"
    tiny = ["--data.n_samples", "8", "--data.image_size", "32", "--data.batch_size", "4",
            "--trainer.enable_progress_bar", "false", "--trainer.logger", "false"]
    cli = cli_main(["fit", "--config", str(cfg), "--model", "BoxSegModule", "--data.train_labels", "[boxes]",
                    "--trainer.fast_dev_run", "1", "--trainer.default_root_dir", str(tmp_path), *tiny])
    assert type(cli.model).__name__ == "BoxSegModule"
    ckpt = tmp_path / "m.ckpt"
    cli.trainer.save_checkpoint(ckpt)
    images = write_images(tmp_path / "new", {"x": (50, 70), "y": (90, 40)}, channels=1)
    main(["predict", "--config", str(cfg), "--model", "BoxSegModule", "--ckpt_path", str(ckpt),
          "--data.predict_dir", str(images), "--output_dir", str(tmp_path / "masks"),
          "--trainer.default_root_dir", str(tmp_path / "predict"), *tiny])
    for name, hw in {"x": (50, 70), "y": (90, 40)}.items():
        lab = cv2.imread(str(tmp_path / "masks" / f"{name}.png"), cv2.IMREAD_UNCHANGED)
        assert lab.shape == hw and lab.max() < 4
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for word in ("demo", "BoxSegModule", "CoTeachingSegModule", "TagSegModule", "--output_dir"):
        assert word in out
