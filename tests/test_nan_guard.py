"""NaN guard inside a real fit (tests/test_module.py checks ``combine_terms`` alone): ``on_nonfinite="raise"`` stops
training with a message naming the term, the global step and the batch's sample ids; ``"skip"`` leaves the weights
and the optimizer untouched by that batch and trains on the others."""
from __future__ import annotations

import lightning as L
import pytest
import torch

from lightning_weakseg import NonFiniteLossError, WeakSegModule
from lightning_weakseg.data import WeakSegDataModule

SMALL = dict(encoder="tu-resnet18", norm="group", in_channels=1, num_classes=4,
             model_kwargs={"encoder_depth": 3, "decoder_channels": [8, 8, 4]})


class PoisonedModule(WeakSegModule):
    """Adds a term that is NaN for any batch holding the poisoned sample."""

    def __init__(self, poison: str = "", **kwargs):
        super().__init__(**kwargs)
        self.poison = poison

    def loss_terms(self, batch, out):
        terms = super().loss_terms(batch, out)
        bad = self.poison in batch["id"]
        terms["extra/poison"] = out["logits"].mean() * 0 + (float("nan") if bad else 0.0)
        return terms


class Watch(L.Callback):
    def __init__(self):
        self.before, self.after, self.ids = [], [], []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.ids.append(list(batch["id"]))
        self.before.append({k: v.detach().clone() for k, v in pl_module.state_dict().items()})

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.after.append({k: v.detach().clone() for k, v in pl_module.state_dict().items()})


def run(on_nonfinite: str, watch: Watch):
    torch.set_num_threads(1)
    dm = WeakSegDataModule(synthetic_kind="organ", n_samples=20, image_size=32, batch_size=4, augment="none",
                           shuffle=False, val_fraction=0.2)
    dm.setup("fit")
    poison = dm.train_dataset.sample_id(dm.train_dataset.raw_index(9))  # in the third batch (samples 8..11)
    torch.manual_seed(0)
    model = PoisonedModule(poison=poison, on_nonfinite=on_nonfinite, scheduler="none", **SMALL)
    tr = L.Trainer(max_epochs=1, accelerator="cpu", logger=False, limit_val_batches=0, enable_progress_bar=False,
                   enable_model_summary=False, enable_checkpointing=False, callbacks=[watch])
    return tr, model, dm, poison


@pytest.fixture(autouse=True)
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_raise_names_term_step_and_samples():
    watch = Watch()
    tr, model, dm, poison = run("raise", watch)
    with pytest.raises(NonFiniteLossError) as info:
        tr.fit(model, dm)
    msg = str(info.value)
    assert "'extra/poison'" in msg and "global step 2 " in msg
    assert all(i in msg for i in watch.ids[2]) and poison in watch.ids[2]
    assert len(watch.after) == 2  # it stopped in the third batch


def test_skip_leaves_weights_and_optimizer_untouched_by_the_batch():
    watch = Watch()
    tr, model, dm, poison = run("skip", watch)
    tr.fit(model, dm)
    assert len(watch.ids) == 4 and poison in watch.ids[2]
    same = [all(torch.equal(a[k], b[k]) for k in a) for a, b in zip(watch.before, watch.after)]
    assert same == [False, False, True, False]  # only the poisoned batch changed nothing
    assert tr.global_step == 4  # Lightning still counts the step (the closure ran and returned None) ...
    state = tr.optimizers[0].state_dict()["state"]
    assert {float(s["step"]) for s in state.values()} == {3.0}  # ... but AdamW saw no gradient: 3 real updates
    assert all(torch.isfinite(v).all() for v in model.state_dict().values() if v.is_floating_point())
