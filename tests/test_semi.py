"""Semi-supervised regimes (mean teacher, cross pseudo supervision) and unlabelled samples: the "none" label, the EMA
against hand-computed steps, gradients to the student only, per-sample isolation of the terms, composition with
scribbles, exact resume of the teacher and the ramp-up, and 1 vs 2 DDP processes (a subprocess,
``scripts/ddp_semi_check.py``)."""
from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from lightning_weakseg import WeakSegModule
from lightning_weakseg.data import WeakSegDataModule
from lightning_weakseg.data.batch import collate
from lightning_weakseg.data.datamodule import assign_labels
from lightning_weakseg.regimes import (CPSSegModule, CoTeachingSegModule, CrossPseudoSupervisionMixin,
                                       MeanTeacherMixin, MeanTeacherSegModule, ScribbleMixin)
from lightning_weakseg.regimes.mean_teacher import ema_alpha, ema_update, sigmoid_rampup, strong_view

ROOT = Path(__file__).resolve().parents[1]
SMALL = dict(encoder="tu-resnet18", norm="group", in_channels=1, num_classes=4,
             model_kwargs={"encoder_depth": 3, "decoder_channels": [16, 8, 4]})


class ScribbleMeanTeacher(ScribbleMixin, MeanTeacherMixin, WeakSegModule):
    pass


class CPSScribble(CrossPseudoSupervisionMixin, ScribbleMixin, WeakSegModule):  # the other order of the bases
    pass


def semi_dm(fractions=None, n=12, **kw) -> WeakSegDataModule:
    args = dict(synthetic_kind="organ", n_samples=n, image_size=32, batch_size=4, augment="none", shuffle=False,
                val_fraction=0.2, seed=0, label_fractions=fractions or {"mask": 0.5, "none": 0.5})
    return WeakSegDataModule(**{**args, **kw})


def trainer(**kw) -> L.Trainer:
    args = dict(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0, deterministic=True)
    return L.Trainer(**{**args, **kw})


@pytest.fixture(scope="module")
def mixed_batch():
    dm = semi_dm(n=10)
    dm.setup("fit")
    return collate([dm.train_dataset[i] for i in range(len(dm.train_dataset))])


# ---------------------------------------------------------------------------------------------------- the "none" label
def test_none_label_gives_samples_without_any_label(mixed_batch):
    plan = assign_labels(10, {"mask": 0.3, "none": 0.7}, seed=0)
    assert sum(p == () for p in plan) == 7 and sum(p == ("mask",) for p in plan) == 3
    with pytest.raises(ValueError, match="none"):
        assign_labels(4, {"mask+none": 1.0}, seed=0)
    b = mixed_batch
    has = b["has_mask"]
    assert 0 < int(has.sum()) < has.numel()
    assert (b["mask"][~has] == 255).all()  # collate fills an absent mask with "unknown"
    assert not any(k.startswith("has_") and k != "has_mask" for k in b)
    # the base module: zero supervised loss for the unlabelled samples, finite, no gradient to them
    model = WeakSegModule(**SMALL, dice_weight=1.0)
    x = b["image"].clone().requires_grad_(True)
    out = model(x)
    terms = model.loss_terms(b, out)
    total = sum(terms.values())
    assert torch.isfinite(total)
    total.backward()
    assert torch.isfinite(x.grad).all()
    none_only = {"image": b["image"][~has]}
    assert model.loss_terms(none_only, model(none_only["image"])) == {}


def test_label_by_group_labels_whole_patients(tmp_path):
    sys.path.insert(0, str(ROOT / "tests"))
    from test_volumes import write_volumes

    vols = {f"patient{p:03d}_frame{f:02d}": (24, 24, 3) for p in range(1, 7) for f in (1, 2)}
    root = write_volumes(tmp_path, vols)
    dm = WeakSegDataModule(source="volumes", root=str(root), image_dir="images", mask_dir="labels", num_classes=4,
                           in_channels=1, image_size=32, batch_size=4, augment="none", group_regex=r"^(patient\d+)",
                           val_fraction=0.34, label_fractions={"mask": 0.25, "none": 0.75}, label_by_group=True)
    dm.setup("fit")
    ds, full = dm.train_dataset, dm.full_dataset
    by_patient: dict[str, set] = {}
    for i in ds.indices:
        by_patient.setdefault(full.volume_of(i)[:10], set()).add(ds.keys_for(i))
    assert len(by_patient) == 4 and all(len(v) == 1 for v in by_patient.values())  # one label type per patient
    assert sorted(next(iter(v)) for v in by_patient.values()) == [(), (), (), ("mask",)]
    s = ds[[j for j, i in enumerate(ds.indices) if not ds.keys_for(i)][0]]
    assert "mask" not in s and s["image"].shape == (1, 32, 32) and "volume" in s


# ---------------------------------------------------------------------------------------------------- the EMA
def test_ema_alpha_and_update_by_hand():
    assert ema_alpha(0, 0.99) == 0.0 and ema_alpha(1, 0.99) == 0.5 and ema_alpha(2, 0.99) == pytest.approx(2 / 3)
    assert ema_alpha(1000, 0.99) == 0.99
    teacher, student = torch.nn.Linear(2, 1), torch.nn.Linear(2, 1)
    with torch.no_grad():
        teacher.weight.copy_(torch.tensor([[1.0, 2.0]]))
        teacher.bias.fill_(4.0)
        student.weight.copy_(torch.tensor([[3.0, -2.0]]))
        student.bias.fill_(0.0)
    ema_update(teacher, student, 0.75)  # 0.75 · θ' + 0.25 · θ
    assert torch.equal(teacher.weight, torch.tensor([[1.5, 1.0]])) and torch.equal(teacher.bias, torch.tensor([3.0]))
    assert sigmoid_rampup(0, 10) == pytest.approx(math.exp(-5)) and sigmoid_rampup(5, 10) == pytest.approx(
        math.exp(-1.25)) and sigmoid_rampup(20, 10) == 1.0


class Recorder(Callback):
    """Before each step the teacher, after each optimizer step the student (callbacks run before the module's
    ``on_train_batch_end``, where the teacher is updated)."""

    def __init__(self):
        self.teacher_before, self.student_after = [], []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.teacher_before.append({k: v.clone() for k, v in pl_module.teacher_model.state_dict().items()})

    def on_train_batch_end(self, trainer, pl_module, *args):
        self.student_after.append({k: v.clone() for k, v in pl_module.model.state_dict().items()})


def test_teacher_is_the_ema_of_the_student_step_by_step():
    L.seed_everything(0, verbose=False)
    model = MeanTeacherSegModule(**SMALL, ema_decay=0.6, consistency_rampup_steps=2)
    dm = semi_dm()
    teacher0 = {k: v.clone() for k, v in model.teacher_model.state_dict().items()}
    assert all(torch.equal(teacher0[k], v) for k, v in model.model.state_dict().items())  # a copy at start
    rec = Recorder()
    trainer(max_steps=3, callbacks=[rec]).fit(model, dm)
    final = model.teacher_model.state_dict()
    befores = rec.teacher_before[1:] + [final]
    for step, (prev, student, after) in enumerate(zip(rec.teacher_before, rec.student_after, befores), start=1):
        a = {1: 0.5, 2: 0.6, 3: 0.6}[step]  # min(1 - 1/(step + 1), 0.6)
        for k, v in after.items():
            if v.is_floating_point():
                torch.testing.assert_close(v, a * prev[k] + (1 - a) * student[k], rtol=0, atol=1e-6)
    assert all(not p.requires_grad for p in model.teacher_model.parameters())
    assert not model.teacher_model.training


# ---------------------------------------------------------------------------------------------------- gradients, terms
@pytest.mark.parametrize("cls", [MeanTeacherSegModule, CPSSegModule], ids=["mean_teacher", "cps"])
def test_unlabelled_samples_get_only_the_semi_term(mixed_batch, cls):
    torch.manual_seed(0)
    model = cls(**SMALL, consistency_rampup_steps=0)
    model.train()
    b = mixed_batch
    has = b["has_mask"]
    semi = "semi/consistency" if cls is MeanTeacherSegModule else "semi/cps"
    x = model.training_view(b).detach().requires_grad_(True)
    out = model(x)
    terms = model.loss_terms(b, out)
    assert semi in terms and all(torch.isfinite(v) for v in terms.values())
    for name, value in terms.items():
        (g,) = torch.autograd.grad(value, x, retain_graph=True, allow_unused=True)
        per_sample = torch.zeros(x.shape[0]) if g is None else g.flatten(1).abs().sum(1)
        if name == semi:
            assert (per_sample[~has] > 0).all(), name
        else:  # supervised terms (and the peer's copies) never touch an unlabelled sample
            assert (per_sample[~has] == 0).all() and (per_sample[has] > 0).all(), name
    # a batch of unlabelled images: the semi-supervised term alone
    unl = {"image": b["image"][~has], "index": b["index"][~has]}
    assert set(model.loss_terms(unl, model(model.training_view(unl)))) == {semi}


def test_gradients_reach_the_student_only(mixed_batch):
    torch.manual_seed(0)
    model = MeanTeacherSegModule(**SMALL, consistency_rampup_steps=0)
    model.train()
    out = model(model.training_view(mixed_batch))
    terms = model.loss_terms(mixed_batch, out)
    terms["semi/consistency"].backward()
    assert all(p.grad is None for p in model.teacher_model.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.model.parameters())
    # the value by hand: MSE of the softmaxes, student on the strong view, teacher on the batch's image
    with torch.no_grad():
        student = model.model(model.training_view(mixed_batch)).softmax(1)
        teacher = model.teacher_model(mixed_batch["image"]).softmax(1)
    assert float(terms["semi/consistency"].detach()) == pytest.approx(float(((student - teacher) ** 2).mean()), rel=1e-5)


def test_strong_view_keeps_geometry_and_is_per_sample():
    x = torch.rand(4, 1, 16, 16)
    a = strong_view(x, generator=torch.Generator().manual_seed(0))
    assert a.shape == x.shape and 0 <= float(a.min()) and float(a.max()) <= 1 and not torch.equal(a, x)
    model = MeanTeacherSegModule(**SMALL)
    batch = {"image": x, "index": torch.tensor([5, 6, 7, 8])}
    sub = {"image": x[2:], "index": torch.tensor([7, 8])}
    # a sample's view does not depend on its batch (or DDP rank)
    assert torch.equal(model.training_view(batch)[2:], model.training_view(sub))


def test_teacher_predicts_and_is_saved(tmp_path):
    model = MeanTeacherSegModule(**SMALL)
    with torch.no_grad():
        for p in model.teacher_model.parameters():
            p.add_(0.1)
    model.eval()
    x = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x)["logits"], model.teacher_model(x))
        assert not torch.allclose(model(x)["logits"], model.model(x))
    assert model.inference_network() is model.teacher_model
    student = MeanTeacherSegModule(**SMALL, teacher_inference=False).eval()
    assert student.inference_network() is student.model
    assert any(k.startswith("teacher_model.") for k in model.state_dict())
    # save_pretrained writes the teacher as a plain SMP model
    import segmentation_models_pytorch as smp

    plain = MeanTeacherSegModule(**{**SMALL, "norm": "batch"}).eval()
    with torch.no_grad():
        for p in plain.teacher_model.parameters():
            p.add_(0.1)
    plain.save_pretrained(tmp_path / "mt")
    loaded = smp.from_pretrained(str(tmp_path / "mt")).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), plain.teacher_model(x))


# ---------------------------------------------------------------------------------------------------- composition
@pytest.mark.parametrize("cls", [ScribbleMeanTeacher, CPSScribble], ids=["scribbles_mt", "cps_scribbles"])
def test_scribbles_plus_unlabelled_fit(cls):
    L.seed_everything(0, verbose=False)
    dm = semi_dm({"scribble": 0.3, "none": 0.7})
    model = cls(**SMALL, scribble_terms=("pce",), consistency_rampup_steps=2)
    seen = []

    class Terms(Callback):
        def on_train_batch_end(self, trainer, pl_module, *args):
            seen.append({k for k in trainer.callback_metrics if k.startswith("train/") and k.endswith("_step")})

    trainer(max_epochs=1, callbacks=[Terms()]).fit(model, dm)
    names = set().union(*seen)
    semi = "train/semi/consistency_step" if cls is ScribbleMeanTeacher else "train/semi/cps_step"
    assert semi in names and "train/scribble/pce_step" in names
    if cls is CPSScribble:  # the peer learns from the scribbles too, whatever the order of the bases
        assert "train/peer/scribble/pce_step" in names
    assert "train/seg/ce_step" not in names  # no masks in this mix


def test_coteaching_still_builds_its_peer_the_same_way():
    torch.manual_seed(3)
    a = CoTeachingSegModule(**SMALL)
    torch.manual_seed(3)
    b = CPSSegModule(**SMALL)
    for (ka, va), (kb, vb) in zip(a.peer_model.state_dict().items(), b.peer_model.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)


# ---------------------------------------------------------------------------------------------------- resume
@pytest.mark.parametrize("cls", [MeanTeacherSegModule, CPSSegModule], ids=["mean_teacher", "cps"])
def test_resume_restores_teacher_and_rampup(tmp_path, cls):
    ramp = {}

    class Ramp(Callback):
        def on_train_batch_end(self, trainer, pl_module, *args):
            w = pl_module.consistency_weight() if cls is MeanTeacherSegModule else pl_module.cps_weight()
            ramp[(trainer.global_step, id(pl_module))] = w

    def build(seed):
        L.seed_everything(seed, verbose=False)
        return cls(**SMALL, consistency_rampup_epochs=4), semi_dm()

    model, dm = build(0)
    ckpt = ModelCheckpoint(dirpath=str(tmp_path), filename="{epoch}", save_top_k=-1, every_n_epochs=1)
    trainer(max_epochs=2, callbacks=[ckpt, Ramp()], enable_checkpointing=True, default_root_dir=str(tmp_path)).fit(
        model, dm)
    want = {k: v.clone() for k, v in model.state_dict().items()}
    ramp_a = {s: w for (s, m), w in ramp.items() if m == id(model)}
    resumed, dm2 = build(1234)  # other initial weights: the teacher must come from the checkpoint
    trainer(max_epochs=2, callbacks=[Ramp()], default_root_dir=str(tmp_path)).fit(
        resumed, dm2, ckpt_path=str(tmp_path / "epoch=0.ckpt"))
    ramp_b = {s: w for (s, m), w in ramp.items() if m == id(resumed)}
    got = resumed.state_dict()
    assert want.keys() == got.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=0, msg=k)
    assert ramp_b and all(ramp_b[s] == ramp_a[s] for s in ramp_b) and 0 < min(ramp_b.values()) < 1


# ---------------------------------------------------------------------------------------------------- DDP
def test_one_and_two_ddp_processes_give_the_same_teacher(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "ddp_semi_check.py"), "--out", str(tmp_path)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"ddp_semi_check failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    for case, prefix in (("mean_teacher", "teacher_model."), ("mean_teacher_two_stream", "teacher_model."),
                         ("cps", "peer_model.")):
        one = torch.load(tmp_path / case / "d1" / "weights_rank0.pt")
        ranks = [torch.load(tmp_path / case / "d2" / f"weights_rank{r}.pt") for r in (0, 1)]
        assert any(k.startswith(prefix) for k in one)
        for k, v in one.items():
            assert torch.equal(ranks[0][k], ranks[1][k]), (case, k)  # identical on every rank
            if v.is_floating_point():
                torch.testing.assert_close(ranks[0][k], v, rtol=0, atol=1e-9, msg=f"{case}: {k}")
        records = torch.load(tmp_path / case / "d1" / "records_rank0.pt", weights_only=False)
        assert records["optimizer_steps"] == 4
        if case == "mean_teacher_two_stream":  # the ranks' step-k batches together are the one-process batch
            steps = [torch.load(tmp_path / case / v / f"records_rank{r}.pt", weights_only=False)["records"]
                     for v, r in (("d1", 0), ("d2", 0), ("d2", 1))]
            assert len(steps[0]) == 4
            for a, b, c in zip(*steps):
                assert sorted(a["index"].tolist()) == sorted(b["index"].tolist() + c["index"].tolist())
        if case.startswith("mean_teacher"):  # the teacher moved away from its initial copy and differs from the student
            assert any(not torch.equal(one[k], one["model." + k[len(prefix):]]) for k in one if k.startswith(prefix))


# ----------------------------------------------------------------------------- the perfect-teacher bound (benchmark)
def test_oracle_teacher_targets_the_true_masks(bench_oracle):
    """benchmarks/oracle.py's OracleTeacherSegModule: semi/consistency is the mean over samples of the mean squared
    difference between the student's softmax and the one-hot true mask (``mask`` where labelled, else
    ``noisy_mask``), computed here pixel by pixel; ignored pixels keep the EMA teacher's softmax."""
    oracle = bench_oracle
    torch.manual_seed(0)
    b, k, h, w = 3, 3, 4, 5
    module = oracle.OracleTeacherSegModule(in_channels=1, num_classes=k, strong_brightness=0, strong_contrast=0,
                                           strong_noise=0, consistency_rampup_steps=0,
                                           model_kwargs={"encoder_depth": 3, "decoder_channels": (16, 8, 4)})
    module.train()
    truth = torch.randint(0, k, (b, h, w))
    mask = torch.full((b, h, w), 255)
    mask[0] = truth[0]
    noisy = truth.clone()
    noisy[0] = 0                                   # a labelled sample: its noisy_mask is not read
    noisy[2, 1, :] = 255                           # unknown pixels of an unlabelled sample
    batch = {"image": torch.rand(b, 1, 32, 32)[:, :, :h, :w].contiguous(), "mask": mask, "noisy_mask": noisy,
             "has_mask": torch.tensor([True, False, False]), "has_noisy_mask": torch.tensor([False, True, True])}
    logits = torch.randn(b, k, h, w)
    with torch.no_grad():
        teacher = module.teacher_model(batch["image"]).softmax(1)
    terms = module.loss_terms(batch, {"logits": logits, "probs": logits.softmax(1)})
    student = logits.softmax(1)
    ref = []
    for i in range(b):
        total = 0.0
        for y in range(h):
            for x in range(w):
                label = int(mask[i, y, x]) if i == 0 else int(noisy[i, y, x])
                for c in range(k):
                    t = teacher[i, c, y, x] if label == 255 else float(label == c)
                    total += float((student[i, c, y, x] - t) ** 2)
        ref.append(total / (k * h * w))
    assert math.isclose(float(terms["semi/consistency"]), sum(ref) / b, rel_tol=1e-5)
