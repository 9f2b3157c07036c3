"""NIfTI volumes: slices in (read with nibabel, normalised once per volume, split by patient), per-volume 3D Dice and
HD95 (against a slow reference and MONAI, also under 2-process DDP), and predicted volumes out on the input's grid
with its affine."""
from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import cv2
import lightning as L
import nibabel as nib
import numpy as np
import pytest
import torch
from scipy.spatial.distance import cdist

from lightning_weakseg import WeakSegModule
from lightning_weakseg.callbacks import MaskWriter
from lightning_weakseg.data import WeakSegDataModule, WeakSegDataError, collate
from lightning_weakseg.data.sampling import PadFlagged, PaddedEvalSampler
from lightning_weakseg.data.volumes import VolumeDataset, WholeVolumeSampler, normalise_volume
from lightning_weakseg.metrics import VolumeScores, score_volumes, volume_dice, volume_hd95

ROOT = Path(__file__).resolve().parents[1]
SPACING = (1.5, 1.5, 8.0)  # mm, along the file's axes (H, W, slices)
# a volume per (name, H × W × slices): two patients with two frames, one with one; slices are not square and differ
# from the 32-px base view, so every prediction is mapped back to another size
VOLUMES = {"patient001_frame01": (40, 36, 5), "patient001_frame12": (40, 36, 4), "patient002_frame01": (30, 44, 6),
           "patient003_frame01": (36, 36, 4)}


def oblique_affine(spacing=SPACING) -> np.ndarray:
    """Voxel → mm: a rotation about the slice axis and a shift, with the given voxel sizes (not the identity)."""
    th = 0.3
    rot = np.array([[np.cos(th), -np.sin(th), 0.0], [np.sin(th), np.cos(th), 0.0], [0.0, 0.0, 1.0]])
    a = np.eye(4)
    a[:3, :3] = rot @ np.diag(spacing)
    a[:3, 3] = [10.0, -5.0, 3.0]
    return a


def write_volumes(root: Path, volumes=VOLUMES, seed=0, affine=None) -> Path:
    """Nested discs (1 ⊃ 2 ⊃ 3) whose centre and radius drift from slice to slice, first and last slice empty;
    int16 intensities ``60 · class`` plus noise; scribbles: one row through the centre. Real .nii.gz files."""
    rng = np.random.default_rng(seed)
    affine = oblique_affine() if affine is None else affine
    for sub in ("images", "labels", "scribbles"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for name, (H, W, D) in volumes.items():
        yy, xx = np.mgrid[:H, :W]
        lab = np.zeros((H, W, D), np.uint8)
        for k in range(1, D - 1):
            cy, cx = H / 2 + rng.uniform(-3, 3), W / 2 + rng.uniform(-3, 3)
            r = np.hypot(yy - cy, xx - cx) / rng.uniform(0.8, 1.2)
            lab[..., k][r < 11] = 1
            lab[..., k][r < 7] = 2
            lab[..., k][r < 4] = 3
        img = (lab * 60.0 + rng.normal(0, 12, lab.shape)).astype(np.int16)
        scr = np.full(lab.shape, 255, np.uint8)
        scr[H // 2] = lab[H // 2]
        for sub, arr in (("images", img), ("labels", lab), ("scribbles", scr)):
            nib.save(nib.Nifti1Image(arr, affine), str(root / sub / f"{name}.nii.gz"))
    return root


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_volumes(tmp_path_factory.mktemp("volumes"))


def dm_for(root: Path, **kw) -> WeakSegDataModule:
    args = dict(source="volumes", root=str(root), image_dir="images", mask_dir="labels", num_classes=4,
                in_channels=1, image_size=32, batch_size=3, augment="none", group_regex=r"^(patient\d+)")
    return WeakSegDataModule(**{**args, **kw})


def trainer(**kw) -> L.Trainer:
    return L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                     enable_model_summary=False, enable_checkpointing=False, **kw)


class IntensityRule(WeakSegModule):
    """Class ``c`` where the normalised intensity is nearest ``c / 3``: a per-voxel rule instead of a network."""

    def forward(self, x):
        centres = torch.arange(4, dtype=x.dtype).view(1, 4, 1, 1) / 3
        logits = -50.0 * (x[:, :1] - centres) ** 2 + 0.0 * self.model.segmentation_head[0].bias.sum()
        return {"logits": logits, "probs": logits.softmax(1)}


def rule_model(**kw) -> IntensityRule:
    return IntensityRule(encoder="resnet18", in_channels=1, num_classes=4, **kw).eval()


def load(path: Path) -> np.ndarray:
    return np.asanyarray(nib.load(str(path)).dataobj)


# ---------------------------------------------------------------------------------------------- slow references
def slow_surface(m: np.ndarray) -> np.ndarray:
    """(N,3) indices of the voxels of ``m`` with a face neighbour outside ``m`` or outside the array."""
    out = []
    for idx in np.argwhere(m):
        for axis, step in itertools.product(range(3), (-1, 1)):
            n = idx.copy()
            n[axis] += step
            if n[axis] < 0 or n[axis] >= m.shape[axis] or not m[tuple(n)]:
                out.append(idx)
                break
    return np.array(out, float)


def slow_hd95(a: np.ndarray, b: np.ndarray, spacing, pooled: bool = True) -> float:
    """All surface-voxel pairs, the nearest in mm each way; medpy pools both sets, MONAI takes the larger P95."""
    d = cdist(slow_surface(a) * spacing, slow_surface(b) * spacing)
    d_ab, d_ba = d.min(1), d.min(0)
    if pooled:
        return float(np.percentile(np.concatenate([d_ab, d_ba]), 95))
    return float(max(np.percentile(d_ab, 95), np.percentile(d_ba, 95)))


def monai_hd95(a: np.ndarray, b: np.ndarray, spacing) -> tuple[float, float]:
    """(pooled, max) from MONAI: its mask edges and surface distances pooled (medpy's convention), and its own
    ``compute_hausdorff_distance(percentile=95)``."""
    from monai.metrics import compute_hausdorff_distance
    from monai.metrics.utils import get_mask_edges, get_surface_distance

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # a deprecated argument's default, inside MONAI
        ea, eb = get_mask_edges(a, b, crop=True)
        d = np.concatenate([get_surface_distance(ea, eb, spacing=spacing),
                            get_surface_distance(eb, ea, spacing=spacing)])
        ref_max = compute_hausdorff_distance(torch.from_numpy(a)[None, None], torch.from_numpy(b)[None, None],
                                             include_background=True, percentile=95, spacing=list(spacing))
    return float(np.percentile(d, 95)), float(ref_max)


# ---------------------------------------------------------------------------------------------- metrics
def test_two_cubes_dice_by_hand_and_hd95_against_slow_reference_and_monai():
    # cube a: 4^3 voxels; cube b: the same shifted by one voxel along the last axis -> |a ∩ b| = 48
    a = np.zeros((8, 9, 10), np.uint8)
    b = a.copy()
    a[2:6, 2:6, 2:6] = 1
    b[2:6, 2:6, 3:7] = 1
    assert volume_dice(a, b, 2)[0] == pytest.approx(2 * 48 / 128)
    for spacing in ((1.0, 1.0, 1.0), (8.0, 1.5, 1.5), (2.0, 0.7, 3.0)):
        ours = volume_hd95(a, b, 2, spacing)[0]
        assert ours == pytest.approx(slow_hd95(a.astype(bool), b.astype(bool), spacing), abs=1e-9)
        pooled, larger = monai_hd95(a.astype(bool), b.astype(bool), spacing)
        assert ours == pytest.approx(pooled, rel=1e-5)
        assert volume_hd95(a, b, 2, spacing, convention="max")[0] == pytest.approx(larger, rel=1e-5)
    # the conventions differ: the target plus a spurious blob that holds 8 % of the prediction's surface (beyond the
    # 5 % of its directed P95) but 4 % of both surfaces pooled (within the pooled P95)
    target = np.zeros((6, 20, 20), bool)
    target[1:5, 2:14, 2:14] = True
    pred = target.copy()
    pred[2:4, 15:19, 15:19] = True
    s = (8.0, 1.5, 1.5)
    pooled, larger = volume_hd95(pred, target, 2, s)[0], volume_hd95(pred, target, 2, s, convention="max")[0]
    assert pooled == 0.0 == slow_hd95(pred, target, s)
    assert larger == pytest.approx(slow_hd95(pred, target, s, pooled=False))
    assert larger == pytest.approx(monai_hd95(pred, target, s)[1], rel=1e-5)
    assert larger > 6


def test_multiclass_random_volumes_against_slow_reference_and_monai():
    rng = np.random.default_rng(3)
    s = (8.0, 1.5, 1.5)
    for _ in range(3):
        base = cv2.GaussianBlur(rng.random((5, 24, 22)).astype(np.float32).transpose(1, 2, 0), (0, 0), 3)
        target = np.digitize(base.transpose(2, 0, 1), np.quantile(base, [0.4, 0.6, 0.8])).astype(np.uint8)
        pred = np.where(rng.random(target.shape) < 0.08, rng.integers(0, 4, target.shape), target).astype(np.uint8)
        hd, dice = volume_hd95(pred, target, 4, s), volume_dice(pred, target, 4)
        for c in range(1, 4):
            p, t = pred == c, target == c
            assert hd[c - 1] == pytest.approx(slow_hd95(p, t, s), abs=1e-9)
            assert hd[c - 1] == pytest.approx(monai_hd95(p, t, s)[0], rel=1e-5)
            assert dice[c - 1] == pytest.approx(2 * (p & t).sum() / (p.sum() + t.sum()))


def test_missing_classes_and_ignored_voxels():
    pred, target = np.zeros((3, 8, 8), np.uint8), np.zeros((3, 8, 8), np.uint8)
    target[1, 2:5, 2:5] = 1            # class 1 missed by the prediction: Dice 0, HD95 undefined
    pred[1, 2:5, 2:5] = 2              # class 2 predicted, absent from the target: Dice 0, HD95 undefined
    d, h = volume_dice(pred, target, 4), volume_hd95(pred, target, 4)
    assert d[0] == 0 and d[1] == 0 and np.isnan(d[2])       # class 3 in neither: not scored
    assert np.isnan(h).all()
    target[0] = 255                    # unknown voxels are not counted: a prediction there changes nothing
    p2 = pred.copy()
    p2[0] = 1
    np.testing.assert_equal(volume_dice(p2, target, 4), volume_dice(pred, target, 4))


def test_volume_scores_assemble_any_order_and_any_shard():
    """Slices fed in shuffled order and split over fake ranks give the scores of the whole volumes."""
    rng = np.random.default_rng(0)
    vols = {}
    for name, d in (("a", 4), ("b", 6)):
        t = np.zeros((d, 12, 10), np.uint8)
        t[1:-1, 3:9, 2:8] = 1
        t[1:-1, 5:7, 4:6] = 2
        p = np.where(rng.random(t.shape) < 0.1, rng.integers(0, 3, t.shape), t).astype(np.uint8)
        vols[name] = (p, t, (8.0, 1.5, 1.5))
    expected = score_volumes(vols, 3)
    rows = [(n, k) for n, (p, _, _) in vols.items() for k in range(p.shape[0])]
    order = rng.permutation(len(rows))
    collected = VolumeScores(3)
    for shard in (order[0::2], order[1::2]):
        for j in shard:
            n, k = rows[j]
            p, t, s = vols[n]
            collected.update([n], [k], [torch.from_numpy(p[k])], [t[k]], [s])
    got = collected.compute()
    np.testing.assert_allclose(got["dice"], expected["dice"])
    np.testing.assert_allclose(got["hd95"], expected["hd95"])
    assert got["n_volumes"] == 2 and got["mean_dice"] == pytest.approx(np.mean(expected["dice"]))
    collected.update(["a"], [0], [vols["a"][0][0]], [vols["a"][1][0]], [vols["a"][2]])  # one slice twice
    with pytest.raises(ValueError, match="slice 0 was predicted twice"):
        collected.compute()


# ---------------------------------------------------------------------------------------------- data in
def test_slices_carry_volume_slice_spacing_and_normalised_intensities(data):
    ds = VolumeDataset(data, mask_dir="labels", scribble_dir="scribbles", num_classes=4, in_channels=1,
                       image_size=32, labels=("mask", "scribble"), native_eval=True)
    assert len(ds) == sum(d for _, _, d in VOLUMES.values())
    name = "patient002_frame01"
    i = ds.raw_indices_of(name)[3]
    s = ds[i]
    assert (s["volume"], s["slice"], s["id"]) == (name, 3, f"{name}_slice_3")
    np.testing.assert_allclose(s["spacing"].numpy(), (8.0, 1.5, 1.5))  # (slice axis, H, W)
    assert s["image"].shape == (1, 32, 32) and s["native_mask"].shape == VOLUMES[name][:2]
    raw = load(data / "images" / f"{name}.nii.gz").astype(np.float64)
    lo, hi = np.percentile(raw, [0.5, 99.5])  # the percentiles of the whole volume, not of the slice
    ref = np.clip((raw[..., 3] - lo) / (hi - lo), 0, 1)
    np.testing.assert_allclose(ds.load_raw(i)["image"][..., 0], ref, atol=1e-5)
    np.testing.assert_array_equal(s["native_mask"].numpy(), load(data / "labels" / f"{name}.nii.gz")[..., 3])
    z = VolumeDataset(data, mask_dir="labels", num_classes=4, in_channels=1, volume_norm="zscore").load_raw(i)
    np.testing.assert_allclose(z["image"][..., 0], (raw[..., 3] - raw.mean()) / raw.std(), atol=1e-4)
    batch = collate([ds[i], ds[i + 1]])
    assert batch["volume"] == [name, name] and batch["slice"].tolist() == [3, 4]
    assert batch["spacing"].shape == (2, 3) and batch["scribble"].shape == (2, 32, 32)


def test_lru_cache_decodes_each_volume_once_per_pass(data):
    ds = VolumeDataset(data, mask_dir="labels", num_classes=4, in_channels=1, cache_volumes=2)
    for i in range(len(ds)):  # slice order: one decode per volume
        ds.load_raw(i)
    assert ds.decodes == len(VOLUMES)
    a, b, c = (ds.raw_indices_of(n)[0] for n in sorted(VOLUMES)[:3])
    before = ds.decodes
    for i in (a, b, a, b):  # two volumes fit the cache
        ds.load_raw(i)
    assert ds.decodes - before == 2
    ds.load_raw(c)  # pushes out the least recently used one, a
    ds.load_raw(b)
    assert ds.decodes - before == 3
    ds.load_raw(a)
    assert ds.decodes - before == 4 and len(ds._cache) == 2


def test_split_by_patient_and_empty_training_slices(data):
    dm = dm_for(data, val_fraction=0.34, empty_slice_rate=0.0, seed=1)
    dm.setup("fit")
    ds = dm.full_dataset
    patient = {i: ds.volume_of(i)[:10] for i in range(len(ds))}
    train_p = {patient[i] for i in dm.train_dataset.indices}
    val_p = {patient[i] for i in dm.val_dataset.indices}
    assert train_p and val_p and not train_p & val_p  # both frames of a patient on one side
    assert all(0 < dm.train_dataset[j]["slice"] < VOLUMES[dm.train_dataset[j]["volume"]][2] - 1
               for j in range(len(dm.train_dataset)))  # rate 0: the empty first and last slices are gone
    by_volume = {}
    for i in dm.val_dataset.indices:
        by_volume.setdefault(ds.volume_of(i), []).append(ds.slices[i][1])
    assert all(sorted(k) == list(range(VOLUMES[v][2])) for v, k in by_volume.items())  # validation keeps all
    n_empty = sum(1 for i in dm.split["train"] if ds.slices[i][1] in (0, VOLUMES[ds.volume_of(i)][2] - 1))
    half = ds.drop_empty_slices(dm.split["train"], 0.5, seed=1)
    assert len(half) == len(dm.split["train"]) - n_empty + round(0.5 * n_empty)
    assert half == ds.drop_empty_slices(dm.split["train"], 0.5, seed=1)  # seeded


def test_weak_labels_per_slice_boxes_and_scribbles(data):
    ds = VolumeDataset(data, mask_dir="labels", scribble_dir="scribbles", num_classes=4, in_channels=1,
                       image_size=32, labels=("boxes", "points", "scribble"))
    s = ds[ds.raw_indices_of("patient001_frame01")[2]]
    assert sorted(s["boxes"][:, 0].long().tolist()) == [1, 2, 3]  # one box per class of the mask slice
    assert set(s["points"][:, 0].long().tolist()) <= {0, 1, 2, 3} and len(s["points"])
    known = s["scribble"][s["scribble"] != 255]
    assert 0 < known.numel() < 0.2 * s["scribble"].numel()  # the real scribble volume's row, not a derived one


def test_data_check_names_file_and_field(tmp_path):
    root = write_volumes(tmp_path / "bad", {"p1_a": (20, 20, 3), "p2_a": (20, 20, 3), "p3_a": (20, 20, 3)})
    lab = load(root / "labels" / "p2_a.nii.gz").copy()
    lab[5, 5, 1] = 9
    nib.save(nib.Nifti1Image(lab, np.eye(4)), str(root / "labels" / "p2_a.nii.gz"))
    nib.save(nib.Nifti1Image(np.zeros((20, 18, 3), np.uint8), np.eye(4)), str(root / "labels" / "p3_a.nii.gz"))
    with pytest.raises(WeakSegDataError) as e:
        dm_for(root, group_regex=None).setup("fit")
    msg = str(e.value)
    assert "p2_a.nii.gz" in msg and "field 'mask'" in msg and "[9]" in msg
    assert "p3_a.nii.gz" in msg and "(20, 18, 3) differs from the image's (20, 20, 3)" in msg
    dm = dm_for(root, group_regex=None, on_bad_data="skip", val_fraction=0.5)
    dm.setup("fit")
    names = {dm.full_dataset.volume_of(i) for i in dm.train_dataset.indices + dm.val_dataset.indices}
    assert names == {"p1_a"}  # every slice of a bad volume left out
    nib.save(nib.Nifti1Image(np.zeros((20, 20), np.int16), np.eye(4)), str(root / "images" / "flat.nii.gz"))
    with pytest.raises(WeakSegDataError, match=r"flat\.nii\.gz.*expected a 3D volume"):
        VolumeDataset(root, mask_dir="labels", num_classes=4, in_channels=1)


# ---------------------------------------------------------------------------------------------- evaluation
def reference_volume_scores(data: Path, model, names, image_size=32) -> dict:
    """Each slice through the model in its base view, the letterbox crop resized to the slice with OpenCV, argmax,
    stacked, scored against the label file with the header's voxel sizes."""
    ds = VolumeDataset(data, mask_dir="labels", num_classes=4, in_channels=1, image_size=image_size)
    vols = {}
    for name in names:
        preds = []
        for i in ds.raw_indices_of(name):
            s = ds[i]
            with torch.no_grad():
                p = model(s["image"][None])["probs"][0].numpy()
            top, left, h, w = s["content"].tolist()
            h0, w0 = s["orig_size"].tolist()
            preds.append(np.stack([cv2.resize(np.ascontiguousarray(p[k, top:top + h, left:left + w]), (w0, h0),
                                              interpolation=cv2.INTER_LINEAR) for k in range(4)]).argmax(0))
        target = np.moveaxis(load(data / "labels" / f"{name}.nii.gz"), 2, 0)
        zooms = nib.load(str(data / "labels" / f"{name}.nii.gz")).header.get_zooms()
        vols[name] = (np.stack(preds), target, (zooms[2], zooms[0], zooms[1]))
    return score_volumes(vols, 4)


def test_validate_and_test_log_per_volume_scores(data):
    dm = dm_for(data, val_fraction=0.5, test_fraction=0.0)
    model = rule_model()
    res = trainer().validate(model, dm, verbose=False)[0]
    names = sorted({dm.full_dataset.volume_of(i) for i in dm.val_dataset.indices})
    ref = reference_volume_scores(data, model, names)
    assert 0.5 < ref["mean_dice"] < 0.99 and ref["mean_hd95"] > 0  # informative, not perfect
    assert res["val/volume_dice"] == pytest.approx(ref["mean_dice"], abs=2e-3)
    assert res["val/volume_hd95"] == pytest.approx(ref["mean_hd95"], rel=2e-2)
    for c in (1, 2, 3):
        assert res[f"val/volume_dice_{c}"] == pytest.approx(ref["dice"][c - 1], abs=5e-3)
    with pytest.warns(UserWarning, match="VALIDATION"):
        test = trainer().test(model, dm, verbose=False)[0]
    assert test["test/volume_dice"] == pytest.approx(res["val/volume_dice"])
    assert test["test/volume_hd95"] == pytest.approx(res["val/volume_hd95"])


def test_base_view_scores_crop_the_letterbox_and_scale_the_spacing(data):
    """Without native masks the slices are scored in the base view, cropped to the letterbox content, with the
    in-plane spacing scaled by the resize. Padding only (no resize): exactly the native scores."""
    from lightning_weakseg.volume_metrics import slice_predictions

    kw = dict(val_fraction=0.5, resize="pad", image_size=48)
    native = trainer().validate(rule_model(), dm_for(data, **kw), verbose=False)[0]
    base = trainer().validate(rule_model(), dm_for(data, native_eval=False, **kw), verbose=False)[0]
    for k in ("val/volume_dice", "val/volume_hd95", "val/volume_dice_1", "val/volume_hd95_3"):
        assert base[k] == pytest.approx(native[k], abs=1e-6), k
    probs = torch.zeros(2, 2, 8, 8)
    probs[:, 1, 2:6, 1:3] = 1.0
    batch = {"mask": torch.zeros(2, 8, 8, dtype=torch.long), "volume": ["v", "v"], "slice": torch.tensor([1, 0]),
             "spacing": torch.tensor([[8.0, 1.5, 1.5]] * 2), "content": torch.tensor([[2, 0, 4, 8]] * 2),
             "orig_size": torch.tensor([[16, 8]] * 2), "pad": torch.tensor([False, True])}
    got = slice_predictions(batch, probs)
    assert got["volumes"] == ["v"] and got["slices"] == [1]  # the filler sample is left out
    assert got["preds"][0].shape == (4, 8) and int(got["preds"][0].sum()) == 8  # rows 2..5: all of the block
    np.testing.assert_allclose(got["spacings"][0].numpy(), [8.0, 1.5 * 16 / 4, 1.5 * 8 / 8])


def test_fit_one_epoch_on_scribble_volumes(data):
    from lightning_weakseg.regimes.scribbles import ScribbleSegModule

    dm = dm_for(data, scribble_dir="scribbles", train_labels=["scribble"], val_fraction=0.34, augment="light")
    model = ScribbleSegModule(encoder="resnet18", in_channels=1, num_classes=4, scribble_terms=["pce", "tv"])
    t = trainer(max_epochs=1, limit_train_batches=2, num_sanity_val_steps=0)
    t.fit(model, dm)
    m = t.callback_metrics
    assert torch.isfinite(m["train/loss"]) and 0 <= float(m["val/volume_dice"]) <= 1
    assert "val/volume_hd95_3" in m


def test_two_process_ddp_validation_equals_one_process(tmp_path, data):
    """Every volume is in the validation split; the DDP shards deal its slices out one by one, so each volume is
    split over both ranks (with a filler sample where the count is odd). The gathered, assembled scores equal the
    one-process scores exactly, on both ranks; prediction writes each volume once, identical to one process."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    runs = {}
    for n in (1, 2):
        out = tmp_path / f"d{n}"
        proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "volumes_ddp_check.py"), "--root", str(data),
                               "--out", str(out), "--devices", str(n)], cwd=ROOT, env=env, capture_output=True,
                              text=True, timeout=400)
        assert proc.returncode == 0, proc.stderr[-4000:]
        runs[n] = out
    one = json.loads((runs[1] / "metrics_rank0.json").read_text())
    ranks = [json.loads((runs[2] / f"metrics_rank{r}.json").read_text()) for r in (0, 1)]
    assert set(one) >= {"val/volume_dice", "val/volume_hd95", "val/volume_dice_3", "val/volume_hd95_3"}
    assert ranks[0] == ranks[1]  # the same value logged on every rank
    for k, v in one.items():
        assert ranks[0][k] == pytest.approx(v, abs=1e-6), k
    assert sum(d for _, _, d in VOLUMES.values()) % 2 == 1  # an odd count: one rank's shard ends with a filler
    written = [json.loads((runs[2] / f"written_rank{r}.json").read_text()) for r in (0, 1)]
    assert all(written) and sorted(written[0] + written[1]) == sorted(f"{n}.nii.gz" for n in VOLUMES)
    for name in VOLUMES:
        np.testing.assert_array_equal(load(runs[2] / "masks" / f"{name}.nii.gz"),
                                      load(runs[1] / "masks" / f"{name}.nii.gz"))


def test_ddp_shards_split_volumes_for_scores_and_keep_them_whole_for_prediction(data):
    ds = VolumeDataset(data, mask_dir="labels", num_classes=4, in_channels=1)
    n = len(ds)
    padded = [list(PaddedEvalSampler(ds, world=2, rank=r)) for r in (0, 1)]
    assert sorted(i for s in padded for i in s if i < n) == list(range(n))
    whole = [list(WholeVolumeSampler(ds, world=2, rank=r)) for r in (0, 1)]
    assert len(whole[0]) == len(whole[1])
    real = [[i for i in s if i < n] for s in whole]
    assert sorted(real[0] + real[1]) == list(range(n))
    assert not {ds.volume_of(i) for i in real[0]} & {ds.volume_of(i) for i in real[1]}
    flagged = PadFlagged(ds)
    assert all(flagged[i].get("pad") for s in whole for i in s if i >= n)


# ---------------------------------------------------------------------------------------------- volumes out
def test_predicted_volume_round_trips_with_the_inputs_affine_and_grid(tmp_path):
    """Anisotropic voxels (1.5 × 1.5 × 8 mm) and an oblique affine: the written volume has the input's file name,
    shape, affine and voxel sizes, and holds, slice by slice, the prediction mapped back to the slice's size."""
    src = write_volumes(tmp_path / "in", {"case_a": (40, 36, 5), "case_b": (30, 44, 3)}, seed=4)
    gz = src / "images" / "case_b.nii.gz"  # an uncompressed input too
    nib.save(nib.load(str(gz)), str(src / "images" / "case_b.nii"))
    gz.unlink()
    model = rule_model()
    dm = dm_for(src, predict_dir=str(src / "images"), group_regex=None)
    writer = MaskWriter(tmp_path / "out")
    preds = trainer(callbacks=[writer]).predict(model, dm)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["case_a.nii.gz", "case_b.nii"]
    labels = {}
    for batch in preds:
        for name, k, lab in zip(batch["volume"], batch["slice"].tolist(), batch["labels"]):
            labels.setdefault(name, {})[k] = lab.numpy()
    for name, ext in (("case_a", ".nii.gz"), ("case_b", ".nii")):
        src_img = nib.load(str(src / "images" / f"{name}{ext}"))
        out_img = nib.load(str(tmp_path / "out" / f"{name}{ext}"))
        out = np.asanyarray(out_img.dataobj)
        assert out.shape == src_img.shape and out.dtype == np.uint8
        np.testing.assert_allclose(out_img.affine, src_img.affine, atol=1e-6)
        np.testing.assert_allclose(out_img.affine, oblique_affine(), atol=1e-5)
        np.testing.assert_allclose(out_img.header.get_zooms(), SPACING, atol=1e-6)
        for k, lab in labels[name].items():
            np.testing.assert_array_equal(out[..., k], lab)  # slice k back in place, at the slice's size
        # the slow reference: base view through the rule, letterbox crop resized with OpenCV
        ds = VolumeDataset(src, image_dir="images", mask_dir=None, num_classes=4, in_channels=1, image_size=32,
                           labels=())
        for i in ds.raw_indices_of(name):
            s = ds[i]
            with torch.no_grad():
                p = model(s["image"][None])["probs"][0].numpy()
            top, left, h, w = s["content"].tolist()
            h0, w0 = s["orig_size"].tolist()
            ref = np.stack([cv2.resize(np.ascontiguousarray(p[c, top:top + h, left:left + w]), (w0, h0),
                                       interpolation=cv2.INTER_LINEAR) for c in range(4)]).argmax(0)
            assert (out[..., s["slice"]] == ref).mean() > 0.995
    # at the slices' own size (predict_scale="native") the per-voxel rule gives exactly the rule on the volume
    native = tmp_path / "native"
    trainer(callbacks=[MaskWriter(native)]).predict(rule_model(predict_scale="native"), dm, return_predictions=False)
    vol = normalise_volume(load(src / "images" / "case_a.nii.gz"))
    np.testing.assert_array_equal(load(native / "case_a.nii.gz"), np.abs(vol[..., None] - np.arange(4) / 3).argmin(-1))


def test_incomplete_volume_is_not_written(tmp_path, data):
    dm = dm_for(data, predict_dir=str(data / "images"))
    with pytest.warns(UserWarning, match=r"1 volume\(s\) incomplete.*patient001_frame12 \(1 of 4 slices\)"):
        trainer(callbacks=[MaskWriter(tmp_path / "out")], limit_predict_batches=2).predict(
            rule_model(), dm, return_predictions=False)  # 6 slices: the first volume (5) and one of the second
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["patient001_frame01.nii.gz"]
