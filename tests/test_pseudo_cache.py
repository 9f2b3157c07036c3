"""PseudoLabelRefresh's cache on disk: atomic, checksummed, versioned by round, fingerprinted by data set and
regime; a fresh run (no checkpoint) resumes from the newest complete round; a run killed mid-write leaves only a
``.tmp`` file that is ignored and removed; caches of another data set or regime are refused."""
from __future__ import annotations

import os
import warnings

import lightning as L
import numpy as np
import pytest
import torch

from lightning_weakseg import WeakSegModule
from lightning_weakseg.callbacks import PseudoLabelRefresh
from lightning_weakseg.callbacks.pseudo_label_refresh import (PseudoLabelCacheError, PseudoLabelCacheMismatch,
                                                              dataset_fingerprint)
from lightning_weakseg.data import WeakSegDataModule

SMALL = dict(encoder="tu-resnet18", norm="group", model_kwargs={"encoder_depth": 3, "decoder_channels": [8, 8, 4]})


def label_of(image: torch.Tensor, shift: int) -> torch.Tensor:
    return torch.roll((image.mean(0) > 0.25).long(), shift, dims=-1)


class Threshold(WeakSegModule):
    """Pseudo labels that depend on the image and on the epoch, so that every round differs."""

    def make_pseudo_labels(self, batch):
        return torch.stack([label_of(im, self.current_epoch + 1) for im in batch["image"]])


class OtherRegime(Threshold):
    pass


def make_dm(seed=0, n=10, size=32):
    return WeakSegDataModule(synthetic_kind="nuclei", n_samples=n, image_size=size, batch_size=4, seed=seed,
                             train_labels=["points"], augment="none", val_fraction=0.2)


def fit(cache, epochs, module=Threshold, dm=None, ckpt_path=None, root=None, extra=()):
    torch.manual_seed(0)
    model = module(in_channels=3, num_classes=2, mask_key="pseudo", **SMALL)
    cb = PseudoLabelRefresh(every_n_epochs=1, cache_dir=str(cache))
    dm = dm or make_dm()
    tr = L.Trainer(max_epochs=epochs, accelerator="cpu", callbacks=[cb, *extra], logger=False, limit_val_batches=0,
                   limit_train_batches=1, enable_progress_bar=False, enable_model_summary=False,
                   enable_checkpointing=False, default_root_dir=str(root or cache))
    tr.fit(model, dm, ckpt_path=ckpt_path)
    return cb, dm, model, tr


def expected(dm, shift):
    view = dm.train_eval_dataloader().dataset
    return {int(s["index"]): label_of(s["image"], shift).numpy().astype(np.uint8) for s in (view[i] for i in
                                                                                            range(len(view)))}




@pytest.fixture(scope="module")
def two_rounds(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    cb, dm, model, _ = fit(cache, 2)
    return cache, cb, dm, model


def test_cache_files_are_versioned_checksummed_and_fingerprinted(two_rounds):
    cache, cb, dm, model = two_rounds
    assert sorted(os.listdir(cache)) == ["pseudo_round001.pt", "pseudo_round002.pt"]  # no temp file left
    fp = dataset_fingerprint(dm.train_dataset, model)
    assert fp["n_samples"] == 8 and fp["image_hw"] == [32, 32] and fp["module"] == "Threshold"
    assert fp["num_classes"] == 2
    for rnd in (1, 2):
        payload = PseudoLabelRefresh.load_cache(str(cache / f"pseudo_round{rnd:03d}.pt"), fp)
        assert payload["round"] == rnd and payload["fingerprint"] == fp and payload["format"] == 2
        want = expected(dm, shift=rnd)  # round r ran at the end of epoch r-1: shift = epoch + 1
        assert payload["indices"].tolist() == sorted(want)
        assert all(np.array_equal(payload["labels"][k].numpy(), want[i])
                   for k, i in enumerate(payload["indices"].tolist()))


def test_fresh_run_resumes_from_the_last_complete_round_and_ignores_a_killed_write(two_rounds, tmp_path):
    cache, cb, dm, _ = two_rounds
    work = tmp_path / "cache"
    work.mkdir()
    for name in os.listdir(cache):
        (work / name).write_bytes((cache / name).read_bytes())
    # a run killed while writing round 3: only its temporary file exists, and it is truncated
    whole = (cache / "pseudo_round002.pt").read_bytes()
    (work / ".pseudo_killed.tmp").write_bytes(whole[: len(whole) // 3])
    seen = {}

    class Spy(L.Callback):
        def on_train_start(self, trainer, pl_module):  # the data set holds round 2's labels before any new round
            seen.update(trainer.datamodule.train_dataset.pseudo_labels)

    cb2, dm2, _, _ = fit(work, 1, extra=[Spy()])
    assert cb2.resumed_from == str(work / "pseudo_round002.pt")
    assert cb2.round == 3  # round 2 from disk, then the round of this run's epoch 0
    want2 = expected(dm, shift=2)
    assert sorted(seen) == sorted(want2) and all(np.array_equal(seen[k], want2[k]) for k in want2)
    assert not list(work.glob("*.tmp"))
    assert PseudoLabelRefresh.load_cache(str(work / "pseudo_round003.pt"))["round"] == 3


def test_corrupt_or_truncated_round_falls_back_to_the_previous_one(two_rounds, tmp_path):
    cache, *_ = two_rounds
    fp = two_rounds[1].fingerprint
    for damage in ("truncate", "tamper"):
        work = tmp_path / damage
        work.mkdir()
        (work / "pseudo_round001.pt").write_bytes((cache / "pseudo_round001.pt").read_bytes())
        if damage == "truncate":
            whole = (cache / "pseudo_round002.pt").read_bytes()
            (work / "pseudo_round002.pt").write_bytes(whole[:-100])
            match = "cannot read"
        else:  # labels edited after writing: the stored checksum no longer matches
            payload = torch.load(cache / "pseudo_round002.pt", weights_only=True)
            payload["labels"][0, 0, 0] = 1 - payload["labels"][0, 0, 0]
            torch.save(payload, work / "pseudo_round002.pt")
            match = "checksum mismatch"
        with pytest.raises(PseudoLabelCacheError, match=match):
            PseudoLabelRefresh.load_cache(str(work / "pseudo_round002.pt"), fp)
        cb = PseudoLabelRefresh(cache_dir=str(work))
        with pytest.warns(UserWarning, match="skipping .*pseudo_round002"):
            found = cb._latest_from_disk(fp)
        assert found["round"] == 1 and found["path"].endswith("pseudo_round001.pt")


@pytest.mark.parametrize("change", ["seed", "n_samples", "image_size", "regime"])
def test_cache_of_another_data_set_or_regime_is_refused(two_rounds, tmp_path, change):
    cache, *_ = two_rounds
    work = tmp_path / "cache"
    work.mkdir()
    (work / "pseudo_round002.pt").write_bytes((cache / "pseudo_round002.pt").read_bytes())
    dm = {"seed": make_dm(seed=1), "n_samples": make_dm(n=11), "image_size": make_dm(size=48)}.get(change,
                                                                                                    make_dm())
    field = {"seed": "sample_ids_sha256", "n_samples": "n_samples", "image_size": "image_hw",
             "regime": "module"}[change]
    with pytest.raises(PseudoLabelCacheMismatch, match=f"another data set or regime.*{field}"):
        fit(work, 1, module=OtherRegime if change == "regime" else Threshold, dm=dm, root=tmp_path)


def test_checkpoint_labels_of_another_data_set_are_refused(tmp_path):
    cb, dm, model, tr = fit(tmp_path / "a", 1)
    tr.save_checkpoint(str(tmp_path / "a.ckpt"))
    with pytest.raises(PseudoLabelCacheMismatch, match="checkpoint's pseudo labels.*sample_ids_sha256"):
        fit(tmp_path / "b", 2, dm=make_dm(seed=3), ckpt_path=str(tmp_path / "a.ckpt"), root=tmp_path)


def test_checkpoint_wins_over_newer_rounds_on_disk(two_rounds, tmp_path):
    """A resumed run continues with the labels its checkpoint holds, even if the disk has a later round."""
    cache, *_ = two_rounds
    cb, dm, model, tr = fit(tmp_path / "a", 1)
    tr.save_checkpoint(str(tmp_path / "a.ckpt"))
    for name in os.listdir(cache):  # rounds 1 and 2 of the same data set and regime
        (tmp_path / "a" / name).write_bytes((cache / name).read_bytes())
    cb2 = PseudoLabelRefresh(cache_dir=str(tmp_path / "a"))
    cb2.load_state_dict(torch.load(str(tmp_path / "a.ckpt"), weights_only=False)["callbacks"]["PseudoLabelRefresh"])
    cb2.on_fit_start(tr, model)
    assert cb2.round == 1 and cb2.resumed_from is None and torch.equal(cb2.labels, cb.labels)


def test_write_is_atomic_when_the_process_dies_during_save(two_rounds, tmp_path, monkeypatch):
    cache, cb, *_ = two_rounds
    work = tmp_path / "cache"
    work.mkdir()
    before = (cache / "pseudo_round002.pt").read_bytes()
    (work / "pseudo_round002.pt").write_bytes(before)
    writer = PseudoLabelRefresh(cache_dir=str(work))
    writer.round, writer.indices, writer.labels, writer.fingerprint = 2, cb.indices, cb.labels + 0, cb.fingerprint

    def dying_save(obj, path, *a, **k):
        with open(path, "wb") as f:
            f.write(b"PK\x03\x04 half a zip")
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        writer._write_cache()  # would overwrite round 2
    monkeypatch.undo()
    assert sorted(os.listdir(work)) == ["pseudo_round002.pt"]
    assert (work / "pseudo_round002.pt").read_bytes() == before  # the complete old file is untouched
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert writer._latest_from_disk(cb.fingerprint)["round"] == 2
