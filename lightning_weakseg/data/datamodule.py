"""``WeakSegDataModule``: synthetic or folder data, split by group, weak labels for training, full masks for
evaluation, and label-type mixes for annotation-budget experiments."""
from __future__ import annotations

from typing import Sequence

import lightning as L
import numpy as np
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
import torch
from torch.utils.data import DataLoader, DistributedSampler

from .batch import LABEL_KEYS, collate
from .folder import FolderDataset
from .tiles import TiledDataset
from .sampling import EpochSampler, PadFlagged, PaddedEvalSampler, ResumableDataLoader, TwoStreamSampler
from .synthetic import KINDS, SyntheticDataset


def group_split(groups: Sequence[str], val_fraction: float, test_fraction: float, seed: int):
    """Split indices so that no group (patient, image id) spans two splits; seeded."""
    uniq = sorted(set(groups))
    rng = np.random.default_rng(seed)
    rng.shuffle(uniq)
    n = len(uniq)
    n_test = int(round(test_fraction * n))
    n_val = max(int(round(val_fraction * n)), 1 if val_fraction > 0 else 0)
    test_g, val_g = set(uniq[:n_test]), set(uniq[n_test:n_test + n_val])
    split = {"train": [], "val": [], "test": []}
    for i, g in enumerate(groups):
        split["test" if g in test_g else "val" if g in val_g else "train"].append(i)
    return split


def assign_labels(n: int, fractions: dict[str, float], seed: int) -> list[tuple[str, ...]]:
    """Give each of ``n`` samples one label type, by ``fractions`` (e.g. ``{"mask": .1, "boxes": .9}``).

    Keys may join types with ``+`` (``"mask+tags"``); ``"none"`` gives a sample no label at all (the empty tuple:
    an unlabelled image, for semi-supervised regimes). Counts are exact (largest remainder), order seeded."""
    if not fractions:
        raise ValueError("label_fractions is empty")
    total = sum(fractions.values())
    if abs(total - 1) > 1e-6:
        raise ValueError(f"label_fractions must sum to 1, got {total}")
    names = list(fractions)
    for name in names:
        parts = name.split("+")
        if "none" in parts and len(parts) > 1:
            raise ValueError(f"label_fractions: 'none' (no label) cannot be joined with other types, got {name!r}")
        bad = set(parts) - set(LABEL_KEYS) - {"none"}
        if bad:
            raise ValueError(f"unknown label type(s) {sorted(bad)} in label_fractions")
    raw = np.array([fractions[k] * n for k in names])
    counts = np.floor(raw).astype(int)
    for j in np.argsort(-(raw - counts))[: n - counts.sum()]:
        counts[j] += 1
    plan = [() if name == "none" else tuple(name.split("+")) for name, c in zip(names, counts) for _ in range(c)]
    order = np.random.default_rng(seed).permutation(n)
    return [plan[j] for j in order]


class WeakSegDataModule(L.LightningDataModule):
    """Data for every regime.

    Args:
        source: ``"synthetic"`` (built-in, the default), ``"folder"`` or ``"volumes"`` (NIfTI volumes served as 2D
            slices, :class:`~.volumes.VolumeDataset`: ``image_dir`` / ``mask_dir`` / ``scribble_dir`` hold
            ``<name>.nii.gz`` files; validation and test also log per-volume 3D Dice and HD95, ``val/volume_dice``,
            ``val/volume_hd95``).
        slice_axis, volume_norm, empty_slice_rate: volumes: the array axis that indexes slices (2: H × W × slices);
            the per-volume intensity normalisation (``"percentile"``: clip to the 0.5–99.5th percentiles, scale to
            [0, 1]; ``"zscore"``; ``"none"``); the share of training slices without foreground in the mask that is
            kept (seeded; 1.0 keeps all; validation and test always keep every slice, volumes are scored whole).
        synthetic_kind, n_samples: the synthetic set (``"organ"`` multi-class or ``"nuclei"``) and its size.
        class_presence: synthetic organ set: probability that each structure is in an image (1.0: always; lower
            it for image-level tags that vary).
        root, image_dir, mask_dir, instance_dir, scribble_dir, boxes_json, mask_map, color_mode: folder layout
            (see :class:`~lightning_weakseg.data.folder.FolderDataset`).
        group_regex: regex whose first group names the split group of a file stem (e.g. ``"^(patient\\d+)"``).
        num_classes, in_channels: ``None`` takes the synthetic kind's values; required for folders.
        image_size: base view size (every image is resized to it first).
        tiles: ``g > 1`` resizes every image to ``g·image_size`` and cuts it into ``g × g`` tiles of
            ``image_size``, each a sample with its own weak labels (e.g. tags that vary on Kvasir, where every
            image holds a polyp); the tiles of one image stay in one split (:class:`~.tiles.TiledDataset`).
        tile_eval: with tiles, ``"tiles"`` validates and tests on tiles, ``"images"`` on the whole images (at
            ``tiles × image_size``) that the validation / test tiles come from: training sees tiles, the metrics
            see whole images, as in the usual benchmarks of the data set.
        train_labels: label keys the training split carries (weak labels derived from masks if absent).
        label_fractions: mixed supervision, e.g. ``{"mask": 0.1, "boxes": 0.3, "tags": 0.6}`` (overrides
            ``train_labels``); ``"none"`` leaves that share of the training samples without any label
            (``{"mask": 0.1, "none": 0.9}``: semi-supervised regimes, :mod:`lightning_weakseg.regimes.mean_teacher`).
        label_by_group: assign ``label_fractions`` per split group (patient or volume, ``group_regex``) instead of
            per sample: every slice of a group carries the same label type ("10 % of the patients labelled").
        unlabelled_dir: a folder of images (volumes for ``source="volumes"``) without any label file: every one is
            a training sample with no label (id ``unlabelled/<file stem>``), beside the labelled training split;
            never validated on. Read like the data (``color_mode``, ``resize``, ``image_size``, ``tiles``) and
            checked up front like it (``on_bad_data``). For the semi-supervised regimes
            (:mod:`~lightning_weakseg.regimes.mean_teacher`, :mod:`~lightning_weakseg.regimes.cps`).
        labelled_share: with labelled and unlabelled training samples, the share of every training batch that
            carries a label (``round(labelled_share · batch_size)`` samples; :class:`~.sampling.TwoStreamSampler`):
            the two-stream batches of semi-supervised segmentation (Yu et al., MICCAI 2019, half of each batch
            labelled). The labelled samples are drawn again when they run out, so a small labelled set is seen
            many times an epoch; an epoch has as many batches as without. ``None`` (default): batches drawn
            from all samples alike.
        weakify: options of the weak-label simulator (``box_jitter``, ``point_mode``, ``point_fraction``,
            ``scribble_keep``, ``noise_rate``, ``noise_fraction``).
        augment: training augmentation: ``"default"``, ``"light"``, ``"none"``.
        max_train_samples: optional cap on the training split (seeded subset), for budgets.
        shuffle: shuffle the training set each epoch (off for exact 1-process vs DDP comparisons).
        resize: how an image becomes the ``image_size`` base view: ``"longest"`` (default: keep the aspect, scale
            the longest side, pad; padded pixels are unknown in every label map), ``"pad"`` (pad only) or
            ``"stretch"`` (:mod:`~lightning_weakseg.data.geometry`).
        on_bad_data: what the up-front data check (:mod:`~lightning_weakseg.data.check`) does with problems:
            ``"raise"`` (default: one error listing them all) or ``"skip"`` (leave the bad samples out, print
            and log the list). Data-set-wide problems (e.g. masks stored 0/255) always raise.
        check: run the data check in ``setup`` (folder data, cached by a fingerprint of the files; volumes:
            :func:`~.volumes.check_volumes`).
        check_cache_dir: where check reports are cached (default ``~/.cache/lightning_weakseg/data_check``).
        predict_dir: a folder of images to predict (no labels needed, any size): ``predict_dataloader`` serves it
            (:class:`~.predict.PredictDataset`: read with ``color_mode``, resized like training, with the geometry
            that maps predictions back to each file's size); ``setup("predict")`` then reads nothing else.
        test_dir: a separate labelled test folder (same layout arguments as ``root``); it replaces the
            ``test_fraction`` split. With neither, the test loop scores the validation split, with a warning.
        native_eval: evaluation samples of folder and volume data carry their mask at the file's resolution, and
            test scores (and the per-volume scores) are computed there.
    """

    def __init__(self, source: str = "synthetic", synthetic_kind: str = "organ", n_samples: int = 200,
                 root: str | None = None, image_dir: str = "images", mask_dir: str | None = "masks",
                 instance_dir: str | None = None, scribble_dir: str | None = None, boxes_json: str | None = None,
                 mask_map: dict | None = None, color_mode: str = "auto", group_regex: str | None = None,
                 num_classes: int | None = None, in_channels: int | None = None, image_size: int = 64,
                 train_labels: Sequence[str] = ("mask",), label_fractions: dict[str, float] | None = None,
                 weakify: dict | None = None, augment: str = "default", batch_size: int = 8, num_workers: int = 0,
                 val_fraction: float = 0.2, test_fraction: float = 0.0, max_train_samples: int | None = None,
                 eval_batch_size: int | None = None, shuffle: bool = True, seed: int = 0,
                 class_presence: float = 1.0, tiles: int = 1, tile_eval: str = "tiles",
                 resize: str = "longest", on_bad_data: str = "raise", check: bool = True,
                 check_cache_dir: str | None = None, predict_dir: str | None = None,
                 test_dir: str | None = None, native_eval: bool = True, slice_axis: int = 2,
                 volume_norm: str = "percentile", empty_slice_rate: float = 1.0, label_by_group: bool = False,
                 labelled_share: float | None = None, unlabelled_dir: str | None = None):
        super().__init__()
        if int(tiles) != tiles or tiles < 1:
            raise ValueError(f"tiles must be a positive integer, got {tiles!r}")
        if tile_eval not in ("tiles", "images"):
            raise ValueError(f"tile_eval must be 'tiles' or 'images', got {tile_eval!r}")
        if source not in ("synthetic", "folder", "volumes"):
            raise ValueError(f"source must be 'synthetic', 'folder' or 'volumes', got {source!r}")
        if source == "volumes" and tiles != 1:
            raise ValueError("tiles are not available for source='volumes' (slices are scored as whole volumes)")
        if labelled_share is not None and not 0.0 < labelled_share < 1.0:
            raise ValueError(f"labelled_share must be in (0, 1) or None, got {labelled_share}")
        if not 0.0 <= empty_slice_rate <= 1.0:
            raise ValueError(f"empty_slice_rate must be in [0, 1], got {empty_slice_rate}")
        if source in ("folder", "volumes"):
            if root is None or num_classes is None or in_channels is None:
                raise ValueError(f"source={source!r} needs root, num_classes and in_channels")
        else:
            num_classes = num_classes or KINDS[synthetic_kind]["num_classes"]
            in_channels = in_channels or KINDS[synthetic_kind]["in_channels"]
        self.num_classes, self.in_channels = num_classes, in_channels
        self.save_hyperparameters()
        # record the resolved values (LightningCLI passes the raw config values to save_hyperparameters)
        for hp in (self.hparams, self._hparams_initial):
            hp["num_classes"], hp["in_channels"] = num_classes, in_channels
        self.train_dataset = self.val_dataset = self.test_dataset = None
        self._resume_position: dict = {}  # from a checkpoint (load_state_dict)

    def _full(self):
        h = self.hparams
        grid = int(h.get("tiles", 1))
        common = dict(num_classes=self.num_classes, in_channels=self.in_channels, image_size=h.image_size * grid,
                      weakify=h.weakify, seed=h.seed)
        if h.source == "synthetic":
            ds = SyntheticDataset(h.synthetic_kind, n=h.n_samples, class_presence=h.class_presence, **common)
            groups = [str(i) for i in range(len(ds))]
        elif h.source == "volumes":
            ds = self._volumes(h.root, mask_dir=h.mask_dir, scribble_dir=h.scribble_dir, **common)
            groups = ds.groups(h.group_regex)
        else:
            ds = FolderDataset(h.root, image_dir=h.image_dir, mask_dir=h.mask_dir, instance_dir=h.instance_dir,
                               scribble_dir=h.scribble_dir, boxes_json=h.boxes_json, mask_map=h.mask_map,
                               color_mode=h.color_mode, resize=h.get("resize", "longest"), **common)
            groups = ds.groups(h.group_regex)
        if grid > 1:
            ds = TiledDataset(ds, grid, **{**common, "image_size": h.image_size})
            groups = ds.groups(h.group_regex)
        return ds, groups

    def setup(self, stage: str | None = None) -> None:
        if self.train_dataset is not None:
            return
        h = self.hparams
        if stage == "predict" and h.get("predict_dir"):
            return  # only the prediction folder is read: the training data need not be on this machine
        ds, groups = self._full()
        split = group_split(groups, h.val_fraction, h.test_fraction, h.seed)
        bad = self._run_check(ds)
        if bad:
            split = {k: [i for i in v if i not in bad] for k, v in split.items()}
        train_idx = split["train"]
        if h.source == "volumes" and h.get("empty_slice_rate", 1.0) < 1.0:
            train_idx = ds.drop_empty_slices(train_idx, h.empty_slice_rate, h.seed)
        if h.max_train_samples is not None and len(train_idx) > h.max_train_samples:
            rng = np.random.default_rng(h.seed + 1)
            train_idx = sorted(rng.choice(train_idx, h.max_train_samples, replace=False).tolist())
        self.split = {**split, "train": train_idx}
        eval_labels = ("mask",) + (("instances",) if (h.source == "synthetic" and h.synthetic_kind == "nuclei")
                                   or h.instance_dir else ())
        plan = None
        if h.label_fractions:
            if h.get("label_by_group", False):
                train_groups = [groups[i] for i in train_idx]
                uniq = sorted(set(train_groups))
                by_group = dict(zip(uniq, assign_labels(len(uniq), dict(h.label_fractions), h.seed)))
                per = [by_group[g] for g in train_groups]
            else:
                per = assign_labels(len(train_idx), dict(h.label_fractions), h.seed)
            plan = {i: p for i, p in zip(train_idx, per)}
        if h.get("unlabelled_dir"):
            train_ds, train_idx, plan = self._with_unlabelled(ds, train_idx, plan)
        else:
            train_ds = ds
        self.train_dataset = train_ds.subset(train_idx, labels=tuple(h.train_labels), label_plan=plan,
                                             augment=h.augment)
        eval_ds, val_idx, test_idx = ds, split["val"], split["test"]
        if isinstance(ds, TiledDataset) and h.get("tile_eval", "tiles") == "images":
            # validate / test on the whole images (at tiles × image_size) the evaluation tiles came from
            eval_ds, per = ds.source, ds.grid ** 2
            val_idx, test_idx = sorted({i // per for i in val_idx}), sorted({i // per for i in test_idx})
        native = h.source in ("folder", "volumes") and h.get("native_eval", True)
        self.val_dataset = eval_ds.subset(val_idx, labels=eval_labels, augment="none", native_eval=native)
        self.test_dataset = (eval_ds.subset(test_idx, labels=eval_labels, augment="none", native_eval=native)
                             if test_idx else None)
        if h.get("test_dir"):  # a separate labelled test folder replaces the test split; checked up front too
            test_ds = self._test_folder(eval_labels)
            train_report = getattr(self, "data_report", None)
            bad = self._run_check(test_ds, report_name="data_check_test")
            self.test_data_report, self.data_report = getattr(self, "data_report", None), train_report
            self.test_dataset = test_ds.subset([i for i in range(test_ds.raw_length()) if i not in bad],
                                               native_eval=native) if bad else test_ds
        self.full_dataset = ds

    def _with_unlabelled(self, ds, train_idx: list[int], plan: dict | None):
        """The training data joined with every image of ``unlabelled_dir`` (no labels; checked up front like the
        data, its report in ``unlabelled_data_report``): the joined data set, its training raw indices and the
        label plan (the unlabelled images planned without any label)."""
        from .joined import JoinedDataset
        h = self.hparams
        unl = self._unlabelled_dataset()
        data_report = getattr(self, "data_report", None)
        bad = self._run_check(unl, report_name="data_check_unlabelled")
        self.unlabelled_data_report, self.data_report = getattr(self, "data_report", None), data_report
        joined = JoinedDataset(ds, unl)
        extra = [joined.offset + j for j in range(unl.raw_length()) if j not in bad]
        if plan is None:
            plan = {i: tuple(h.train_labels) for i in train_idx}
        return joined, list(train_idx) + extra, {**plan, **{i: () for i in extra}}

    def _unlabelled_dataset(self):
        """Every image (volume) of ``unlabelled_dir``, read like the data, without labels."""
        h = self.hparams
        grid = int(h.get("tiles", 1))
        common = dict(num_classes=self.num_classes, in_channels=self.in_channels, image_size=h.image_size * grid,
                      seed=h.seed)
        if h.source == "volumes":
            unl = self._volumes(h.unlabelled_dir, image_dir=".", mask_dir=None, scribble_dir=None, labels=(),
                                **common)
        else:
            unl = FolderDataset(h.unlabelled_dir, image_dir=".", mask_dir=None, color_mode=h.color_mode,
                                resize=h.get("resize", "longest"), labels=(), **common)
        if grid > 1:
            unl = TiledDataset(unl, grid, **{**common, "image_size": h.image_size, "labels": ()})
        return unl

    def _volumes(self, root, image_dir: str | None = None, **kwargs):
        """A :class:`~.volumes.VolumeDataset` of ``root`` with this module's volume options."""
        from .volumes import VolumeDataset
        h = self.hparams
        return VolumeDataset(root, image_dir=image_dir or h.image_dir, slice_axis=h.get("slice_axis", 2),
                             volume_norm=h.get("volume_norm", "percentile"), resize=h.get("resize", "longest"),
                             **kwargs)

    def _boxes_trained(self) -> bool:
        h = self.hparams
        keys = set(h.train_labels or ())
        for name in (h.label_fractions or {}):
            keys |= set(name.split("+"))
        return "boxes" in keys

    def check_data(self, use_cache: bool = True):
        """Run the up-front data check (:func:`~lightning_weakseg.data.check.check_folder`, for volumes
        :func:`~lightning_weakseg.data.volumes.check_volumes`) and return its
        :class:`~lightning_weakseg.data.check.DataReport` (``None`` for synthetic data)."""
        ds, _ = self._full()
        return self._check_report(ds, use_cache)

    def check_unlabelled_data(self, use_cache: bool = True):
        """The same check of ``unlabelled_dir`` (``None`` without one)."""
        if not self.hparams.get("unlabelled_dir"):
            return None
        return self._check_report(self._unlabelled_dataset(), use_cache)

    def _check_report(self, ds, use_cache: bool = True):
        from .check import check_folder
        from .volumes import VolumeDataset, check_volumes
        if isinstance(ds, VolumeDataset):
            return check_volumes(ds)
        folder = ds.source if isinstance(ds, TiledDataset) else ds
        if not isinstance(folder, FolderDataset):
            return None
        folder.boxes_required = self._boxes_trained()
        return check_folder(folder, boxes_trained=folder.boxes_required, cache_dir=self.hparams.check_cache_dir,
                            use_cache=use_cache)

    def _run_check(self, ds, report_name: str = "data_check") -> set[int]:
        """The check before training: raise on problems (``on_bad_data="raise"``) or return the raw indices of
        ``ds`` to leave out (``"skip"``); the report is printed and, with a logger, written as
        ``<report_name>.json`` in the log dir."""
        h = self.hparams
        mode = h.get("on_bad_data", "raise")
        if mode not in ("raise", "skip"):
            raise ValueError(f"on_bad_data must be 'raise' or 'skip', got {mode!r}")
        if not h.get("check", True):
            return set()
        report = self._check_report(ds)
        self.data_report = report
        if report is None:
            return set()
        trainer = getattr(self, "_trainer", None)
        log_dir = getattr(trainer, "log_dir", None) if trainer is not None else None
        if log_dir and getattr(trainer, "is_global_zero", True):
            import json
            import os
            os.makedirs(log_dir, exist_ok=True)
            with open(os.path.join(log_dir, f"{report_name}.json"), "w") as f:
                json.dump(report.to_dict(), f, indent=1)
        if report.problems or report.notes:
            rank_zero_warn(report.format())
        else:
            rank_zero_info(report.format())
        if report.dataset_wide() or (report.problems and mode == "raise"):
            report.raise_if_bad()
        bad = report.bad_indices()
        if isinstance(ds, TiledDataset):
            per = ds.grid ** 2
            bad = {j * per + t for j in bad for t in range(per)}
        return bad

    def _loader(self, ds, shuffle: bool, batch_size: int | None = None):
        sampler = None
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            # our own sampler, so that shuffle=False really means the sequential order on every rank
            sampler = DistributedSampler(ds, shuffle=shuffle, seed=self.hparams.seed, drop_last=False)
            shuffle = False
        return DataLoader(ds, batch_size=batch_size or self.hparams.batch_size, shuffle=shuffle, sampler=sampler,
                          num_workers=self.hparams.num_workers, collate_fn=collate,
                          persistent_workers=False, drop_last=False)

    def _eval_loader(self, ds, collate_fn=collate, whole_volumes: bool = False):
        """Evaluation: in one process the plain order; under DDP even shards whose filler samples carry
        ``pad=True``, which the module leaves out of its metrics and predictions (no sample counts twice).
        ``whole_volumes``: each rank gets whole volumes (:class:`~.volumes.WholeVolumeSampler`; prediction, so that
        a rank can write the volumes it predicted); the per-volume scores gather slices instead."""
        batch_size = self.hparams.eval_batch_size or self.hparams.batch_size
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=self.hparams.num_workers,
                              collate_fn=collate_fn, drop_last=False)
        if whole_volumes:
            from .volumes import WholeVolumeSampler
            sampler = WholeVolumeSampler(ds)
        else:
            sampler = PaddedEvalSampler(ds)
        return DataLoader(PadFlagged(ds), batch_size=batch_size, sampler=sampler,
                          num_workers=self.hparams.num_workers, collate_fn=collate_fn, drop_last=False)

    def train_dataloader(self):
        """The training loader: epoch ``e``'s order depends only on ``(seed, e)`` (also with ``shuffle=True``,
        also in one process), and its position is part of every checkpoint, so a run resumed from a checkpoint
        written inside an epoch continues with the next batch (:mod:`~lightning_weakseg.data.sampling`)."""
        h = self.hparams
        if h.get("labelled_share") is not None:
            try:
                sampler = TwoStreamSampler(self.train_dataset, labelled=self.labelled_flags(),
                                           labelled_per_batch=round(h.labelled_share * h.batch_size),
                                           shuffle=h.shuffle, seed=h.seed, batch_size=h.batch_size)
            except ValueError as e:
                raise ValueError(f"labelled_share={h.labelled_share} with batch_size={h.batch_size}: {e}") from None
        else:
            sampler = EpochSampler(self.train_dataset, shuffle=h.shuffle, seed=h.seed, batch_size=h.batch_size)
        loader = ResumableDataLoader(self.train_dataset, batch_size=h.batch_size, sampler=sampler,
                                     num_workers=h.num_workers, collate_fn=collate, drop_last=False)
        loader.progress = self._train_position
        if self._resume_position:
            loader.load_state_dict(self._resume_position)
        return loader

    def labelled_flags(self) -> list[bool]:
        """Per training sample (in ``train_dataset`` order), whether it carries any label."""
        ds = self.train_dataset
        return [bool(ds.keys_for(ds.raw_index(i))) for i in range(len(ds))]

    def _train_position(self) -> tuple[int, int]:
        trainer = self.trainer
        return trainer.current_epoch, trainer.fit_loop.epoch_loop.batch_progress.current.processed

    def state_dict(self) -> dict:
        """The training loader's position (epoch, batches finished in it), saved in every checkpoint.

        Lightning restores the data module before it first builds the training loader, so
        :meth:`train_dataloader` can start the resumed epoch at the right batch (Lightning's own restore of
        ``_Stateful`` loaders comes after the loader was built for ``estimated_stepping_batches``, too late)."""
        trainer = getattr(self, "trainer", None)
        if trainer is None or self.train_dataset is None or not trainer.training:
            return {}
        epoch, batches = self._train_position()
        return {"train_position": {"epoch": int(epoch), "batches": int(batches),
                                   "batches_per_epoch": int(trainer.num_training_batches)}}

    def load_state_dict(self, state_dict: dict) -> None:
        self._resume_position = dict(state_dict.get("train_position") or {})

    def val_dataloader(self):
        return self._eval_loader(self.val_dataset)

    def test_dataloader(self):
        """``test_dir`` when given, else the test split (``test_fraction``); with neither, the validation split,
        with a warning: those scores are not held out from model selection."""
        ds = self.test_dataset
        if ds is None:
            rank_zero_warn("WeakSegDataModule: no test set (test_fraction=0 and no test_dir): the test loop scores "
                           "the VALIDATION split. Pass test_dir=<labelled folder> or test_fraction>0 for held-out "
                           "test scores.")
            ds = self.val_dataset
        return self._eval_loader(ds)

    def _test_folder(self, labels):
        """The labelled folder ``test_dir``, read with the training layout arguments (sub-folders, mask_map,
        color_mode); whole images (with ``tiles``: at ``tiles × image_size``, the scale training saw)."""
        h = self.hparams
        if h.source == "volumes":
            return self._volumes(h.test_dir, mask_dir=h.mask_dir, num_classes=self.num_classes,
                                 in_channels=self.in_channels, image_size=h.image_size, labels=labels,
                                 augment="none", seed=h.seed, native_eval=bool(h.get("native_eval", True)))
        return FolderDataset(h.test_dir, image_dir=h.image_dir, mask_dir=h.mask_dir, instance_dir=h.instance_dir,
                             mask_map=h.mask_map, color_mode=h.color_mode, num_classes=self.num_classes,
                             in_channels=self.in_channels, image_size=h.image_size * int(h.get("tiles", 1)),
                             labels=labels, augment="none", seed=h.seed, resize=h.get("resize", "longest"),
                             native_eval=bool(h.get("native_eval", True)))

    def predict_dataloader(self):
        """The images of ``predict_dir`` (no labels, any size; :class:`~.predict.PredictDataset`, base view
        ``tiles × image_size``: the scale training saw), else the test set (or the validation split). Under DDP
        each image is predicted by one rank (filler samples carry ``pad``)."""
        h = self.hparams
        volumes = h.source == "volumes"
        if not h.get("predict_dir"):
            return self._eval_loader(self.test_dataset if self.test_dataset is not None else self.val_dataset,
                                     whole_volumes=volumes)
        from .predict import PredictDataset, predict_collate
        if volumes:  # the volumes of predict_dir itself, no labels; each rank predicts (and writes) whole volumes
            ds = self._volumes(h.predict_dir, image_dir=".", mask_dir=None, scribble_dir=None, labels=(),
                               num_classes=self.num_classes, in_channels=self.in_channels, image_size=h.image_size,
                               keep_native=True, augment="none")
            return self._eval_loader(ds, predict_collate, whole_volumes=True)
        ds = PredictDataset(h.predict_dir, in_channels=self.in_channels,
                            image_size=h.image_size * int(h.get("tiles", 1)),
                            resize=h.get("resize", "longest"), color_mode=h.color_mode, num_classes=self.num_classes)
        return self._eval_loader(ds, predict_collate)

    def train_eval_dataloader(self, batch_size: int | None = None):
        """The training samples in the base view, unshuffled and un-augmented (for pseudo-label makers)."""
        view = self.train_dataset.subset(self.train_dataset.indices, augment="none")
        return self._loader(view, False, batch_size or self.hparams.eval_batch_size)
