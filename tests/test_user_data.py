"""A user's own data: plain Datasets with the default collate, and every kind of bad folder data, written to disk
by the test, found before training with an error that names file and field (or handled and reported)."""
import json
import warnings

import cv2
import lightning as L
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset
from torch.utils.data._utils.collate import default_collate

from lightning_weakseg import WeakSegDataError, WeakSegModule
from lightning_weakseg.data import FolderDataset, WeakSegDataModule, collate
from lightning_weakseg.data.batch import complete_flags, content_mask
from lightning_weakseg.data.check import check_folder
from lightning_weakseg.data.folder import read_image
from lightning_weakseg.losses.boxes import emptiness_ce
from lightning_weakseg.regimes import BoxSegModule, PointSegModule, ScribbleSegModule


# ----------------------------------------------------------------------------- plain user Datasets
class PlainDataset(Dataset):
    """What a user writes: dicts with an image and whichever labels it has, no flags, no library base class."""

    def __init__(self, n=8, size=32, keys=("mask",)):
        self.n, self.size, self.keys = n, size, keys

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(i)
        s = self.size
        y0, x0 = 4 + i % 5, 6 + i % 7
        img = torch.rand(3, s, s, generator=g) * 0.3
        img[:, y0:y0 + 12, x0:x0 + 10] += 0.6
        mask = torch.zeros(s, s, dtype=torch.long)
        mask[y0:y0 + 12, x0:x0 + 10] = 1
        out = {"image": img}
        if "mask" in self.keys:
            out["mask"] = mask
        if "boxes" in self.keys:  # a different number of boxes per image: the default collate cannot stack them
            rows = [[1, x0, y0, x0 + 10, y0 + 12]] + ([[1, 0, 0, 3, 3]] if i % 2 else [])
            if i % 2:
                out["image"][:, 0:3, 0:3] += 0.6
            out["boxes"] = torch.tensor(rows, dtype=torch.float32)
        if "points" in self.keys:
            out["points"] = torch.tensor([[1, y0 + 6, x0 + 5]], dtype=torch.float32)
        if "scribble" in self.keys:
            sc = torch.full((s, s), 255, dtype=torch.long)
            sc[y0 + 6, x0 + 2:x0 + 8] = 1
            sc[1, :] = 0
            out["scribble"] = sc
        return out


def _trainer(**kw):
    return L.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, **kw)


@pytest.mark.parametrize("cls,keys,kwargs", [
    (WeakSegModule, ("mask",), {}),
    (BoxSegModule, ("boxes",), {}),
    (PointSegModule, ("points",), {}),
    (ScribbleSegModule, ("scribble",), {}),
])
def test_plain_dataset_trains_and_validates_with_the_default_collate(cls, keys, kwargs):
    train = DataLoader(PlainDataset(keys=keys), batch_size=4)           # PyTorch's default collate
    val = DataLoader(PlainDataset(n=4, keys=("mask",)), batch_size=4)
    model = cls(in_channels=3, num_classes=2, **kwargs)
    trainer = _trainer()
    trainer.fit(model, train, val)
    m = trainer.callback_metrics
    assert "val/dice" in m and 0 <= float(m["val/dice"]) <= 1 and torch.isfinite(m["train/loss"])
    # the regime's own terms were trained on (not silently absent)
    own = {"boxes": "train/box/tightness", "points": "train/point/voronoi", "scribble": "train/scribble/pce",
           "mask": "train/seg/ce"}[keys[0]]
    assert own in m
    assert train.collate_fn is collate   # variable-length boxes: the module gave the loader the library's collate


@pytest.mark.parametrize("cls,keys", [(WeakSegModule, ("mask",)), (BoxSegModule, ("boxes",)),
                                      (PointSegModule, ("points",)), (ScribbleSegModule, ("scribble",))])
def test_flags_derived_from_keys_give_the_library_collates_terms(cls, keys):
    """A batch without flags (complete_flags) trains exactly like the library's own collated batch."""
    torch.manual_seed(0)
    model = cls(in_channels=3, num_classes=2).eval()
    samples = [PlainDataset(keys=keys)[i] for i in (0, 2, 4, 6)]  # equal box counts: default collate stacks
    ours = collate(samples)
    plain = complete_flags(default_collate(samples))
    assert "has_" + keys[0] not in default_collate(samples)
    with torch.no_grad():
        out = model(ours["image"])
        t_ours = model.loss_terms(ours, out)
        t_plain = model.loss_terms(plain, out)
    assert t_ours.keys() == t_plain.keys() and t_ours
    for k in t_ours:
        assert torch.equal(t_ours[k], t_plain[k]), k


# ----------------------------------------------------------------------------- folders on disk
def write_folder(root, n=4, size=(24, 24), mask_values=(0, 1), ext=".png", boxes=True):
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    rng = np.random.default_rng(0)
    entries = {}
    h, w = size
    for i in range(n):
        img = (rng.random((h, w, 3)) * 255).astype(np.uint8)
        cv2.imwrite(str(root / "images" / f"im{i}{ext}"), img)
        m = np.full((h, w), mask_values[0], np.uint8)
        m[4:12, 5:15] = mask_values[1]
        cv2.imwrite(str(root / "masks" / f"im{i}.png"), m)
        entries[f"im{i}"] = [[5, 4, 15, 12]]
    if boxes:
        (root / "boxes.json").write_text(json.dumps(entries))
    return root


def dm_for(root, **kw):
    args = dict(source="folder", root=str(root), num_classes=2, in_channels=3, image_size=16, val_fraction=0.25,
                augment="none", shuffle=False, batch_size=2)
    args.update(kw)
    return WeakSegDataModule(**args)


def test_image_missing_from_boxes_json_is_an_error_naming_it(tmp_path):
    root = write_folder(tmp_path)
    b = json.loads((root / "boxes.json").read_text())
    del b["im2"]
    (root / "boxes.json").write_text(json.dumps(b))
    with pytest.raises(WeakSegDataError, match="no entry") as e:
        dm_for(root, boxes_json="boxes.json", train_labels=["boxes"]).setup("fit")
    assert e.value.sample == "im2" and e.value.field == "boxes"
    # boxes not trained on: a missing entry is no problem (the masks train)
    dm_for(root, boxes_json="boxes.json", train_labels=["mask"]).setup("fit")
    # without the check, the sample itself refuses to become "no object"
    ds = FolderDataset(root, boxes_json="boxes.json", num_classes=2, in_channels=3, image_size=16,
                       labels=("boxes",))
    with pytest.raises(WeakSegDataError, match="no entry"):
        ds[2]


def test_boxes_json_keys_with_the_extension_match_and_unknown_keys_are_reported(tmp_path):
    root = write_folder(tmp_path, ext=".jpg")
    by_stem = json.loads((root / "boxes.json").read_text())
    (root / "by_name.json").write_text(json.dumps({f"{k}.jpg": v for k, v in by_stem.items()}))
    a = FolderDataset(root, boxes_json="boxes.json", num_classes=2, in_channels=3, image_size=24, labels=("boxes",))
    b = FolderDataset(root, boxes_json="by_name.json", num_classes=2, in_channels=3, image_size=24,
                      labels=("boxes",))
    for i in range(len(a)):
        assert torch.equal(a[i]["boxes"], b[i]["boxes"]) and len(a[i]["boxes"]) == 1
    # keys naming no image (another extension, a typo) are one problem that lists them
    (root / "wrong.json").write_text(json.dumps({**by_stem, "im1.png": [[1, 1, 4, 4]], "img9": []}))
    with pytest.raises(WeakSegDataError, match="name no image") as e:
        dm_for(root, boxes_json="wrong.json", train_labels=["boxes"]).setup("fit")
    assert "im1.png" in str(e.value) and "img9" in str(e.value) and e.value.field == "boxes"


def test_binary_masks_stored_0_255_are_an_error_that_names_the_fix(tmp_path):
    root = write_folder(tmp_path, mask_values=(0, 255), boxes=False)
    with pytest.raises(WeakSegDataError, match=r"mask_map=\{255: 1\}") as e:
        dm_for(root).setup("fit")
    assert e.value.field == "mask"
    with pytest.raises(WeakSegDataError, match=r"mask_map"):  # skip cannot skip a whole folder's encoding
        dm_for(root, on_bad_data="skip").setup("fit")
    dm = dm_for(root, mask_map={255: 1}, resize="stretch")
    dm.setup("fit")
    m = dm.train_dataset[0]["mask"]
    assert set(m.unique().tolist()) == {0, 1}


def test_truncated_jpeg_is_an_error_naming_the_file(tmp_path):
    root = write_folder(tmp_path, ext=".jpg", boxes=False)
    f = root / "images" / "im1.jpg"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    # OpenCV alone decodes it (the missing half grey) without raising: the library must not
    assert cv2.imread(str(f)) is not None
    with pytest.raises(WeakSegDataError, match="truncated JPEG") as e:
        read_image(f)
    assert str(f) in str(e.value)
    with pytest.raises(WeakSegDataError, match="truncated JPEG") as e:
        dm_for(root).setup("fit")
    assert e.value.sample == "im1" and e.value.field == "image" and "im1.jpg" in str(e.value)


def test_truncated_png_mask_is_an_error(tmp_path):
    root = write_folder(tmp_path, boxes=False)
    f = root / "masks" / "im3.png"
    f.write_bytes(f.read_bytes()[:-20])
    with pytest.raises(WeakSegDataError, match="truncated PNG") as e:
        dm_for(root).setup("fit")
    assert e.value.field == "mask" and e.value.sample == "im3"


def test_subpixel_box_overshoot_is_clipped_and_reported_more_is_an_error(tmp_path):
    root = write_folder(tmp_path)
    b = json.loads((root / "boxes.json").read_text())
    b["im0"] = [[5.0, 4.0, 24.4, 12.0]]        # 0.4 px beyond the 24-px width
    b["im1"] = [[-0.3, 4.0, 10.0, 12.0]]       # 0.3 px before the left edge
    (root / "boxes.json").write_text(json.dumps(b))
    ds = FolderDataset(root, boxes_json="boxes.json", num_classes=2, in_channels=3, image_size=24,
                       labels=("boxes",), resize="stretch")
    assert ds[0]["boxes"].tolist() == [[1.0, 5.0, 4.0, 24.0, 12.0]]
    assert ds[1]["boxes"].tolist() == [[1.0, 0.0, 4.0, 10.0, 12.0]]
    report = check_folder(ds, boxes_trained=True, use_cache=False)
    assert report.ok and sorted(n.sample for n in report.notes if "clipped" in n.message) == ["im0", "im1"]
    b["im2"] = [[5.0, 4.0, 25.5, 12.0]]        # 1.5 px: not an export rounding error
    (root / "boxes.json").write_text(json.dumps(b))
    with pytest.raises(WeakSegDataError, match="1.50 px outside") as e:
        dm_for(root, boxes_json="boxes.json", train_labels=["boxes"]).setup("fit")
    assert e.value.sample == "im2"


def test_null_coordinates_are_reported_as_missing(tmp_path):
    root = write_folder(tmp_path)
    b = json.loads((root / "boxes.json").read_text())
    b["im3"] = [[5, None, 15, 12]]
    (root / "boxes.json").write_text(json.dumps(b))
    with pytest.raises(WeakSegDataError, match=r"missing coordinate \(null\)") as e:
        dm_for(root, boxes_json="boxes.json", train_labels=["boxes"]).setup("fit")
    assert e.value.sample == "im3" and "NaN" not in str(e.value)


def test_every_problem_is_listed_at_once_and_skip_leaves_the_bad_samples_out(tmp_path):
    root = write_folder(tmp_path, n=8)
    cv2.imwrite(str(root / "masks" / "im1.png"), np.full((24, 24), 7, np.uint8))      # a value beyond the classes
    cv2.imwrite(str(root / "masks" / "im4.png"), np.zeros((20, 24), np.uint8))        # another size
    (root / "images" / "im6.png").write_bytes(b"not an image")                         # undecodable
    b = json.loads((root / "boxes.json").read_text())
    b["im3"] = [[5, 4, 40, 12]]                                                          # outside
    (root / "boxes.json").write_text(json.dumps(b))
    with pytest.raises(WeakSegDataError) as e:
        dm_for(root, boxes_json="boxes.json", train_labels=["boxes"], val_fraction=0.0).setup("fit")
    msg = str(e.value)
    assert "4 problem(s) in 4 sample(s)" in msg
    for stem, what in (("im1", "[7]"), ("im4", "differs"), ("im6", "cannot decode"), ("im3", "outside")):
        line = next(ln for ln in msg.splitlines() if f"sample {stem})" in ln)
        assert what in line, (stem, line)
    dm = dm_for(root, boxes_json="boxes.json", train_labels=["boxes"], val_fraction=0.0, on_bad_data="skip")
    with pytest.warns(UserWarning, match="4 problem"):
        dm.setup("fit")
    kept = {dm.train_dataset.sample_id(i) for i in dm.train_dataset.indices}
    assert kept == {"im0", "im2", "im5", "im7"}
    assert {p.sample for p in dm.data_report.problems} == {"im1", "im3", "im4", "im6"}
    batch = collate([dm.train_dataset[i] for i in range(len(dm.train_dataset))])  # the rest trains
    assert batch["has_boxes"].all()


def test_the_check_is_cached_by_a_fingerprint_of_the_files(tmp_path):
    root = write_folder(tmp_path, n=6)
    cache = tmp_path / "cache"
    ds = FolderDataset(root, num_classes=2, in_channels=3, image_size=16)
    first = check_folder(ds, cache_dir=cache)
    again = check_folder(ds, cache_dir=cache)
    assert not first.cached and again.cached and first.ok and again.ok
    cv2.imwrite(str(root / "masks" / "im2.png"), np.full((24, 24), 9, np.uint8))   # a changed file
    changed = check_folder(ds, cache_dir=cache)
    assert not changed.cached and not changed.ok and changed.problems[0].sample == "im2"
    # other options are another report
    other = check_folder(FolderDataset(root, num_classes=10, in_channels=3, image_size=16), cache_dir=cache)
    assert not other.cached and other.ok


def test_letterbox_keeps_the_aspect_and_pads_with_unknown(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    rng = np.random.default_rng(1)
    img = (rng.random((256, 216)) * 255).astype(np.uint8)
    mask = np.zeros((256, 216), np.uint8)
    mask[100:140, 80:120] = 1
    cv2.imwrite(str(tmp_path / "images" / "s.png"), img)
    cv2.imwrite(str(tmp_path / "masks" / "s.png"), mask)
    ds = FolderDataset(tmp_path, num_classes=2, in_channels=1, image_size=64)
    s = ds[0]
    # reference: scale by 64/256 to 64 x 54, pad 5 columns left and right
    ref = cv2.resize(img.astype(np.float32) / 255, (54, 64), interpolation=cv2.INTER_AREA)
    assert torch.allclose(s["image"][0, :, 5:59], torch.from_numpy(ref), atol=1e-6)
    assert s["image"][0, :, :5].abs().max() == 0 and s["image"][0, :, 59:].abs().max() == 0
    ref_m = cv2.resize(mask, (54, 64), interpolation=cv2.INTER_NEAREST)
    assert torch.equal(s["mask"][:, 5:59], torch.from_numpy(ref_m).long())
    assert (s["mask"][:, :5] == 255).all() and (s["mask"][:, 59:] == 255).all()
    assert s["orig_size"].tolist() == [256, 216] and s["content"].tolist() == [0, 5, 64, 54]
    batch = collate([s])
    assert torch.equal(content_mask(batch)[0], s["valid"])
    assert content_mask(batch)[0, :, 5:59].all() and not content_mask(batch)[0, :, :5].any()
    stretched = FolderDataset(tmp_path, num_classes=2, in_channels=1, image_size=64, resize="stretch")[0]
    assert stretched["content"].tolist() == [0, 0, 64, 64] and (stretched["mask"] != 255).all()
    with pytest.raises(WeakSegDataError, match="does not fit"):
        check = check_folder(FolderDataset(tmp_path, num_classes=2, in_channels=1, image_size=64, resize="pad"),
                             use_cache=False)
        check.raise_if_bad()


def test_scribbles_erased_by_the_downscale_are_reported(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "scribbles").mkdir()
    (tmp_path / "masks").mkdir()
    img = np.zeros((256, 216), np.uint8)
    sc = np.full((256, 216), 255, np.uint8)
    sc[101, 50:150] = 1   # one-pixel lines that a 4x nearest downscale misses
    sc[50:150, 103] = 2
    sc[200:240, 20:60] = 3
    cv2.imwrite(str(tmp_path / "images" / "s.png"), img)
    cv2.imwrite(str(tmp_path / "scribbles" / "s.png"), sc)
    cv2.imwrite(str(tmp_path / "masks" / "s.png"), np.zeros((256, 216), np.uint8))
    ds = FolderDataset(tmp_path, scribble_dir="scribbles", num_classes=4, in_channels=1, image_size=64,
                       labels=("scribble",))
    report = check_folder(ds, use_cache=False)
    note = next(n for n in report.notes if n.field == "scribble")
    assert "[1, 2]" in note.message
    with pytest.warns(UserWarning, match=r"erased weak labels: scribble: classes \[1, 2\]"):
        s = ds[0]
    assert set(s["scribble"].unique().tolist()) == {3, 255}


def test_emptiness_leaves_the_padding_out():
    """emptiness_ce with a content mask equals the loss on the cropped content (reference: crop by hand)."""
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 16, 20)
    boxes = [torch.tensor([[1., 6., 3., 12., 9.]]), torch.tensor([[2., 5., 2., 9., 12.], [1., 10., 4., 14., 8.]])]
    valid = torch.zeros(2, 16, 20, dtype=torch.bool)
    valid[:, 1:15, 4:16] = True
    got = emptiness_ce(logits, boxes, reduction="none", valid=valid)
    crop = logits[:, :, 1:15, 4:16]
    shifted = [b - torch.tensor([0., 4., 1., 4., 1.]) for b in boxes]
    ref = emptiness_ce(crop, shifted, reduction="none")
    assert torch.allclose(got, ref, atol=1e-6)
    assert not torch.allclose(got, emptiness_ce(logits, boxes, reduction="none"))


def test_weakseg_check_prints_the_report(tmp_path, capsys):
    from lightning_weakseg.cli import check
    root = write_folder(tmp_path / "d")
    cv2.imwrite(str(root / "masks" / "im1.png"), np.full((24, 24), 5, np.uint8))
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(f"data:\n  source: folder\n  root: {root}\n  num_classes: 2\n  in_channels: 3\n"
                   f"  image_size: 16\n  check_cache_dir: {tmp_path / 'cache'}\n")
    assert check(["--config", str(cfg)]) == 1
    out = capsys.readouterr().out
    assert "1 problem(s)" in out and "im1.png" in out and "[5]" in out
    cv2.imwrite(str(root / "masks" / "im1.png"), np.zeros((24, 24), np.uint8))
    assert check(["--config", str(cfg)]) == 0


def test_resume_with_more_epochs_follows_the_new_schedule(tmp_path):
    import math
    from lightning.pytorch.callbacks import ModelCheckpoint
    dm = WeakSegDataModule(n_samples=16, image_size=32, batch_size=8, val_fraction=0.25, augment="none")
    model = WeakSegModule(in_channels=1, num_classes=4, lr=1e-2)
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    L.Trainer(max_epochs=2, accelerator="cpu", logger=False, callbacks=[ckpt], enable_progress_bar=False,
              limit_val_batches=0).fit(model, dm)
    seen = []

    class Record(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.append(trainer.optimizers[0].param_groups[0]["lr"])

    model2 = WeakSegModule(in_channels=1, num_classes=4, lr=1e-2)
    dm2 = WeakSegDataModule(n_samples=16, image_size=32, batch_size=8, val_fraction=0.25, augment="none")
    with pytest.warns(UserWarning, match="schedule now spans 8 steps"):
        L.Trainer(max_epochs=4, accelerator="cpu", logger=False, callbacks=[Record()], enable_progress_bar=False,
                  limit_val_batches=0, enable_checkpointing=False).fit(model2, dm2, ckpt_path=str(tmp_path / "last.ckpt"))
    # 2 steps per epoch: steps 4..7 of an 8-step cosine from 1e-2 (the old 4-step schedule would have climbed)
    expect = [1e-2 * (1 + math.cos(math.pi * t / 8)) / 2 for t in range(4, 8)]
    assert np.allclose(seen, expect, rtol=1e-6), (seen, expect)


def test_validation_scores_leave_the_padding_out():
    """A model that predicts foreground everywhere, padding included: the scores equal those of the content region
    alone (reference: the metric on the cropped tensors)."""
    from lightning_weakseg.metrics import HD95, DiceIoU

    class Everywhere(WeakSegModule):
        def forward(self, x):
            logits = torch.zeros(x.shape[0], 2, *x.shape[-2:])
            logits[:, 1] = 1.0
            return {"logits": logits, "probs": logits.softmax(1)}

    model = Everywhere(in_channels=1, num_classes=2)
    mask = torch.full((1, 16, 16), 255)
    mask[:, :, 4:12] = 0
    mask[:, 6:10, 6:10] = 1
    batch = {"image": torch.zeros(1, 1, 16, 16), "mask": mask, "content": torch.tensor([[0, 4, 16, 8]]),
             "orig_size": torch.tensor([[32, 16]])}
    model._eval_step(batch, "val")
    dice, _ = model.val_scores.compute()
    hd = model.val_hd95.compute()
    ref_s, ref_h = DiceIoU(2), HD95(2)
    pred = torch.ones(1, 16, 8, dtype=torch.long)
    ref_s.update(pred, mask[:, :, 4:12])
    ref_h.update(pred, mask[:, :, 4:12])
    assert torch.allclose(dice, ref_s.compute()[0]) and torch.allclose(hd, ref_h.compute())
    plain = HD95(2)
    plain.update(torch.ones(1, 16, 16, dtype=torch.long), torch.where(mask == 255, 0, mask))
    assert not torch.allclose(hd, plain.compute())  # the padding would have moved HD95


def test_a_separate_test_folder_is_checked_up_front_too(tmp_path):
    root = write_folder(tmp_path / "train", boxes=False)
    test = write_folder(tmp_path / "test", n=3, boxes=False)
    cv2.imwrite(str(test / "masks" / "im1.png"), np.full((24, 24), 6, np.uint8))
    with pytest.raises(WeakSegDataError, match=r"\[6\]") as e:
        dm_for(root, test_dir=str(test)).setup("fit")
    assert e.value.sample == "im1" and "test" in str(e.value)
    dm = dm_for(root, test_dir=str(test), on_bad_data="skip")
    with pytest.warns(UserWarning, match="1 problem"):
        dm.setup("fit")
    assert [dm.test_dataset.sample_id(i) for i in dm.test_dataset.indices] == ["im0", "im2"]
    assert dm.data_report.ok and not dm.test_data_report.ok


@pytest.mark.parametrize("method,kw", [("max", {}), ("mean", {}), ("lse", {"r": 5.0}), ("lse", {"r": 0.01}),
                                       ("topk", {"k": 0.1}), ("topk", {"k": 3}), ("gem", {"p": 3.0})])
def test_mil_pooling_over_the_image_only_equals_pooling_the_crop(method, kw):
    """Per image, pooling with a content mask = pooling that image's content region cropped by hand."""
    from lightning_weakseg.losses.mil import mil_pool
    torch.manual_seed(0)
    s = torch.rand(3, 2, 12, 10) if method == "gem" else torch.randn(3, 2, 12, 10)
    boxes = [(0, 0, 12, 10), (2, 1, 8, 6), (0, 3, 12, 4)]   # top, left, h, w
    valid = torch.zeros(3, 12, 10, dtype=torch.bool)
    for i, (t, l, h, w) in enumerate(boxes):
        valid[i, t:t + h, l:l + w] = True
    got = mil_pool(s, method, valid=valid, **kw)
    for i, (t, l, h, w) in enumerate(boxes):
        ref = mil_pool(s[i:i + 1, :, t:t + h, l:l + w], method, **kw)
        assert torch.allclose(got[i], ref[0], atol=1e-5), (method, i, got[i], ref[0])


def test_tv_and_tag_size_over_the_image_only_equal_the_crop():
    from lightning_weakseg.losses.mil import tag_size_constraint
    from lightning_weakseg.losses.partial import total_variation_loss
    torch.manual_seed(1)
    p = torch.rand(2, 3, 10, 12).softmax(1)
    valid = torch.zeros(2, 10, 12, dtype=torch.bool)
    valid[0, 2:8, 3:12] = True
    valid[1] = True
    tv = total_variation_loss(p, reduction="none", valid=valid)
    assert torch.allclose(tv[0], total_variation_loss(p[:1, :, 2:8, 3:12], reduction="none")[0], atol=1e-6)
    assert torch.allclose(tv[1], total_variation_loss(p[1:], reduction="none")[0], atol=1e-6)
    tags = torch.tensor([[1., 1., 1.], [1., 0., 1.]])
    size = tag_size_constraint(p, tags, 2.0, 0.1, 0.3, penalty="quadratic", reduction="none", valid=valid)
    ref0 = tag_size_constraint(p[:1, :, 2:8, 3:12], tags[:1], 2.0, 0.1, 0.3, penalty="quadratic", reduction="none")
    assert torch.allclose(size[0], ref0[0], atol=1e-6)
