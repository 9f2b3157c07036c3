"""Self-training rounds: regenerate the training set's pseudo labels from the current model every few epochs."""
from __future__ import annotations

import hashlib
import os
import tempfile

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Subset

__all__ = ["PseudoLabelRefresh"]


def _to_device(x, device):
    if torch.is_tensor(x):
        return x.to(device)
    if isinstance(x, dict):
        return {k: _to_device(v, device) for k, v in x.items()}
    if isinstance(x, list):
        return [_to_device(v, device) for v in x]
    return x


def _checksum(indices: torch.Tensor, labels: torch.Tensor) -> str:
    h = hashlib.sha256()
    h.update(indices.cpu().numpy().astype(np.int64).tobytes())
    h.update(labels.cpu().numpy().astype(np.uint8).tobytes())
    return h.hexdigest()


class PseudoLabelRefresh(L.Callback):
    """Every ``every_n_epochs`` epochs from ``start_epoch`` on (at the end of the epoch), label the training set
    with ``pl_module.make_pseudo_labels(batch) -> LongTensor (B, H, W)`` (class ids or 255) and hand the labels
    to ``trainer.datamodule.train_dataset.set_pseudo_labels({raw index: uint8 (H, W)})``.

    * Data: ``trainer.datamodule.train_eval_dataloader()`` (base view, no augmentation); under DDP each rank
      labels the sample positions ``rank::world_size`` (a partition: no duplicates), then the labels are
      all-gathered so that every rank's data set holds all of them.
    * The model is put in eval mode for the round and restored afterwards; the hook handles gradients.
    * State: ``round`` and the current labels (uint8 tensor (N, H, W) + raw-index tensor (N,)) are in
      ``state_dict()``; on resume they are re-applied to the data set at fit start.
    * ``cache_dir``: rank 0 also writes ``pseudo_round{round:03d}.pt`` there atomically (temporary file +
      ``os.replace``) with a SHA-256 checksum of indices and labels.

    Args:
        every_n_epochs: epochs between rounds.
        start_epoch: epoch index of the first round (0-based; the round runs at the end of that epoch).
        cache_dir: optional folder for the label files.
        batch_size: batch size of the labelling loader (default: the data module's).
    """

    def __init__(self, every_n_epochs: int = 1, start_epoch: int = 0, cache_dir: str | None = None,
                 batch_size: int | None = None):
        if every_n_epochs < 1:
            raise ValueError(f"every_n_epochs must be >= 1, got {every_n_epochs}")
        if start_epoch < 0:
            raise ValueError(f"start_epoch must be >= 0, got {start_epoch}")
        self.every_n_epochs, self.start_epoch = int(every_n_epochs), int(start_epoch)
        self.cache_dir, self.batch_size = cache_dir, batch_size
        self.round = 0
        self.indices: torch.Tensor | None = None  # long (N,)
        self.labels: torch.Tensor | None = None   # uint8 (N, H, W)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        return {"round": self.round, "indices": self.indices, "labels": self.labels}

    def load_state_dict(self, state_dict: dict) -> None:
        self.round = int(state_dict.get("round", 0))
        self.indices = state_dict.get("indices")
        self.labels = state_dict.get("labels")

    def as_dict(self) -> dict[int, np.ndarray]:
        if self.labels is None:
            return {}
        lab = self.labels.cpu().numpy().astype(np.uint8)
        return {int(i): lab[k] for k, i in enumerate(self.indices.cpu().tolist())}

    def _apply(self, trainer) -> None:
        ds = getattr(getattr(trainer, "datamodule", None), "train_dataset", None)
        if ds is not None and self.labels is not None:
            ds.set_pseudo_labels(self.as_dict())

    def on_fit_start(self, trainer, pl_module) -> None:
        self._apply(trainer)

    # ------------------------------------------------------------------ rounds
    def due(self, epoch: int) -> bool:
        return epoch >= self.start_epoch and (epoch - self.start_epoch) % self.every_n_epochs == 0

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking or not self.due(trainer.current_epoch):
            return
        self.refresh(trainer, pl_module)

    def refresh(self, trainer, pl_module) -> None:
        if not hasattr(pl_module, "make_pseudo_labels"):
            raise AttributeError(f"{type(pl_module).__name__} has no make_pseudo_labels(batch); PseudoLabelRefresh "
                                 "needs a regime mixin that defines it")
        dm = trainer.datamodule
        loader = dm.train_eval_dataloader()
        n = len(loader.dataset)
        world, rank = max(int(trainer.world_size), 1), int(trainer.global_rank)
        shard = DataLoader(Subset(loader.dataset, list(range(rank, n, world))),
                           batch_size=self.batch_size or loader.batch_size or 1, shuffle=False,
                           collate_fn=loader.collate_fn, num_workers=0)
        was_training = pl_module.training
        pl_module.eval()
        idx, labs = [], []
        try:
            for batch in shard:
                batch = _to_device(batch, pl_module.device)
                lab = pl_module.make_pseudo_labels(batch)
                if lab.ndim != 3 or lab.shape[0] != batch["image"].shape[0]:
                    raise ValueError(f"make_pseudo_labels must return (B, H, W), got {tuple(lab.shape)}")
                labs.append(lab.detach().to("cpu", torch.uint8))
                idx.append(batch["index"].detach().cpu().long())
        finally:
            pl_module.train(was_training)
        h, w = dm.train_dataset.image_hw
        per_rank = -(-n // world)  # shards differ by at most one sample: pad to the largest
        local_idx = torch.full((per_rank,), -1, dtype=torch.long)
        local_lab = torch.full((per_rank, h, w), 255, dtype=torch.uint8)
        if idx:
            i, lab = torch.cat(idx), torch.cat(labs)
            local_idx[:len(i)], local_lab[:len(i)] = i, lab
        if world > 1:
            dev = pl_module.device
            # gloo has no uint8 all_gather on every build: gather as int32
            g_idx = pl_module.all_gather(local_idx.to(dev)).reshape(-1).cpu()
            g_lab = pl_module.all_gather(local_lab.to(dev, torch.int32)).reshape(-1, h, w).cpu().to(torch.uint8)
        else:
            g_idx, g_lab = local_idx, local_lab
        keep = g_idx >= 0
        order = torch.argsort(g_idx[keep])
        self.indices, self.labels = g_idx[keep][order].clone(), g_lab[keep][order].clone()
        self.round += 1
        self._apply(trainer)
        if self.cache_dir and trainer.is_global_zero:
            self._write_cache()

    def _write_cache(self) -> str:
        os.makedirs(self.cache_dir, exist_ok=True)
        path = os.path.join(self.cache_dir, f"pseudo_round{self.round:03d}.pt")
        payload = {"round": self.round, "indices": self.indices, "labels": self.labels,
                   "sha256": _checksum(self.indices, self.labels)}
        fd, tmp = tempfile.mkstemp(dir=self.cache_dir, prefix=".pseudo_", suffix=".tmp")
        os.close(fd)
        try:
            torch.save(payload, tmp)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        return path

    @staticmethod
    def load_cache(path: str) -> dict:
        """Read a cache file and verify its checksum (raises ValueError on mismatch)."""
        payload = torch.load(path, weights_only=True)
        if _checksum(payload["indices"], payload["labels"]) != payload["sha256"]:
            raise ValueError(f"checksum mismatch in {path}: the file is corrupt or was edited")
        return payload
