"""Self-training rounds: regenerate the training set's pseudo labels from the current model every few epochs."""
from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
import warnings
from contextlib import nullcontext

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Subset

from ..errors import PseudoLabelCacheError, PseudoLabelCacheMismatch

__all__ = ["PseudoLabelRefresh", "PseudoLabelCacheError", "PseudoLabelCacheMismatch", "dataset_fingerprint"]

CACHE_FORMAT = 2
_ROUND_FILE = re.compile(r"^pseudo_round(\d+)\.pt$")


def _to_device(x, device, dtype=None):
    if torch.is_tensor(x):
        return x.to(device, dtype) if dtype is not None and x.is_floating_point() else x.to(device)
    if isinstance(x, dict):
        return {k: _to_device(v, device, dtype) for k, v in x.items()}
    if isinstance(x, list):
        return [_to_device(v, device, dtype) for v in x]
    return x


def _sha256_json(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def _checksum(indices: torch.Tensor, labels: torch.Tensor, meta: dict | None = None) -> str:
    h = hashlib.sha256()
    h.update(indices.cpu().numpy().astype(np.int64).tobytes())
    h.update(labels.cpu().numpy().astype(np.uint8).tobytes())
    if meta is not None:
        h.update(json.dumps(meta, sort_keys=True).encode())
    return h.hexdigest()


def dataset_fingerprint(dataset, module) -> dict:
    """What a set of pseudo labels belongs to: the training samples (count, raw indices, sample ids), the base-view
    image size, and the module class (the regime) with its number of classes. Plain JSON-able values."""
    n = len(dataset)
    raw_index = getattr(dataset, "raw_index", lambda i: i)
    indices = [int(raw_index(i)) for i in range(n)]
    sample_id = getattr(dataset, "sample_id", None)
    ids = [str(sample_id(i)) for i in indices] if sample_id is not None else []
    hw = getattr(dataset, "image_hw", None)
    hp = getattr(module, "hparams", {}) or {}
    return {"n_samples": n, "raw_indices_sha256": _sha256_json(indices), "sample_ids_sha256": _sha256_json(ids),
            "image_hw": [int(v) for v in hw] if hw is not None else None,
            "module": type(module).__name__, "num_classes": hp.get("num_classes")}


def _fingerprint_mismatch(found: dict | None, expected: dict) -> list[str]:
    if not isinstance(found, dict):
        return ["no fingerprint (written by an older version)"]
    return [f"{k}: {found.get(k)!r} there, {v!r} in this run" for k, v in expected.items() if found.get(k) != v]


class PseudoLabelRefresh(L.Callback):
    """Every ``every_n_epochs`` epochs from ``start_epoch`` on (at the end of the epoch), label the training set
    with ``pl_module.make_pseudo_labels(batch) -> LongTensor (B, H, W)`` (class ids or 255) and hand the labels
    to ``trainer.datamodule.train_dataset.set_pseudo_labels({raw index: uint8 (H, W)})``. In the library's
    regimes ``make_pseudo_labels`` is :class:`~lightning_weakseg.regimes.PseudoLabelMixin`'s: each sample is
    labelled by the rule of the regime whose label it carries.

    * Data: ``trainer.datamodule.train_eval_dataloader()`` (base view, no augmentation); under DDP each rank
      labels the sample positions ``rank::world_size`` (a partition: no duplicates), then the labels are
      all-gathered so that every rank's data set holds all of them.
    * The model is put in eval mode for the round and restored afterwards; the hook handles gradients.
    * State: ``round`` and the current labels (uint8 tensor (N, H, W) + raw-index tensor (N,)) are in
      ``state_dict()``; on resume they are re-applied to the data set at fit start.
    * ``cache_dir``: rank 0 also writes ``pseudo_round{round:03d}.pt`` there atomically (a ``.pseudo_*.tmp`` file,
      then ``os.replace``), with a SHA-256 checksum over labels, indices and a fingerprint of the data set
      (:func:`dataset_fingerprint`: sample count, raw indices, sample ids, image size, module class, classes).
      When a fit starts without checkpoint state for this callback, it resumes from the newest complete round
      in ``cache_dir`` (left-over ``.tmp`` files of a run killed mid-write are removed; a file that fails its
      checksum is skipped with a warning, an older round is used). A cache written for another data set or
      regime is refused with :class:`PseudoLabelCacheMismatch` (a :class:`PseudoLabelCacheError`) naming the
      fields that differ.
    * A checkpoint's labels carry the same fingerprint and are refused in the same way on resume.

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
        self.fingerprint: dict | None = None      # of the data set and regime the labels belong to
        self.resumed_from: str | None = None      # cache file the labels were read from at fit start, if any
        self._restored = False

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        return {"round": self.round, "indices": self.indices, "labels": self.labels, "fingerprint": self.fingerprint}

    def load_state_dict(self, state_dict: dict) -> None:
        self.round = int(state_dict.get("round", 0))
        self.indices = state_dict.get("indices")
        self.labels = state_dict.get("labels")
        self.fingerprint = state_dict.get("fingerprint")
        self._restored = True

    def as_dict(self) -> dict[int, np.ndarray]:
        if self.labels is None:
            return {}
        lab = self.labels.cpu().numpy().astype(np.uint8)
        return {int(i): lab[k] for k, i in enumerate(self.indices.cpu().tolist())}

    def _apply(self, trainer) -> None:
        ds = getattr(getattr(trainer, "datamodule", None), "train_dataset", None)
        if ds is not None and self.labels is not None:
            ds.set_pseudo_labels(self.as_dict())

    def _expected_fingerprint(self, trainer, pl_module) -> dict | None:
        ds = getattr(getattr(trainer, "datamodule", None), "train_dataset", None)
        return None if ds is None else dataset_fingerprint(ds, pl_module)

    def on_fit_start(self, trainer, pl_module) -> None:
        expected = self._expected_fingerprint(trainer, pl_module)
        if self._restored and self.labels is not None and expected is not None and self.fingerprint is not None:
            wrong = _fingerprint_mismatch(self.fingerprint, expected)
            if wrong:
                raise PseudoLabelCacheMismatch("the checkpoint's pseudo labels belong to another data set or regime ("
                                            + "; ".join(wrong) + ")")
        elif not self._restored and self.cache_dir and expected is not None:
            self._resume_from_cache(trainer, expected)
        self._apply(trainer)

    def on_fit_end(self, trainer, pl_module) -> None:
        self._restored = False  # a later fit without a checkpoint consults cache_dir again

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
        # the loader bypasses Lightning's precision plugin: cast floats to the module's dtype, use its context
        plugin = getattr(trainer, "precision_plugin", None)
        context = plugin.forward_context if hasattr(plugin, "forward_context") else nullcontext
        try:
            for batch in shard:
                batch = _to_device(batch, pl_module.device, pl_module.dtype)
                with context():
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
        self.fingerprint = dataset_fingerprint(dm.train_dataset, pl_module)
        self.round += 1
        self._apply(trainer)
        if self.cache_dir and trainer.is_global_zero:
            self._write_cache()

    def _write_cache(self) -> str:
        os.makedirs(self.cache_dir, exist_ok=True)
        path = os.path.join(self.cache_dir, f"pseudo_round{self.round:03d}.pt")
        meta = {"format": CACHE_FORMAT, "round": self.round, "fingerprint": self.fingerprint}
        payload = {**meta, "indices": self.indices, "labels": self.labels,
                   "sha256": _checksum(self.indices, self.labels, meta)}
        fd, tmp = tempfile.mkstemp(dir=self.cache_dir, prefix=".pseudo_", suffix=".tmp")
        os.close(fd)
        try:
            torch.save(payload, tmp)
            os.replace(tmp, path)  # atomic: readers see the old state or the complete new file, never a part
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        return path

    @staticmethod
    def load_cache(path: str, fingerprint: dict | None = None) -> dict:
        """Read a cache file, verify its checksum and, if given, that it belongs to ``fingerprint``.

        Raises :class:`PseudoLabelCacheError` (a ``ValueError``) if the file is unreadable or truncated, fails
        its checksum, or was written for another data set or regime (the message lists the differing fields)."""
        try:
            payload = torch.load(path, weights_only=True)
        except Exception as e:  # truncated zip, bad pickle, missing file: all "cannot use this file"
            raise PseudoLabelCacheError(f"cannot read pseudo-label cache {path} ({type(e).__name__}: {e}); "
                                        "the file is truncated or not a cache file") from e
        if not isinstance(payload, dict) or not {"indices", "labels", "sha256", "round"} <= set(payload):
            raise PseudoLabelCacheError(f"{path} is not a pseudo-label cache file (missing fields)")
        meta = {"format": payload.get("format"), "round": payload["round"], "fingerprint": payload.get("fingerprint")}
        if meta["format"] is None:
            meta = None  # format 1: checksum over indices and labels only
        if _checksum(payload["indices"], payload["labels"], meta) != payload["sha256"]:
            raise PseudoLabelCacheError(f"checksum mismatch in {path}: the file is corrupt or was edited")
        if fingerprint is not None:
            wrong = _fingerprint_mismatch(payload.get("fingerprint"), fingerprint)
            if wrong:
                raise PseudoLabelCacheMismatch(
                    f"pseudo-label cache {path} was written for another data set or regime ({'; '.join(wrong)}); "
                    "point cache_dir at a fresh folder or delete the old one")
        return payload

    @staticmethod
    def cached_rounds(cache_dir: str) -> list[tuple[int, str]]:
        """(round, path) of the complete round files in ``cache_dir``, newest first (``.tmp`` files excluded)."""
        if not cache_dir or not os.path.isdir(cache_dir):
            return []
        found = [(int(m.group(1)), os.path.join(cache_dir, name))
                 for name in os.listdir(cache_dir) if (m := _ROUND_FILE.match(name))]
        return sorted(found, reverse=True)

    def _latest_from_disk(self, expected: dict) -> dict | None:
        for name in os.listdir(self.cache_dir) if os.path.isdir(self.cache_dir) else []:
            if name.startswith(".pseudo_") and name.endswith(".tmp"):  # a run killed mid-write
                try:
                    os.remove(os.path.join(self.cache_dir, name))
                except OSError:
                    pass
        for rnd, path in self.cached_rounds(self.cache_dir):
            try:
                payload = self.load_cache(path, expected)
            except PseudoLabelCacheMismatch:
                raise
            except PseudoLabelCacheError as e:
                warnings.warn(f"PseudoLabelRefresh: skipping {path}: {e}", stacklevel=2)
                continue
            return {"round": int(payload["round"]), "indices": payload["indices"], "labels": payload["labels"],
                    "path": path}
        return None

    def _resume_from_cache(self, trainer, expected: dict) -> None:
        """Rank 0 picks the newest complete, matching round on disk and broadcasts it (or the error)."""
        found, error = None, None
        if getattr(trainer, "is_global_zero", True):
            try:
                found = self._latest_from_disk(expected)
            except PseudoLabelCacheMismatch as e:
                error = str(e)
        strategy = getattr(trainer, "strategy", None)
        if strategy is not None and getattr(trainer, "world_size", 1) > 1:
            found, error = strategy.broadcast((found, error), src=0)
        if error is not None:
            raise PseudoLabelCacheMismatch(error)
        if found is not None:
            self.round, self.indices, self.labels = found["round"], found["indices"], found["labels"]
            self.fingerprint, self.resumed_from = expected, found["path"]
