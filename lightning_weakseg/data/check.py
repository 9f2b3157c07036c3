"""The up-front data check: every sample of a folder data set read once, before the first training step.

:func:`check_folder` decodes every file completely (a truncated JPEG or PNG is an error, not an image half
grey), compares sizes, checks label values, boxes against their image, that every image has an entry in the
boxes file where boxes are trained on and that every entry names an image, and finds ambiguous encodings (masks
stored 0/255, where 255 means "unknown"). It collects **all** problems into one :class:`DataReport` instead of
stopping at the first, and notes what it handled (boxes overshooting by less than one pixel, clipped; weak
labels that the resize to the base view erases). Files are read in parallel threads; the report is cached under
a fingerprint of the files (names, sizes, modification times) and of the options, so a second run over
unchanged data costs a directory listing.

``WeakSegDataModule(on_bad_data="raise" | "skip")`` runs it in ``setup``; ``weakseg check --config ...`` prints
the same report without training.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable

import cv2
import numpy as np

from ..errors import WeakSegDataError
from .batch import IGNORE_INDEX
from .geometry import fit

__all__ = ["Finding", "DataReport", "check_folder", "default_cache_dir"]

CHECK_VERSION = 1


@dataclass(frozen=True)
class Finding:
    """One problem (or one handled irregularity) of one file: which sample, which file, which field, what."""
    sample: str | None
    file: str
    field: str
    message: str
    index: int | None = None   # raw index of the sample in its data set; None for a data-set-wide finding

    def __str__(self) -> str:
        who = self.file if self.sample is None else f"{self.file} (sample {self.sample})"
        return f"{who}, field '{self.field}': {self.message}"


@dataclass
class DataReport:
    """What :func:`check_folder` found. ``problems`` stop training (or their samples are skipped), ``notes``
    were handled and are counted (clipped boxes, weak labels erased by the resize)."""
    n_samples: int
    problems: list[Finding] = field(default_factory=list)
    notes: list[Finding] = field(default_factory=list)
    seconds: float = 0.0
    cached: bool = False

    @property
    def ok(self) -> bool:
        return not self.problems

    def bad_indices(self) -> set[int]:
        return {p.index for p in self.problems if p.index is not None}

    def dataset_wide(self) -> list[Finding]:
        return [p for p in self.problems if p.index is None]

    def format(self, limit: int = 50) -> str:
        head = (f"data check: {self.n_samples} samples, {len(self.problems)} problem(s) in "
                f"{len(self.bad_indices())} sample(s), {len(self.notes)} note(s) "
                f"({self.seconds:.2f} s{', cached' if self.cached else ''})")
        lines = [head]
        for title, items in (("problems", self.problems), ("handled", self.notes)):
            if items:
                lines.append(f"{title}:")
                lines += [f"  - {f}" for f in items[:limit]]
                if len(items) > limit:
                    lines.append(f"  ... and {len(items) - limit} more")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"n_samples": self.n_samples, "problems": [asdict(p) for p in self.problems],
                "notes": [asdict(n) for n in self.notes], "seconds": self.seconds}

    @classmethod
    def from_dict(cls, d: dict) -> "DataReport":
        return cls(d["n_samples"], [Finding(**p) for p in d["problems"]], [Finding(**n) for n in d["notes"]],
                   d.get("seconds", 0.0))

    def raise_if_bad(self) -> None:
        """One :class:`WeakSegDataError` listing every problem (its ``sample`` / ``field`` are those of the
        problem when there is only one)."""
        if not self.problems:
            return
        fields = {p.field for p in self.problems}
        one = self.problems[0] if len(self.problems) == 1 else None
        raise WeakSegDataError(self.format() + "\n(on_bad_data='skip' leaves the bad samples out)",
                               one.sample if one else None, fields.pop() if len(fields) == 1 else "data")


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "lightning_weakseg" / "data_check"


def _listing(d: Path) -> list[tuple[str, int, int]]:
    with os.scandir(d) as it:
        out = []
        for e in it:
            if e.is_file():
                st = e.stat()
                out.append((e.name, st.st_size, st.st_mtime_ns))
    return sorted(out)


def _fingerprint(ds, options: dict) -> str:
    h = hashlib.sha1()
    h.update(json.dumps({"version": CHECK_VERSION, **options}, sort_keys=True, default=str).encode())
    dirs = [ds.root / ds.image_dir_name] + [ds.root / d for d in ds.dirs.values() if d is not None]
    for d in dirs:
        h.update(str(d).encode())
        h.update(repr(_listing(d)).encode())
    if ds.boxes_path is not None:
        h.update(ds.boxes_path.read_bytes())
    h.update(repr(list(ds.ids)).encode())
    return h.hexdigest()


def _values(m: np.ndarray) -> np.ndarray:
    """Sorted distinct values of an integer label map (a histogram for 8-bit maps: faster than unique)."""
    if m.dtype == np.uint8 or (m.size and m.min() >= 0 and m.max() < 256):
        counts = np.bincount(m.ravel().astype(np.intp, copy=False), minlength=256)
        return np.flatnonzero(counts)
    return np.unique(m)


def _check_one(ds, i: int, boxes_trained: bool) -> tuple[list[Finding], list[Finding], set[int]]:
    stem = ds.ids[i]
    problems: list[Finding] = []
    notes: list[Finding] = []
    mask_values: set[int] = set()

    def problem(e: WeakSegDataError, default_file: str, fld: str):
        msg = str(e).split("] ", 1)[-1] if str(e).startswith("[") else str(e)
        file = e.sample if isinstance(e.sample, str) and (os.sep in e.sample or "." in e.sample) else default_file
        problems.append(Finding(stem, str(file), e.field or fld, msg, i))

    img_path = ds.files[i]
    try:
        from .folder import decode
        img = decode(img_path, "image")  # complete decode; the float conversion of training is not needed here
    except WeakSegDataError as e:
        problem(e, str(img_path), "image")
        return problems, notes, mask_values
    h0, w0 = img.shape[:2]
    c = 1 if img.ndim == 2 else min(img.shape[2], 3)
    c = {"rgb": 3 if c in (1, 3) else c, "gray": 1}.get(ds.color_mode, c)
    if img.dtype not in (np.uint8, np.uint16, np.float32, np.float64):
        problems.append(Finding(stem, str(img_path), "image", f"unsupported pixel type {img.dtype}", i))
    if c != ds.in_channels:
        problems.append(Finding(stem, str(img_path), "image", f"expected {ds.in_channels} channel(s) (in_channels), "
                                f"got {c}; color_mode='rgb' or 'gray' converts", i))
    if img.dtype.kind == "f" and not np.isfinite(img).all():
        problems.append(Finding(stem, str(img_path), "image", "NaN or infinite pixel values", i))
    H, W = ds.image_hw
    try:
        g = fit(h0, w0, H, W, ds.resize)
    except ValueError as e:
        problems.append(Finding(stem, str(img_path), "image", str(e), i))
        g = None
    for key, d in ds.dirs.items():
        if d is None:
            continue
        try:
            path = ds.label_path(i, key)
            m = ds.read_label(i, key, (h0, w0))
        except WeakSegDataError as e:
            problem(e, str(ds.root / d / stem), key)
            continue
        if key == "instances":
            continue  # any id >= 0; read_label_map already checked the file
        vals = _values(m)
        bad = vals[((vals < 0) | (vals >= ds.num_classes)) & (vals != IGNORE_INDEX)]
        if bad.size:
            problems.append(Finding(stem, str(path), key, f"expected class ids in [0, {ds.num_classes}) or "
                                    f"{IGNORE_INDEX} (unknown), got values {bad[:8].tolist()}"
                                    + (" (mask_map remaps values)" if key == "mask" else ""), i))
        if key == "mask":
            mask_values.update(vals.tolist())
        if key == "scribble" and g is not None and (g.h, g.w) != (h0, w0):
            small = cv2.resize(m.astype(np.uint8), (g.w, g.h), interpolation=cv2.INTER_NEAREST)
            lost = sorted(set(vals.tolist()) - set(_values(small).tolist()) - {IGNORE_INDEX})
            if lost:
                notes.append(Finding(stem, str(path), key, f"resizing {h0}x{w0} to {g.h}x{g.w} erases the "
                                     f"scribble of class(es) {lost} (thinner than a pixel there)", i))
    if ds.boxes is not None and (boxes_trained or stem in ds._box_index()):
        try:
            b, clipped = ds.box_rows(i, h0, w0)
            if clipped:
                notes.append(Finding(stem, str(ds.boxes_path), "boxes", f"{clipped} box(es) overshooting the "
                                     f"{w0}x{h0} image by less than one pixel clipped to it", i))
            if g is not None and len(b):
                small = ((b[:, 3] - b[:, 1]) * g.sx < 1) | ((b[:, 4] - b[:, 2]) * g.sy < 1)
                if small.any():
                    notes.append(Finding(stem, str(ds.boxes_path), "boxes", f"{int(small.sum())} box(es) "
                                         f"narrower than one pixel at the base view {g.h}x{g.w}", i))
        except WeakSegDataError as e:
            problem(e, str(ds.boxes_path), "boxes")
    return problems, notes, mask_values


def check_folder(ds, boxes_trained: bool = False, workers: int | None = None, cache_dir: str | Path | None = None,
                 use_cache: bool = True, indices: Iterable[int] | None = None) -> DataReport:
    """Check every sample of a :class:`~lightning_weakseg.data.folder.FolderDataset` (see the module docstring).

    Args:
        ds: the folder data set (its options — classes, channels, colour mode, ``mask_map``, base view, resize —
            are the ones checked against).
        boxes_trained: boxes are trained on: every image needs an entry in the boxes file.
        workers: reader threads (default: the CPU count, at most 8).
        cache_dir: where reports are cached (default: ``$XDG_CACHE_HOME/lightning_weakseg/data_check``).
        use_cache: read and write the cache.
        indices: raw indices to check (default: all).
    """
    t0 = time.perf_counter()
    idx = list(range(len(ds.files))) if indices is None else list(indices)
    options = {"num_classes": ds.num_classes, "in_channels": ds.in_channels, "color_mode": ds.color_mode,
               "mask_map": sorted(ds.mask_map.items()), "image_hw": list(ds.image_hw), "resize": ds.resize,
               "box_class": ds.box_class, "boxes_trained": bool(boxes_trained), "indices": idx}
    cache_file = None
    if use_cache:
        cache_file = Path(cache_dir or default_cache_dir()) / f"{_fingerprint(ds, options)}.json"
        if cache_file.exists():
            try:
                report = DataReport.from_dict(json.loads(cache_file.read_text()))
                report.cached, report.seconds = True, time.perf_counter() - t0
                return report
            except (OSError, ValueError, KeyError, TypeError):
                pass  # an unreadable cache entry is recomputed
    workers = workers or min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = list(pool.map(lambda i: _check_one(ds, i, boxes_trained), idx))
    report = DataReport(len(idx))
    values: set[int] = set()
    for probs, notes, vals in results:
        report.problems += probs
        report.notes += notes
        values |= vals
    if ds.dirs.get("mask") is not None and values and IGNORE_INDEX in values \
            and not (values - {0, IGNORE_INDEX}):
        report.problems.insert(0, Finding(
            None, str(ds.root / ds.dirs["mask"]), "mask",
            f"every mask holds only the values 0 and {IGNORE_INDEX}; {IGNORE_INDEX} means 'unknown', so no pixel "
            f"would be trained or scored as foreground. For binary masks stored 0/255 pass mask_map={{255: 1}}"))
    unknown = ds.unknown_box_keys()
    if unknown:
        stems = {p.stem for p in ds.all_files}
        hint = ""
        near = [k for k in unknown if Path(k).stem in stems]
        if near:
            hint = f" (e.g. '{near[0]}': the image is '{Path(near[0]).stem}' with another extension)"
        report.problems.insert(0, Finding(
            None, str(ds.boxes_path), "boxes",
            f"{len(unknown)} entr{'y' if len(unknown) == 1 else 'ies'} name no image of {ds.root / ds.image_dir_name}"
            f": {unknown[:5]}{hint}; keys are file stems or file names"))
    report.seconds = time.perf_counter() - t0
    if cache_file is not None:
        try:
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=cache_file.parent, suffix=".tmp")
            with os.fdopen(fd, "w") as f:
                json.dump(report.to_dict(), f)
            os.replace(tmp, cache_file)
        except OSError:
            pass  # a read-only cache location only costs the next run its speed
    return report
