"""Unlabelled images in training: two-stream batches (``labelled_share``, ``TwoStreamSampler``) against a slow
reference, under two simulated DDP ranks and across a resume; a folder of images without label files
(``unlabelled_dir``) read from real files on disk, for image folders and NIfTI volumes, with bad files named."""
from __future__ import annotations

from pathlib import Path

import cv2
import nibabel as nib
import numpy as np
import pytest
import torch

from lightning_weakseg.data import WeakSegDataError, WeakSegDataModule
from lightning_weakseg.data import sampling
from lightning_weakseg.data.batch import collate
from lightning_weakseg.data.sampling import TwoStreamSampler


# ---------------------------------------------------------------- two-stream batches
def reference_order(flags, k, b, n_batches, perms_l, perms_u):
    """Slow reference: batch j = the next k labelled of the chained labelled permutations, then the next b - k
    unlabelled of the chained unlabelled ones."""
    lab = [i for i, f in enumerate(flags) if f]
    unl = [i for i, f in enumerate(flags) if not f]
    ls = [lab[p] for perm in perms_l for p in perm]
    us = [unl[p] for perm in perms_u for p in perm]
    batches = []
    for j in range(n_batches):
        batches.append(ls[j * k:(j + 1) * k] + us[j * (b - k):(j + 1) * (b - k)])
    return batches


def test_two_stream_order_against_reference():
    flags = [i % 5 == 0 for i in range(23)]  # 5 labelled, 18 unlabelled
    s = TwoStreamSampler(list(range(23)), labelled=flags, labelled_per_batch=2, shuffle=True, seed=4, batch_size=4)
    s.set_epoch(3)
    order = list(s)
    # the generator draws the labelled permutations first (as many as 6 batches × 2 need), then the unlabelled ones
    g = torch.Generator().manual_seed(4 + 3)
    perms_l = [torch.randperm(5, generator=g).tolist() for _ in range(3)]   # 12 labelled draws: 3 passes of 5
    perms_u = [torch.randperm(18, generator=g).tolist() for _ in range(1)]  # 12 unlabelled draws: 1 pass
    ref = reference_order(flags, 2, 4, 6, perms_l, perms_u)
    assert [order[i:i + 4] for i in range(0, len(order), 4)] == ref
    assert len(order) == len(s) == 24  # ceil(23 / 4) full batches
    # every batch holds exactly 2 labelled samples; no unlabelled sample twice in the epoch
    assert all(sum(flags[i] for i in order[j:j + 4]) == 2 for j in range(0, 24, 4))
    unl = [i for i in order if not flags[i]]
    assert len(unl) == len(set(unl))


def test_two_stream_ranks_deal_the_one_process_batches(monkeypatch):
    flags = [i < 6 for i in range(16)]
    args = dict(labelled=flags, labelled_per_batch=1, shuffle=True, seed=0, batch_size=4)
    one = list(TwoStreamSampler(list(range(16)), **args))
    per_rank = []
    for rank in (0, 1):
        monkeypatch.setattr(sampling, "_world", lambda r=rank: (2, r))
        per_rank.append(list(TwoStreamSampler(list(range(16)), **args)))
    batches = [one[i:i + 4] for i in range(0, 16, 4)]
    assert per_rank[0] == batches[0] + batches[2] and per_rank[1] == batches[1] + batches[3]


def test_two_stream_resume_skips_the_trained_batches():
    flags = [i % 3 == 0 for i in range(30)]
    args = dict(labelled=flags, labelled_per_batch=2, shuffle=True, seed=1, batch_size=6)
    full = TwoStreamSampler(list(range(30)), **args)
    full.set_epoch(2)
    resumed = TwoStreamSampler(list(range(30)), **args)
    resumed.skip_batches(epoch=2, batches=3)
    resumed.set_epoch(2)
    assert list(resumed) == list(full)[18:]
    assert list(resumed) == list(full)  # once only: the next pass of the same epoch is whole again


@pytest.mark.parametrize("bad", [dict(labelled_per_batch=0), dict(labelled_per_batch=4),
                                 dict(labelled=[True] * 8), dict(labelled=[False] * 8), dict(labelled=[True] * 3)])
def test_two_stream_rejects_impossible_batches(bad):
    args = dict(labelled=[i < 2 for i in range(8)], labelled_per_batch=1, shuffle=False, seed=0, batch_size=4)
    with pytest.raises(ValueError, match="TwoStreamSampler"):
        TwoStreamSampler(list(range(8)), **{**args, **bad})


def test_labelled_share_batches_of_the_data_module():
    dm = WeakSegDataModule(synthetic_kind="organ", n_samples=40, image_size=16, batch_size=5, val_fraction=0.2,
                           label_fractions={"mask": 0.25, "none": 0.75}, labelled_share=0.4, augment="none")
    dm.setup("fit")
    flags = dm.labelled_flags()
    assert sum(flags) == 8 and len(flags) == 32
    seen = 0
    for batch in dm.train_dataloader():
        assert batch["has_mask"].sum().item() == 2  # round(0.4 · 5)
        seen += 1
    assert seen == 7  # ceil(32 / 5) batches, as without two streams
    with pytest.raises(ValueError, match="labelled_share"):
        WeakSegDataModule(labelled_share=1.0)


# ---------------------------------------------------------------- a folder of unlabelled images
def write_labelled(root: Path, n=6, size=(16, 16)) -> Path:
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        mask = np.zeros(size, np.uint8)
        mask[3:9, 4:12] = 1
        cv2.imwrite(str(root / "images" / f"p{i}.png"), rng.integers(0, 255, (*size, 3), dtype=np.uint8))
        cv2.imwrite(str(root / "masks" / f"p{i}.png"), mask)
    return root


def write_unlabelled(folder: Path, names=("u0", "u1", "p0"), size=(16, 16)) -> Path:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    for name in names:  # "p0" is also the stem of a labelled image: the ids must not collide
        cv2.imwrite(str(folder / f"{name}.png"), rng.integers(0, 255, (*size, 3), dtype=np.uint8))
    return folder


def folder_dm(root, unl, **kw) -> WeakSegDataModule:
    args = dict(source="folder", root=str(root), num_classes=2, in_channels=3, image_size=16, batch_size=4,
                val_fraction=0.34, augment="none", shuffle=False, unlabelled_dir=str(unl))
    return WeakSegDataModule(**{**args, **kw})


def test_unlabelled_folder_joins_the_training_split(tmp_path):
    root, unl = write_labelled(tmp_path / "data"), write_unlabelled(tmp_path / "extra")
    dm = folder_dm(root, unl)
    dm.setup("fit")
    ds = dm.train_dataset
    ids = [ds.sample_id(ds.raw_index(i)) for i in range(len(ds))]
    assert ids[-3:] == ["unlabelled/p0", "unlabelled/u0", "unlabelled/u1"]
    assert len(ids) == len(dm.split["train"]) + 3 and len(set(ids)) == len(ids)
    val_ids = {dm.val_dataset.sample_id(i) for i in dm.val_dataset.indices}
    assert not val_ids & {"unlabelled/p0", "unlabelled/u0", "unlabelled/u1"}  # never validated on
    assert dm.labelled_flags() == [True] * (len(ids) - 3) + [False] * 3
    # an unlabelled sample: the file's pixels (RGB, /255; same size: no resize), no label key, a unique raw index
    s = ds[len(ds) - 1]
    ref = cv2.cvtColor(cv2.imread(str(unl / "u1.png")), cv2.COLOR_BGR2RGB).astype(np.float32) / 255.0
    assert torch.allclose(s["image"], torch.from_numpy(ref).permute(2, 0, 1))
    assert not {"mask", "scribble", "boxes", "points", "tags"} & set(s)
    assert s["index"] == dm.full_dataset.raw_length() + 2
    batch = collate([ds[0], ds[len(ds) - 1]])
    assert batch["has_mask"].tolist() == [True, False]
    assert (batch["mask"][1] == 255).all()  # the unlabelled row of the label map is unknown everywhere


def test_unlabelled_folder_with_two_stream_batches(tmp_path):
    root, unl = write_labelled(tmp_path / "data"), write_unlabelled(tmp_path / "extra", names=[f"u{i}" for i in range(9)])
    dm = folder_dm(root, unl, labelled_share=0.5, shuffle=True)
    dm.setup("fit")
    for batch in dm.train_dataloader():
        assert batch["has_mask"].tolist().count(True) == 2
        assert all(i.startswith("unlabelled/") for i, h in zip(batch["id"], batch["has_mask"].tolist()) if not h)


def test_bad_unlabelled_file_is_named_or_skipped(tmp_path):
    root, unl = write_labelled(tmp_path / "data"), write_unlabelled(tmp_path / "extra")
    (unl / "u0.png").write_bytes(b"not a png")
    with pytest.raises(WeakSegDataError, match="u0.png"):
        folder_dm(root, unl).setup("fit")
    dm = folder_dm(root, unl, on_bad_data="skip")
    dm.setup("fit")
    ds = dm.train_dataset
    ids = [ds.sample_id(ds.raw_index(i)) for i in range(len(ds))]
    assert "unlabelled/u0" not in ids and "unlabelled/u1" in ids
    assert dm.unlabelled_data_report.bad_indices() == {1}
    assert not dm.data_report.problems  # the labelled data's report is its own


def test_unlabelled_images_of_another_channel_count_are_refused(tmp_path):
    root = write_labelled(tmp_path / "data")
    (tmp_path / "gray").mkdir()
    cv2.imwrite(str(tmp_path / "gray" / "g0.png"), np.zeros((16, 16), np.uint8))
    with pytest.raises(WeakSegDataError, match="g0"):
        folder_dm(root, tmp_path / "gray").setup("fit")


def test_unlabelled_volumes_join_the_training_slices(tmp_path):
    rng = np.random.default_rng(0)
    data = tmp_path / "vols"
    for sub in ("images", "labels"):
        (data / sub).mkdir(parents=True)
    for name in ("pa", "pb", "pc"):
        lab = np.zeros((12, 12, 3), np.uint8)
        lab[3:8, 3:8, 1] = 1
        nib.save(nib.Nifti1Image((lab * 50 + rng.normal(0, 5, lab.shape)).astype(np.int16), np.eye(4)),
                 str(data / "images" / f"{name}.nii.gz"))
        nib.save(nib.Nifti1Image(lab, np.eye(4)), str(data / "labels" / f"{name}.nii.gz"))
    unl = tmp_path / "unl"
    unl.mkdir()
    vol = rng.normal(100, 20, (12, 12, 4)).astype(np.int16)
    nib.save(nib.Nifti1Image(vol, np.diag([1.5, 1.5, 4.0, 1.0])), str(unl / "extra.nii.gz"))
    dm = WeakSegDataModule(source="volumes", root=str(data), image_dir="images", mask_dir="labels", num_classes=2,
                           in_channels=1, image_size=12, batch_size=4, val_fraction=0.34, augment="none",
                           shuffle=False, unlabelled_dir=str(unl))
    dm.setup("fit")
    ds = dm.train_dataset
    ids = [ds.sample_id(ds.raw_index(i)) for i in range(len(ds))]
    assert sum(i.startswith("unlabelled/extra") for i in ids) == 4  # every slice of the unlabelled volume
    s = ds[len(ds) - 1]
    assert s["volume"] == "extra" and s["slice"] == 3 and s["spacing"].tolist() == [4.0, 1.5, 1.5]  # slice axis first
    assert "mask" not in s
    # percentile-normalised like every volume: slice 3 of the unlabelled volume, by hand
    lo, hi = np.percentile(vol.astype(np.float64), [0.5, 99.5])
    ref = np.clip((vol[..., 3].astype(np.float64) - lo) / (hi - lo), 0, 1)
    assert np.allclose(s["image"][0].numpy(), ref, atol=1e-5)
    batch = collate([ds[0], s])
    assert batch["has_mask"].tolist() == [True, False] and batch["volume"][1] == "extra"


def test_weakseg_check_reports_the_unlabelled_folder(tmp_path, capsys):
    from lightning_weakseg.cli import check
    root, unl = write_labelled(tmp_path / "data"), write_unlabelled(tmp_path / "extra")
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(f"data:\n  source: folder\n  root: {root}\n  num_classes: 2\n  in_channels: 3\n  image_size: 16\n"
                   f"  unlabelled_dir: {unl}\n  check_cache_dir: {tmp_path / 'cache'}\n")
    assert check(["--config", str(cfg)]) == 0
    (unl / "u1.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    assert check(["--config", str(cfg)]) == 1
    out = capsys.readouterr().out
    assert "unlabelled_dir: " in out and "u1.png" in out


def test_mean_teacher_learns_from_the_unlabelled_folder_only_through_consistency(tmp_path):
    """A training step on a batch of the joined data: the unlabelled images' rows of the supervised term are zero
    (the term equals the labelled rows' sum / B computed by hand), and the consistency term covers every row."""
    from lightning_weakseg.losses.partial import masked_cross_entropy
    from lightning_weakseg.regimes import MeanTeacherSegModule
    root, unl = write_labelled(tmp_path / "data"), write_unlabelled(tmp_path / "extra", names=[f"u{i}" for i in range(6)])
    dm = folder_dm(root, unl, labelled_share=0.5)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    torch.manual_seed(0)
    model = MeanTeacherSegModule(in_channels=3, num_classes=2, encoder="tu-resnet18", norm="group",
                                 model_kwargs={"encoder_depth": 3, "decoder_channels": [16, 8, 4]},
                                 consistency_rampup_epochs=0, strong_brightness=0, strong_contrast=0, strong_noise=0)
    with torch.no_grad():  # a teacher that differs from the student: a consistency term that is not zero
        for p in model.teacher_model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    model.train()
    out = model(batch["image"])
    terms = model.loss_terms(batch, out)
    has = batch["has_mask"]
    ce = masked_cross_entropy(out["logits"], batch["mask"], reduction="none")
    assert torch.allclose(terms["seg/ce"], ce[has].sum() / has.numel())
    p_s, p_t = out["logits"].softmax(1), model.teacher_probs(batch["image"])
    per_row = (p_s - p_t).pow(2).flatten(1).mean(1)
    assert (per_row[~has] > 0).all() and (~has).any()
    assert torch.allclose(terms["semi/consistency"], per_row.mean(), atol=1e-7)


def test_two_stream_resume_mid_epoch_sees_the_same_batches(tmp_path):
    """A run resumed from a checkpoint written inside an epoch trains on exactly the batches the uninterrupted run
    trained on after that point (shuffled two-stream batches, the sampler's position from the checkpoint)."""
    import lightning as L
    from lightning.pytorch.callbacks import Callback, ModelCheckpoint
    from lightning_weakseg import WeakSegModule

    seen: dict[int, list] = {}

    class Record(Callback):
        def __init__(self, run):
            self.run = run

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.setdefault(self.run, []).append((trainer.global_step, batch["index"].tolist()))

    def build():
        dm = WeakSegDataModule(synthetic_kind="organ", n_samples=20, image_size=16, batch_size=4, val_fraction=0.2,
                               label_fractions={"mask": 0.25, "none": 0.75}, labelled_share=0.5, augment="none")
        return WeakSegModule(in_channels=1, num_classes=4, encoder="tu-resnet18", norm="group",
                             model_kwargs={"encoder_depth": 3, "decoder_channels": [16, 8, 4]}), dm

    args = dict(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                num_sanity_val_steps=0, limit_val_batches=0, max_epochs=2, default_root_dir=str(tmp_path))
    ckpt = ModelCheckpoint(dirpath=str(tmp_path), filename="{step}", every_n_train_steps=2, save_top_k=-1)
    model, dm = build()
    L.Trainer(callbacks=[ckpt, Record(0)], **args).fit(model, dm)
    model, dm = build()
    L.Trainer(callbacks=[Record(1)], enable_checkpointing=False, **args).fit(model, dm,
                                                                             ckpt_path=str(tmp_path / "step=2.ckpt"))
    assert len(seen[0]) == 8 and [s for s, _ in seen[1]] == list(range(2, 8))
    assert seen[1] == seen[0][2:]
    assert [b for _, b in seen[0][:4]] != [b for _, b in seen[0][4:]]  # the two epochs were shuffled differently


def test_labelled_share_without_unlabelled_samples_names_the_option():
    dm = WeakSegDataModule(synthetic_kind="organ", n_samples=20, image_size=16, batch_size=4, labelled_share=0.5)
    dm.setup("fit")
    with pytest.raises(ValueError, match=r"labelled_share=0.5 with batch_size=4: .*0 unlabelled"):
        dm.train_dataloader()


def test_labelled_samples_are_the_same_with_an_unlabelled_folder(tmp_path):
    """Joining the unlabelled folder leaves the labelled samples as they were: weak labels derived with the data's
    weakify options and seed (jittered boxes, clicked points) are identical with and without it."""
    root, unl = write_labelled(tmp_path / "data"), write_unlabelled(tmp_path / "extra")
    args = dict(train_labels=("boxes", "points"), seed=3,
                weakify={"box_jitter": 0.3, "point_mode": "click", "point_fraction": 0.5})
    plain = folder_dm(root, unl, **args, unlabelled_dir=None)
    joined = folder_dm(root, unl, **args)
    plain.setup("fit")
    joined.setup("fit")
    n = len(plain.train_dataset)
    for i in range(n):
        a, b = plain.train_dataset[i], joined.train_dataset[i]
        assert a["id"] == b["id"]
        assert torch.equal(a["boxes"], b["boxes"]) and torch.equal(a["points"], b["points"])
        assert torch.equal(a["image"], b["image"])
