"""NIfTI volumes (``.nii``, ``.nii.gz``, read with nibabel) as 2D slices: every regime trains on them unchanged.

Layout, matched by volume name (the file name without ``.nii`` / ``.nii.gz``)::

    root/images/<name>.nii.gz       intensities, any integer or float type, 3D
    root/labels/<name>.nii.gz       class ids (255 = unknown), the image's grid
    root/scribbles/<name>.nii.gz    class ids, 255 = unlabelled

:class:`VolumeDataset` serves slice ``k`` along ``slice_axis`` of every volume as one sample: ``load_raw`` returns the
slice image float32 (H,W,1) and its label slices, so resizing, weak labels derived from the mask (boxes, points,
tags: :mod:`~lightning_weakseg.data.weakify`, per slice), augmentation and validation are those of every other data
set. Each sample also carries

* ``volume`` — the volume's name (str), ``slice`` — the slice index ``k`` (int);
* ``spacing`` — float (3,) voxel size in mm from the header (``header.get_zooms()``) in the order (slice axis, H, W);
  files without a physical spacing give 1 (distances in voxels). The affine and header of each volume are kept
  (:meth:`VolumeDataset.volume_meta`) for writing predictions back
  (:class:`~lightning_weakseg.callbacks.MaskWriter`).

Each volume's intensities are normalised once, over the whole volume (``volume_norm``): ``"percentile"`` clips to
the 0.5th–99.5th percentiles and scales to [0, 1] (robust to the few very bright voxels MR volumes hold),
``"zscore"`` subtracts the mean and divides by the standard deviation (values leave [0, 1]),
``"none"`` keeps them. Decoded, normalised volumes are kept in a small LRU cache, so consecutive slices of one
volume cost one NIfTI decode.

Splits are by volume (``groups``, or a regex of the name such as ``^(patient\\d+)``: both frames of one patient stay
in one split). :func:`check_volumes` is the up-front check: shapes, dimensions, label values and spacing, with
errors naming the file and field.
"""
from __future__ import annotations

import math
import os
import re
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, DistributedSampler

from ..errors import WeakSegDataError
from .batch import IGNORE_INDEX
from .check import DataReport, Finding
from .dataset import WeakSegDataset

__all__ = ["VOLUME_EXTS", "VOLUME_NORMS", "volume_name", "read_volume", "normalise_volume", "volume_bytes",
           "VolumeDataset", "WholeVolumeSampler", "VolumeReport", "check_volumes"]

VOLUME_EXTS = (".nii.gz", ".nii")
VOLUME_NORMS = ("percentile", "zscore", "none")
PERCENTILES = (0.5, 99.5)


def volume_name(path: str | Path) -> str | None:
    """The file name without its NIfTI extension (``a.nii.gz`` → ``a``); ``None`` for other files."""
    name = Path(path).name
    for ext in VOLUME_EXTS:
        if name.lower().endswith(ext) and len(name) > len(ext):
            return name[: -len(ext)]
    return None


def read_volume(path: str | Path, field: str = "image", header_only: bool = False):
    """``nibabel`` image of a NIfTI file, with its data as an array unless ``header_only``: ``(img, array | None)``.
    An unreadable file or one that is not 3D (a 4D file with one volume is taken as 3D) is a
    :class:`WeakSegDataError` naming the file and field."""
    import nibabel as nib

    try:
        img = nib.load(str(path))
    except Exception as e:  # noqa: BLE001 - nibabel raises many types for a broken file
        raise WeakSegDataError(f"cannot read this file as NIfTI: {e}", str(path), field) from None
    shape = tuple(img.shape)
    if len(shape) == 4 and shape[3] == 1:
        shape = shape[:3]
    if len(shape) != 3:
        raise WeakSegDataError(f"expected a 3D volume, got shape {tuple(img.shape)}", str(path), field)
    if header_only:
        return img, None
    try:
        data = np.asanyarray(img.dataobj)
    except Exception as e:  # noqa: BLE001 - truncated gzip, short data, ...
        raise WeakSegDataError(f"cannot decode this file's data: {e}", str(path), field) from None
    return img, data.reshape(shape)


def normalise_volume(volume: np.ndarray, mode: str = "percentile") -> np.ndarray:
    """One volume's intensities as float32: ``"percentile"`` — clipped to its 0.5th–99.5th percentiles and scaled
    to [0, 1] (a constant volume gives zeros); ``"zscore"`` — zero mean, unit standard deviation; ``"none"``.

    >>> normalise_volume(np.arange(1001.0)).round(3)[[0, 5, 500, 995, 1000]]
    array([0. , 0. , 0.5, 1. , 1. ], dtype=float32)
    """
    v = np.asarray(volume, np.float32)
    if mode == "none":
        return v
    if mode == "percentile":
        lo, hi = np.percentile(v, PERCENTILES)
        if not hi > lo:
            return np.zeros_like(v)
        return np.clip((v - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)
    if mode == "zscore":
        std = float(v.std())
        return ((v - float(v.mean())) / (std if std > 0 else 1.0)).astype(np.float32)
    raise ValueError(f"volume_norm must be one of {VOLUME_NORMS}, got {mode!r}")


def volume_bytes(labels: np.ndarray, meta: dict[str, Any], gzip_level: int = 6) -> bytes:
    """A label volume (slices, H, W) as the bytes of a NIfTI file on the input's grid: the slice axis moved back to
    ``meta["slice_axis"]``, the input's affine and header (:meth:`VolumeDataset.volume_meta`), uint8 voxels without
    intensity scaling; gzip-compressed when the input's file name ends in ``.gz``."""
    import gzip

    data = np.moveaxis(np.asarray(labels), 0, meta["slice_axis"])
    if tuple(data.shape) != tuple(meta["shape"]):
        raise ValueError(f"{meta['file']}: the predicted volume is {tuple(data.shape)}, the input's grid "
                         f"{tuple(meta['shape'])}")
    if data.size and (data.min() < 0 or data.max() > 255):
        raise ValueError(f"{meta['file']}: class ids {int(data.min())}..{int(data.max())} do not fit uint8")
    header = meta["header"].copy()
    header.set_data_dtype(np.uint8)
    img = meta["image_class"](data.astype(np.uint8), meta["affine"], header)
    img.header.set_slope_inter(1.0, 0.0)  # class ids as stored, whatever scaling the intensities had
    raw = img.to_bytes()
    return gzip.compress(raw, compresslevel=gzip_level, mtime=0) if str(meta["file"]).lower().endswith(".gz") else raw


def _label_array(data: np.ndarray, path, field: str) -> np.ndarray:
    """Integer class ids of a label volume (stored as any integer or integer-valued float type)."""
    if data.dtype.kind == "f":
        if not np.isfinite(data).all() or (data != np.round(data)).any():
            raise WeakSegDataError("expected integer labels, got non-integer values", str(path), field)
    elif data.dtype.kind not in "iub":
        raise WeakSegDataError(f"unsupported label type {data.dtype}", str(path), field)
    if data.size and (data.min() < 0 or data.max() > 255):
        return data.astype(np.int64)
    return data.astype(np.uint8)


class VolumeDataset(WeakSegDataset):
    """Slices of the NIfTI volumes in ``root/image_dir`` with labels from sibling folders (see the module
    docstring). Raw index ``i`` is slice ``slices[i] = (volume index, k)``; volumes are in name order and the
    slices of each in order, so the raw indices of one volume are consecutive.

    Args:
        root: the data folder.
        image_dir / mask_dir / scribble_dir: sub-folders of volumes (``None``: not available). ``mask_dir`` holds
            full label volumes (boxes, points, tags are derived from their slices), ``scribble_dir`` scribbles.
        slice_axis: the axis of the array that indexes slices (2: the last, for H × W × slices files).
        volume_norm: ``"percentile"`` (default), ``"zscore"`` or ``"none"`` (:func:`normalise_volume`).
        names: optional subset of volume names.
        cache_volumes: decoded volumes kept in memory (least recently used dropped first).
        keep_native: unlabelled samples (prediction) also carry ``native_image``, the slice at its own size.
        Other arguments: see :class:`~lightning_weakseg.data.dataset.WeakSegDataset`.
    """

    def __init__(self, root: str | Path, image_dir: str = "images", mask_dir: str | None = "labels",
                 scribble_dir: str | None = None, slice_axis: int = 2, volume_norm: str = "percentile",
                 names: Sequence[str] | None = None, cache_volumes: int = 8, keep_native: bool = False, **kwargs):
        super().__init__(**kwargs)
        if volume_norm not in VOLUME_NORMS:
            raise ValueError(f"volume_norm must be one of {VOLUME_NORMS}, got {volume_norm!r}")
        if slice_axis not in (0, 1, 2, -1, -2, -3):
            raise ValueError(f"slice_axis must be 0, 1 or 2 (a 3D volume's axes), got {slice_axis!r}")
        self.root = Path(root)
        img_root = self.root / image_dir
        if not img_root.is_dir():
            raise WeakSegDataError(f"volume folder {img_root} does not exist", None, "image_dir")
        files = sorted(p for p in img_root.iterdir() if p.is_file() and volume_name(p) is not None)
        if names is not None:
            wanted = set(names)
            files = [p for p in files if volume_name(p) in wanted]
        if not files:
            raise WeakSegDataError(f"no NIfTI volumes ({', '.join(VOLUME_EXTS)}) in {img_root}", None, "image_dir")
        vnames = [volume_name(p) for p in files]
        dup = sorted({n for n in vnames if vnames.count(n) > 1})
        if dup:
            raise WeakSegDataError(f"several files share the volume names {dup[:5]} (e.g. a.nii and a.nii.gz)", None,
                                   "image_dir")
        self.files, self.names = files, vnames
        self.dirs = {"mask": mask_dir, "scribble": scribble_dir}
        for key, d in self.dirs.items():
            if d is not None and not (self.root / d).is_dir():
                raise WeakSegDataError(f"folder {self.root / d} does not exist", None, f"{key}_dir")
        self.image_dir_name = image_dir
        self.slice_axis = slice_axis % 3
        self.volume_norm = volume_norm
        self.keep_native = keep_native
        self.cache_volumes = max(int(cache_volumes), 1)
        self._cache: OrderedDict[int, dict] = OrderedDict()
        self._cache_lock = threading.Lock()
        self.decodes = 0  # NIfTI image decodes so far (the cache's effect is visible in it)
        self._headers: list[dict] = []
        self.slices: list[tuple[int, int]] = []
        self._first: list[int] = []
        for v, path in enumerate(files):
            img, _ = read_volume(path, "image", header_only=True)
            shape = tuple(img.shape[:3])
            zooms = tuple(float(z) for z in img.header.get_zooms()[:3])
            if len(zooms) < 3 or not all(math.isfinite(z) and z > 0 for z in zooms):
                zooms = (1.0, 1.0, 1.0)  # no physical spacing: distances in voxels
            in_plane = [a for a in range(3) if a != self.slice_axis]
            self._headers.append({"shape": shape, "zooms": zooms, "affine": np.asarray(img.affine, np.float64),
                                  "header": img.header.copy(), "image_class": type(img),
                                  "spacing": np.asarray([zooms[self.slice_axis]] + [zooms[a] for a in in_plane],
                                                        np.float32)})
            self._first.append(len(self.slices))
            self.slices += [(v, k) for k in range(shape[self.slice_axis])]

    def __copy__(self) -> "VolumeDataset":
        # views (subset) share the volume cache and its lock
        new = object.__new__(type(self))
        new.__dict__.update(self.__dict__)
        return new

    def __getstate__(self) -> dict:
        # a DataLoader worker gets its own (empty) cache; a lock does not pickle
        state = dict(self.__dict__)
        state["_cache"] = OrderedDict()
        state.pop("_cache_lock", None)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._cache_lock = threading.Lock()

    # ---- indexing ----
    def raw_length(self) -> int:
        return len(self.slices)

    def sample_id(self, i: int) -> str:
        v, k = self.slices[i]
        return f"{self.names[v]}_slice_{k}"

    def volume_of(self, i: int) -> str:
        """The volume name of raw index ``i``."""
        return self.names[self.slices[i][0]]

    def raw_indices_of(self, name: str) -> list[int]:
        """The raw indices of volume ``name``'s slices, in slice order."""
        v = self.names.index(name)
        return list(range(self._first[v], self._first[v] + self._headers[v]["shape"][self.slice_axis]))

    def groups(self, regex: str | None = None) -> list[str]:
        """The split group of every slice: its volume's name, or the regex's first group (whole match without
        groups) of the name, e.g. ``^(patient\\d+)`` to keep a patient's frames together."""
        pat = re.compile(regex) if regex is not None else None
        per_volume = []
        for n in self.names:
            m = pat.search(n) if pat is not None else None
            per_volume.append(n if m is None else (m.group(1) if m.groups() else m.group(0)))
        return [per_volume[v] for v, _ in self.slices]

    def volume_meta(self, name: str) -> dict[str, Any]:
        """What writing a prediction of volume ``name`` back needs: ``file`` (the image's path), ``shape`` (its
        array shape), ``affine``, ``header`` (a copy), ``image_class`` (nibabel's), ``slice_axis``, ``spacing``
        (slice axis, H, W) and ``slices`` (how many slices of it this view serves)."""
        v = self.names.index(name)
        meta = self._headers[v]
        raw = set(self.raw_indices_of(name))
        served = len(raw) if self.indices is None else sum(1 for i in self.indices if i in raw)
        return {"file": self.files[v], "shape": meta["shape"], "affine": meta["affine"].copy(),
                "header": meta["header"].copy(), "image_class": meta["image_class"], "slice_axis": self.slice_axis,
                "spacing": meta["spacing"].copy(), "slices": served}

    def spacing(self, v: int) -> np.ndarray:
        return self._headers[v]["spacing"]

    # ---- reading ----
    def label_path(self, v: int, key: str) -> Path:
        d = self.root / self.dirs[key]
        for ext in VOLUME_EXTS:
            p = d / f"{self.names[v]}{ext}"
            if p.exists():
                return p
        raise WeakSegDataError(f"no {key} volume for this image in {d} ({self.names[v]}.nii.gz or .nii)",
                               self.names[v], key)

    def read_label_volume(self, v: int, key: str) -> np.ndarray:
        """Label volume ``key`` (``mask``, ``scribble``) of volume ``v`` in its file's layout; its shape must be the
        image's."""
        path = self.label_path(v, key)
        _, data = read_volume(path, key)
        shape = self._headers[v]["shape"]
        if data.shape != shape:
            raise WeakSegDataError(f"shape {data.shape} differs from the image's {shape}", str(path), key)
        return _label_array(data, path, key)

    def _volume(self, v: int) -> dict[str, np.ndarray]:
        """Volume ``v`` decoded, normalised and moved to (slices, H, W), with its label volumes; LRU-cached."""
        with self._cache_lock:
            hit = self._cache.get(v)
            if hit is not None:
                self._cache.move_to_end(v)
                return hit
        _, data = read_volume(self.files[v], "image")
        if data.dtype.kind == "f" and not np.isfinite(data).all():
            raise WeakSegDataError(f"{int((~np.isfinite(data)).sum())} voxel values are NaN or infinite",
                                   str(self.files[v]), "image")
        entry = {"image": np.ascontiguousarray(np.moveaxis(normalise_volume(data, self.volume_norm),
                                                           self.slice_axis, 0))}
        for key, d in self.dirs.items():
            if d is not None:
                entry[key] = np.ascontiguousarray(np.moveaxis(self.read_label_volume(v, key), self.slice_axis, 0))
        with self._cache_lock:
            self.decodes += 1
            self._cache[v] = entry
            self._cache.move_to_end(v)
            while len(self._cache) > self.cache_volumes:
                self._cache.popitem(last=False)
        return entry

    def load_raw(self, i: int) -> dict:
        v, k = self.slices[i]
        vol = self._volume(v)
        raw = {"image": vol["image"][k][..., None]}
        for key in self.dirs:
            if key in vol:
                raw[key] = vol[key][k].astype(np.int64)
        return raw

    def drop_empty_slices(self, indices: Sequence[int], rate: float, seed: int = 0) -> list[int]:
        """``indices`` with the slices whose mask holds no foreground kept at ``rate`` (a seeded subset of
        ``round(rate · n_empty)`` of them; 1 keeps all, 0 none); the others all kept, order preserved."""
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"empty_slice_rate must be in [0, 1], got {rate}")
        indices = [int(i) for i in indices]
        if rate >= 1.0:
            return indices
        if self.dirs.get("mask") is None:
            raise ValueError("empty_slice_rate < 1 needs label volumes (mask_dir) to tell empty slices")
        foreground: dict[int, np.ndarray] = {}
        empty = []
        for i in indices:
            v, k = self.slices[i]
            if v not in foreground:
                m = np.moveaxis(self.read_label_volume(v, "mask"), self.slice_axis, 0)
                fg = (m > 0) & (m != IGNORE_INDEX)
                foreground[v] = fg.reshape(fg.shape[0], -1).any(1)
            if not foreground[v][k]:
                empty.append(i)
        n_keep = int(round(rate * len(empty)))
        rng = np.random.default_rng([seed, 17])
        keep_empty = set(rng.choice(empty, n_keep, replace=False).tolist()) if n_keep else set()
        empty_set = set(empty)
        return [i for i in indices if i not in empty_set or i in keep_empty]

    # ---- samples ----
    def _unlabelled(self, raw_i: int) -> dict[str, Any]:
        """A prediction sample (no labels): the base view, the geometry back to the slice's size, optionally the
        slice at its own size (``native_image``), as :class:`~lightning_weakseg.data.predict.PredictDataset`."""
        name = self.sample_id(raw_i)
        raw = self.load_raw(raw_i)
        raw = {"image": raw["image"]}
        self.check_raw(raw, name)
        return self.unlabelled_sample(raw, name, raw_i, self.keep_native)

    def _getitem(self, i: int) -> dict[str, Any]:
        raw_i = self.raw_index(int(i))
        # a view without labels (prediction) skips the label pipeline; a slice planned without labels
        # (label_fractions "none") is a training image and goes through it (augmentation) like the others
        unlabelled_view = not self.keys_for(raw_i) and self.label_plan is None
        out = self._unlabelled(raw_i) if unlabelled_view else super()._getitem(i)
        out.update(self.sample_meta(raw_i))
        return out

    def sample_meta(self, i: int) -> dict[str, Any]:
        v, k = self.slices[i]
        return {"volume": self.names[v], "slice": k, "spacing": torch.from_numpy(self.spacing(v).copy())}


class WholeVolumeSampler(DistributedSampler):
    """Prediction shards under DDP that hold whole volumes: each rank predicts all slices of the volumes it is given
    (so it can write them without gathering), volumes dealt largest first to the least loaded rank. Shards are
    evened out with indices ``>= len`` that :class:`~lightning_weakseg.data.sampling.PadFlagged` turns into filler
    samples flagged ``pad`` (never predicted, never written).

    ``dataset`` must tell each position's volume (``volume_of(raw_index(i))``, as :class:`VolumeDataset` does)."""

    def __init__(self, dataset: Dataset, world: int | None = None, rank: int | None = None):
        from .sampling import _world
        w, r = _world()
        world, rank = world or w, r if rank is None else rank
        super().__init__(dataset, num_replicas=world, rank=rank, shuffle=False, drop_last=False)
        n = len(dataset)
        raw_index = getattr(dataset, "raw_index", lambda i: i)
        by_volume: OrderedDict[str, list[int]] = OrderedDict()
        for i in range(n):
            by_volume.setdefault(dataset.volume_of(raw_index(i)), []).append(i)
        shards: list[list[int]] = [[] for _ in range(world)]
        for _, positions in sorted(by_volume.items(), key=lambda kv: (-len(kv[1]), kv[1][0])):
            target = min(range(world), key=lambda j: (len(shards[j]), j))
            shards[target] += positions
        self.n = n
        self.shard = sorted(shards[rank])
        self.length = max((len(s) for s in shards), default=0)

    def __iter__(self) -> Iterator[int]:
        filler = self.n + (self.shard[0] if self.shard else 0)
        return iter(self.shard + [filler] * (self.length - len(self.shard)))

    def __len__(self) -> int:
        return self.length


@dataclass
class VolumeReport(DataReport):
    """A :class:`~lightning_weakseg.data.check.DataReport` over volumes: a problem of a volume marks all its
    slices bad (``bad_indices`` are slice raw indices)."""
    slices_of: dict[int, list[int]] = field(default_factory=dict)

    def bad_indices(self) -> set[int]:
        out: set[int] = set()
        for p in self.problems:
            if p.index is not None:
                out.update(self.slices_of.get(p.index, [p.index]))
        return out

    def format(self, limit: int = 50) -> str:
        lines = super().format(limit).split("\n")
        bad = {p.sample for p in self.problems if p.index is not None}
        lines[0] = (f"data check: {self.n_samples} volumes, {len(self.problems)} problem(s) in {len(bad)} volume(s), "
                    f"{len(self.notes)} note(s) ({self.seconds:.2f} s)")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {**super().to_dict(), "unit": "volumes"}


def _check_volume(ds: VolumeDataset, v: int) -> list[Finding]:
    name, first = ds.names[v], ds._first[v]
    found: list[Finding] = []
    meta = ds._headers[v]
    img_path = ds.files[v]
    try:
        img, data = read_volume(img_path, "image", header_only=True)
        if img.get_data_dtype().kind == "f":  # integer voxels are finite: decode only float volumes
            _, data = read_volume(img_path, "image")
            if not np.isfinite(data).all():
                found.append(Finding(name, str(img_path), "image", f"{int((~np.isfinite(data)).sum())} voxel values "
                                     "are NaN or infinite", first))
        elif img.get_data_dtype().kind not in "iub":
            found.append(Finding(name, str(img_path), "image", f"unsupported voxel type {img.get_data_dtype()}", first))
    except WeakSegDataError as e:
        found.append(Finding(name, str(img_path), "image", str(e).split("] ", 1)[-1], first))
        return found
    zooms = tuple(float(z) for z in img.header.get_zooms()[:3])
    if not all(math.isfinite(z) and z > 0 for z in zooms):
        found.append(Finding(name, str(img_path), "spacing", f"header voxel sizes {zooms} are not positive numbers; "
                             "distances are taken in voxels", None))
    for key, d in ds.dirs.items():
        if d is None:
            continue
        try:
            path = ds.label_path(v, key)
        except WeakSegDataError as e:
            found.append(Finding(name, str(ds.root / d / f"{name}.nii.gz"), key, str(e).split("] ", 1)[-1], first))
            continue
        try:
            lab_img, data = read_volume(path, key)
        except WeakSegDataError as e:
            found.append(Finding(name, str(path), key, str(e).split("] ", 1)[-1], first))
            continue
        if data.shape != meta["shape"]:
            found.append(Finding(name, str(path), key, f"shape {data.shape} differs from the image's "
                                 f"{meta['shape']} ({img_path.name})", first))
            continue
        try:
            lab = _label_array(data, path, key)
        except WeakSegDataError as e:
            found.append(Finding(name, str(path), key, str(e).split("] ", 1)[-1], first))
            continue
        vals = np.flatnonzero(np.bincount(lab.ravel().astype(np.intp), minlength=256)) if lab.dtype == np.uint8 \
            else np.unique(lab)
        bad = vals[((vals < 0) | (vals >= ds.num_classes)) & (vals != IGNORE_INDEX)]
        if bad.size:
            found.append(Finding(name, str(path), key, f"expected class ids in [0, {ds.num_classes}) or "
                                 f"{IGNORE_INDEX} (unknown), got values {bad[:8].tolist()}", first))
        lab_zooms = tuple(float(z) for z in lab_img.header.get_zooms()[:3])
        if not np.allclose(lab_zooms, zooms, rtol=1e-4):
            found.append(Finding(name, str(path), key, f"voxel sizes {lab_zooms} differ from the image's {zooms}; the "
                                 "image's are used", None))
    return found


def check_volumes(ds: VolumeDataset, workers: int | None = None) -> VolumeReport:
    """The up-front check of a :class:`VolumeDataset`: every image header is 3D and readable (float volumes decoded:
    finite voxels), in_channels is 1, every label volume exists, decodes, has the image's shape and holds class
    ids in ``[0, num_classes)`` or 255; differing voxel sizes between image and labels are noted. One problem
    marks the whole volume bad (``on_bad_data="skip"`` leaves all its slices out)."""
    t0 = time.perf_counter()
    report = VolumeReport(len(ds.names), slices_of={ds._first[v]: ds.raw_indices_of(n) for v, n in
                                                   enumerate(ds.names)})
    if ds.in_channels != 1:
        report.problems.append(Finding(None, str(ds.root / ds.image_dir_name), "image",
                                       f"volumes give one channel per slice; in_channels is {ds.in_channels}"))
    workers = workers or min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = list(pool.map(lambda v: _check_volume(ds, v), range(len(ds.names))))
    for found in results:
        for f in found:
            (report.problems if f.index is not None else report.notes).append(f)
    report.seconds = time.perf_counter() - t0
    return report
