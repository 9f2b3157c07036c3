"""Samplers of data/sampling.py on hand-made cases (the fits that use them: tests/test_resume.py, test_ddp.py)."""
from __future__ import annotations

import torch

from lightning_weakseg.data.sampling import EpochSampler, PadFlagged, PaddedEvalSampler, ResumableDataLoader


class Items(torch.utils.data.Dataset):
    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return {"index": i}


def test_padded_eval_shards_by_hand():
    ds = Items(5)
    shards = [list(PaddedEvalSampler(ds, world=2, rank=r)) for r in (0, 1)]
    assert shards == [[0, 2, 4], [1, 3, 5]]  # 5 = the filler, evening rank 1 out
    flagged = PadFlagged(ds)
    assert flagged[4] == {"index": 4} and flagged[5] == {"index": 0, "pad": True}
    assert [len(PaddedEvalSampler(ds, world=2, rank=r)) for r in (0, 1)] == [3, 3]
    assert list(PaddedEvalSampler(Items(4), world=2, rank=1)) == [1, 3]  # even: no filler


def test_epoch_sampler_order_depends_on_seed_and_epoch_only():
    a, b = EpochSampler(Items(10), shuffle=True, seed=3, batch_size=2), EpochSampler(Items(10), shuffle=True, seed=3,
                                                                                   batch_size=2)
    torch.manual_seed(0)
    first = list(a)
    torch.manual_seed(1)  # the global RNG does not matter
    assert list(b) == first and sorted(first) == list(range(10))
    a.set_epoch(1)
    assert list(a) != first
    assert list(EpochSampler(Items(10), shuffle=False, seed=3, batch_size=2)) == list(range(10))


def test_skip_applies_once_and_only_in_its_epoch():
    s = EpochSampler(Items(10), shuffle=False, seed=0, batch_size=3)
    s.skip_batches(epoch=1, batches=2)
    assert list(s) == list(range(10))  # epoch 0: not the resumed epoch
    s.set_epoch(1)
    assert list(s) == [6, 7, 8, 9]  # 2 batches of 3 skipped
    assert list(s) == list(range(10))  # once
    loader = ResumableDataLoader(Items(10), batch_size=3, sampler=s)
    loader.load_state_dict({"epoch": 1, "batches": 4, "batches_per_epoch": 4})  # end of epoch: nothing to skip
    assert len(list(loader)) == 4
    loader.load_state_dict({"epoch": 1, "batches": 3, "batches_per_epoch": 4})
    assert [b["index"].tolist() for b in loader] == [[9]] and len(loader) == 4
