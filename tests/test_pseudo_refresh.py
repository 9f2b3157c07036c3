"""PseudoLabelRefresh: labels reach the data set, rounds follow the schedule, state survives save/resume,
DDP sharding partitions the samples, the cache file is atomic and checksummed."""
from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import torch

from lightning_weakseg import WeakSegModule
from lightning_weakseg.callbacks import PseudoLabelRefresh
from lightning_weakseg.data import WeakSegDataModule


def expected_label(image: torch.Tensor, shift: int) -> torch.Tensor:
    """A deterministic 'pseudo label' that depends on the image and on the round (shift)."""
    lab = (image.mean(0) > 0.25).long()
    return torch.roll(lab, shift, dims=-1)


class ThresholdModule(WeakSegModule):
    def __init__(self, **kw):
        super().__init__(**kw)
        self.calls = 0

    def make_pseudo_labels(self, batch):
        assert not self.training
        self.calls += 1
        return torch.stack([expected_label(im, self.current_epoch) for im in batch["image"]])


def make_dm():
    return WeakSegDataModule(synthetic_kind="nuclei", n_samples=10, image_size=32, batch_size=4,
                             train_labels=["points"], augment="none", val_fraction=0.2)


def trainer(tmp_path, cb, epochs):
    return L.Trainer(max_epochs=epochs, accelerator="cpu", callbacks=[cb], logger=False, limit_val_batches=0, limit_train_batches=1,
                     enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                     default_root_dir=str(tmp_path))


def dataset_expectation(dm, shift):
    view = dm.train_eval_dataloader().dataset
    return {int(s["index"]): expected_label(s["image"], shift).numpy().astype(np.uint8)
            for s in (view[i] for i in range(len(view)))}


class CEOnPseudo(ThresholdModule):
    """Trains on the pseudo key so that the loop has a loss once labels exist."""


def test_refresh_rounds_labels_and_resume(tmp_path):
    torch.manual_seed(0)
    dm = make_dm()
    model = CEOnPseudo(encoder="resnet18", num_classes=2, mask_key="pseudo", lr=1e-3)
    cb = PseudoLabelRefresh(every_n_epochs=2, start_epoch=0, cache_dir=str(tmp_path / "cache"))
    tr = trainer(tmp_path, cb, 3)
    tr.fit(model, dm)
    # rounds at the ends of epochs 0 and 2
    assert cb.round == 2
    want = dataset_expectation(dm, shift=2)
    got = dm.train_dataset.pseudo_labels
    assert sorted(got) == sorted(want) == cb.indices.tolist()
    assert all(np.array_equal(got[k], want[k]) for k in want)
    # the training view carries them as `pseudo`
    batch = next(iter(dm.train_dataloader()))
    assert batch["has_pseudo"].all()
    # cache file: latest round, verified checksum
    payload = PseudoLabelRefresh.load_cache(str(tmp_path / "cache" / "pseudo_round002.pt"))
    assert payload["round"] == 2 and torch.equal(payload["labels"], cb.labels)
    assert not list((tmp_path / "cache").glob(".pseudo_*"))

    ckpt = tmp_path / "last.ckpt"
    tr.save_checkpoint(str(ckpt))
    # resume with a fresh data module and callback that will not refresh again
    dm2 = make_dm()
    cb2 = PseudoLabelRefresh(every_n_epochs=1, start_epoch=100)
    model2 = CEOnPseudo(encoder="resnet18", num_classes=2, mask_key="pseudo", lr=1e-3)
    trainer(tmp_path, cb2, 4).fit(model2, dm2, ckpt_path=str(ckpt))
    assert cb2.round == 2 and model2.calls == 0
    assert torch.equal(cb2.labels, cb.labels) and torch.equal(cb2.indices, cb.indices)
    got2 = dm2.train_dataset.pseudo_labels
    assert all(np.array_equal(got2[k], want[k]) for k in want)


def test_shards_partition_and_gather(tmp_path):
    dm = make_dm()
    dm.setup("fit")
    store = {}

    class Fake(ThresholdModule):
        def all_gather(self, t):
            return torch.stack([t, store[(t.dtype, tuple(t.shape))]])

    model = Fake(encoder="resnet18", num_classes=2)
    seen = {}

    def run(rank, capture):
        cb = PseudoLabelRefresh(batch_size=3)
        orig = Fake.make_pseudo_labels.__get__(model)

        def spy(batch):
            seen.setdefault(rank, []).extend(batch["index"].tolist())
            return orig(batch)
        model.make_pseudo_labels = spy
        tr = SimpleNamespace(world_size=2, global_rank=rank, datamodule=dm, is_global_zero=rank == 0,
                             current_epoch=0, sanity_checking=False)
        if capture:  # rank 1's local tensors become the second half of rank 0's gather
            model.all_gather = lambda t: (store.__setitem__((t.dtype, tuple(t.shape)), t.clone()), t[None])[1]
        else:
            del model.all_gather
        cb.refresh(tr, model)
        return cb

    run(1, capture=True)
    cb = run(0, capture=False)
    n = len(dm.train_dataset)
    assert len(seen[0]) + len(seen[1]) == n and not set(seen[0]) & set(seen[1])
    assert cb.indices.tolist() == sorted(dm.train_dataset.indices)
    want = dataset_expectation(dm, shift=0)
    assert all(np.array_equal(cb.as_dict()[k], want[k]) for k in want)


def test_refresh_needs_the_hook():
    cb = PseudoLabelRefresh()
    tr = SimpleNamespace(datamodule=None)
    with pytest.raises(AttributeError, match="make_pseudo_labels"):
        cb.refresh(tr, WeakSegModule(encoder="resnet18"))
    with pytest.raises(ValueError, match="every_n_epochs"):
        PseudoLabelRefresh(every_n_epochs=0)
