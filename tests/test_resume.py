"""Resume exactness: train N steps, checkpoint, resume in fresh objects with ``ckpt_path=``, train M more — the
final weights are bit-identical to an uninterrupted N+M run, for every regime module with its callback.

One uninterrupted run per regime (3 epochs x 3 steps) writes an epoch-boundary checkpoint with ModelCheckpoint
(after epoch 1) and a mid-epoch one with ``trainer.save_checkpoint`` (after step 4). A resumed run builds a new
model (from another seed, so the weights must come from the checkpoint), new callbacks and a new data module.
CPU, ``deterministic=True``, GroupNorm, no shuffle, no augmentation (albumentations' RNG is not part of a
checkpoint); shuffled orders are checked by ``test_shuffled_resume``.
"""
from __future__ import annotations

import copy
import importlib
from dataclasses import dataclass, field
from typing import Callable

import lightning as L
import numpy as np
import pytest
import torch
from lightning.fabric.utilities.types import _Stateful
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from lightning_weakseg.callbacks import ForgetRateSchedule, LogBarrierSchedule, PseudoLabelRefresh
from lightning_weakseg.data import WeakSegDataModule

SMALL = dict(encoder="tu-resnet18", norm="group", lr=3e-3,
             model_kwargs={"encoder_depth": 3, "decoder_channels": [16, 8, 4]})
EPOCHS, STEPS_PER_EPOCH, MID_STEP = 3, 3, 4


@dataclass
class Regime:
    name: str
    module: str                                   # "package.module:ClassName"
    kind: str                                     # synthetic kind: organ (4 classes, gray) or nuclei (2, RGB)
    labels: list[str]
    kwargs: dict = field(default_factory=dict)
    callbacks: Callable[[str], list] = lambda cache_dir: []
    module_state: tuple[str, ...] = ()            # module attributes a callback sets (compared at the end)
    data: dict = field(default_factory=dict)      # WeakSegDataModule overrides (e.g. label_fractions)


# one line per regime; a new regime (scribbles, mixed, tags) is one more line
REGIMES = [
    Regime("plain", "lightning_weakseg:WeakSegModule", "organ", ["mask"], {"dice_weight": 1.0}),
    Regime("boxes", "lightning_weakseg.regimes:BoxSegModule", "organ", ["boxes"], {},
           lambda d: [LogBarrierSchedule(t0=5.0, mu=1.5)], ("barrier_t",)),
    Regime("points", "lightning_weakseg.regimes:PointSegModule", "nuclei", ["points"], {"point_confidence": 0.55},
           lambda d: [PseudoLabelRefresh(every_n_epochs=1, cache_dir=d)]),
    Regime("coteaching", "lightning_weakseg.regimes:CoTeachingSegModule", "organ", ["noisy_mask"],
           {"forget_rate": 0.5, "num_gradual": 2}, lambda d: [ForgetRateSchedule()], ("keep_ratio",)),
    Regime("robust", "lightning_weakseg.regimes:RobustSegModule", "organ", ["noisy_mask"], {"robust_loss": "gce"}),
    Regime("scribbles", "lightning_weakseg.regimes:ScribbleSegModule", "organ", ["scribble"],
           {"scribble_self_training": True, "scribble_confidence": 0.3},
           lambda d: [PseudoLabelRefresh(every_n_epochs=1, cache_dir=d)]),
    Regime("mixed", "lightning_weakseg.regimes:MixedSegModule", "organ", ["mask"], {"scribble_terms": ("pce",)},
           lambda d: [LogBarrierSchedule(t0=5.0, mu=1.5), PseudoLabelRefresh(every_n_epochs=1, cache_dir=d)],
           ("barrier_t",), {"label_fractions": {"mask": 0.25, "boxes": 0.25, "points": 0.25, "scribble": 0.25}}),
    Regime("tags", "lightning_weakseg.regimes:TagSegModule", "organ", ["tags"], {"tag_fg_threshold": 0.3},
           lambda d: [PseudoLabelRefresh(every_n_epochs=1, start_epoch=0, cache_dir=d)]),
]


def build(regime: Regime, seed: int, shuffle: bool = False):
    mod, _, name = regime.module.partition(":")
    cls = getattr(importlib.import_module(mod), name)
    in_ch, n_cls = (3, 2) if regime.kind == "nuclei" else (1, 4)
    L.seed_everything(seed, verbose=False)
    model = cls(in_channels=in_ch, num_classes=n_cls, **SMALL, **regime.kwargs)
    dm = WeakSegDataModule(synthetic_kind=regime.kind, n_samples=15, image_size=32, train_labels=regime.labels,
                           batch_size=4, augment="none", shuffle=shuffle, val_fraction=0.2, seed=0, **regime.data)
    return model, dm


def trainer(root, callbacks) -> L.Trainer:
    return L.Trainer(max_epochs=EPOCHS, accelerator="cpu", logger=False, limit_val_batches=0, deterministic=True,
                     enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks,
                     default_root_dir=str(root), enable_checkpointing=any(isinstance(c, ModelCheckpoint)
                                                                          for c in callbacks))


class SaveAtStep(Callback):
    def __init__(self, step: int, path: str):
        self.step, self.path = step, path

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step == self.step:
            trainer.save_checkpoint(self.path)


class ProbeRestored(Callback):
    """Put first: at fit start (after the checkpoint was restored, before the other callbacks' hooks) copy their
    state, and record the samples of every step."""

    def __init__(self, watched):
        self.watched, self.restored, self.seen = watched, None, []

    def on_fit_start(self, trainer, pl_module):
        self.restored = {type(c).__name__: copy.deepcopy(c.state_dict()) for c in self.watched}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.seen.append((trainer.global_step, batch["index"].tolist()))


def snapshot(model, callbacks, dm) -> dict:
    return {"weights": {k: v.detach().clone() for k, v in model.state_dict().items()},
            "callbacks": {type(c).__name__: copy.deepcopy(c.state_dict()) for c in callbacks},
            "pseudo": dict(dm.train_dataset.pseudo_labels),
            "lr": model.trainer.optimizers[0].param_groups[0]["lr"]}


def assert_same(x, y, where: str):
    if torch.is_tensor(x) or torch.is_tensor(y):
        assert torch.is_tensor(x) and torch.is_tensor(y) and torch.equal(x, y), where
    elif isinstance(x, dict):
        assert x.keys() == y.keys(), f"{where}: {sorted(x)} vs {sorted(y)}"
        for k in x:
            assert_same(x[k], y[k], f"{where}.{k}")
    elif isinstance(x, np.ndarray):
        assert np.array_equal(x, y), where
    else:
        assert x == y, f"{where}: {x!r} vs {y!r}"




@pytest.fixture(scope="module", params=REGIMES, ids=lambda r: r.name)
def uninterrupted(request, tmp_path_factory):
    regime = request.param
    root = tmp_path_factory.mktemp(f"resume_{regime.name}")
    model, dm = build(regime, seed=0)
    cbs = regime.callbacks(str(root / "cache_a"))
    ckpt = ModelCheckpoint(dirpath=str(root), filename="{epoch}", save_top_k=-1, every_n_epochs=1)
    probe = ProbeRestored(cbs)
    trainer(root, [probe, *cbs, ckpt, SaveAtStep(MID_STEP, str(root / "mid.ckpt"))]).fit(model, dm)
    assert model.global_step == EPOCHS * STEPS_PER_EPOCH
    return regime, root, snapshot(model, cbs, dm), {a: getattr(model, a) for a in regime.module_state}, probe.seen


def resume(regime: Regime, root, ckpt_path: str):
    model, dm = build(regime, seed=1234)  # other initial weights: everything must come from the checkpoint
    cbs = regime.callbacks(str(root / "cache_b"))
    probe = ProbeRestored(cbs)
    tr = trainer(root, [probe, *cbs])
    tr.fit(model, dm, ckpt_path=ckpt_path)
    return model, cbs, dm, probe


def test_resume_at_epoch_boundary_is_exact(uninterrupted):
    regime, root, ref, module_state, seen = uninterrupted
    ckpt_path = str(root / "epoch=1.ckpt")
    saved = torch.load(ckpt_path, weights_only=False)
    assert saved["global_step"] == 2 * STEPS_PER_EPOCH and saved["optimizer_states"] and saved["lr_schedulers"]
    model, cbs, dm, probe = resume(regime, root, ckpt_path)
    assert model.global_step == EPOCHS * STEPS_PER_EPOCH
    assert probe.seen == seen[2 * STEPS_PER_EPOCH:]  # the M resumed steps saw the same batches
    # every callback's state came back from the checkpoint as it was saved ...
    for cb in cbs:
        key = cb.state_key
        assert key in saved["callbacks"], f"{key} is not in the checkpoint"
        assert_same(probe.restored[type(cb).__name__], saved["callbacks"][key], f"{regime.name} restored {key}")
    # ... and the resumed run ends where the uninterrupted one ended: weights, callbacks, labels, lr, module state
    got = snapshot(model, cbs, dm)
    bad = [k for k, v in ref["weights"].items() if not torch.equal(v, got["weights"][k])]
    assert not bad, f"{regime.name}: {len(bad)} tensors differ after resume, e.g. {bad[:3]}"
    assert_same(ref["callbacks"], got["callbacks"], f"{regime.name} callbacks")
    assert_same(ref["pseudo"], got["pseudo"], f"{regime.name} pseudo labels")
    assert ref["lr"] == got["lr"]
    for attr, value in module_state.items():
        assert getattr(model, attr) == value, attr


def _checkpoint_content(regime: Regime, saved: dict) -> None:
    """What a checkpoint holds per callback (the claims of docs/reliability.md)."""
    cbs = {k.split("{")[0]: v for k, v in saved["callbacks"].items()}
    if regime.name == "boxes":
        assert cbs["LogBarrierSchedule"]["t"] == 5.0 * 1.5 and cbs["LogBarrierSchedule"]["mu"] == 1.5
    if regime.name == "coteaching":
        assert cbs["ForgetRateSchedule"]["keep_ratio"] == 0.75 and cbs["ForgetRateSchedule"]["epoch"] == 1
    if regime.name == "points":
        st = cbs["PseudoLabelRefresh"]
        assert st["round"] == 2 and st["labels"].dtype == torch.uint8 and st["labels"].shape == (len(st["indices"]),
                                                                                                  32, 32)
        assert st["fingerprint"]["module"] == "PointSegModule" and st["fingerprint"]["n_samples"] == 12


def test_checkpoint_holds_the_schedule_state(uninterrupted):
    regime, root, *_ = uninterrupted
    _checkpoint_content(regime, torch.load(str(root / "epoch=1.ckpt"), weights_only=False))


def test_train_loader_is_resumable():
    """Lightning treats a loader with state_dict/load_state_dict as resumable (no "not resumable" warning)."""
    dm = build(REGIMES[0], 0)[1]
    dm.setup("fit")
    assert isinstance(dm.train_dataloader(), _Stateful)


def test_resume_mid_epoch_is_exact(uninterrupted):
    regime, root, ref, _, seen = uninterrupted
    model, cbs, dm, probe = resume(regime, root, str(root / "mid.ckpt"))
    assert probe.seen == seen[MID_STEP:], f"{regime.name}: resumed mid-epoch on other batches"
    got = snapshot(model, cbs, dm)
    assert all(torch.equal(v, got["weights"][k]) for k, v in ref["weights"].items())
    assert_same(ref["callbacks"], got["callbacks"], f"{regime.name} callbacks")


@pytest.mark.parametrize("where", ["epoch_boundary", "mid_epoch"])
def test_shuffled_resume(tmp_path, where):
    """shuffle=True: epoch e's order is drawn from (seed, e) only, so a resumed run sees the same orders."""
    regime = REGIMES[0]
    model, dm = build(regime, 0, shuffle=True)
    ckpt = ModelCheckpoint(dirpath=str(tmp_path), filename="{epoch}", save_top_k=-1, every_n_epochs=1)
    probe = ProbeRestored([])
    trainer(tmp_path, [probe, ckpt, SaveAtStep(MID_STEP, str(tmp_path / "mid.ckpt"))]).fit(model, dm)
    orders = [tuple(i for _, b in probe.seen[e * STEPS_PER_EPOCH:(e + 1) * STEPS_PER_EPOCH] for i in b)
              for e in range(EPOCHS)]
    assert len(set(orders)) == EPOCHS, "shuffle=True should give each epoch another order"
    model2, dm2 = build(regime, 99, shuffle=True)
    probe2 = ProbeRestored([])
    path, done = (tmp_path / "epoch=1.ckpt", 2 * STEPS_PER_EPOCH) if where == "epoch_boundary" else \
        (tmp_path / "mid.ckpt", MID_STEP)
    trainer(tmp_path, [probe2]).fit(model2, dm2, ckpt_path=str(path))
    assert probe2.seen == probe.seen[done:], "another sample order after resume"
    assert all(torch.equal(v, model2.state_dict()[k]) for k, v in model.state_dict().items())
