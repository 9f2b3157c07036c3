"""Property-based bad-input fuzzing (hypothesis) of the batch validator, collate and the folder loader.

Every generated case ends either in a correct result or in a :class:`WeakSegDataError` that names the sample and
the field we broke — never an IndexError/TypeError/RuntimeError, and a batch that passes ``validate_batch`` gives
finite loss terms and finite gradients in every regime module.

The generator draws a valid sample first (random sizes, dtypes, label kinds, boxes touching the border, fractional
points, empty lists ...) and then, maybe, injects exactly one fault whose field it knows: the oracle is the
injection, not the code under test.
"""
from __future__ import annotations

import importlib
import json
import os
import tempfile

import cv2
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from lightning_weakseg.data import FolderDataset, collate, validate_batch, validate_sample
from lightning_weakseg.errors import WeakSegDataError





FAST = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)

# ------------------------------------------------------------------ sample generator

SAMPLE_FAULTS = {
    "image": ["nan", "inf", "ndim", "channels", "int32", "empty", "string", "f64_overflow"],
    "mask": ["too_big", "negative", "shape", "fraction", "nan", "string", "complex"],
    "noisy_mask": ["too_big"],
    "scribble": ["shape"],
    "instances": ["negative"],
    "tags": ["length", "two", "nan"],
    "boxes": ["nan", "degenerate", "outside", "class", "width", "ragged", "inf"],
    "points": ["outside", "nan", "class", "width", "negative"],
    "labels": ["none"],
}
FAULTS = [(f, k) for f, ks in SAMPLE_FAULTS.items() for k in ks]


def valid_sample(rng: np.random.Generator, h: int, w: int, c: int, k: int, keys: list[str]) -> dict:
    dtype = rng.choice(["f32", "f64", "u8", "f16"])
    img = rng.random((c, h, w))
    img = (img * 255).astype(np.uint8) if dtype == "u8" else img.astype({"f32": np.float32, "f64": np.float64,
                                                                          "f16": np.float16}[dtype])
    s: dict = {"image": torch.from_numpy(img) if rng.random() < 0.5 else img, "id": f"s{rng.integers(1e6)}"}
    for key in ("mask", "noisy_mask", "scribble"):
        if key in keys:
            m = rng.integers(0, k, (h, w))
            m[rng.random((h, w)) < 0.3] = 255
            s[key] = m.astype(rng.choice([np.int64, np.uint8, np.int32, np.uint16, np.float32]))
    if "instances" in keys:
        s["instances"] = rng.integers(0, 5, (h, w)).astype(rng.choice([np.int64, np.uint16]))
    if "tags" in keys:
        s["tags"] = rng.integers(0, 2, k).astype(rng.choice([np.float32, np.int64, bool]))
    if "boxes" in keys:
        n = int(rng.integers(0, 4))
        x0 = rng.uniform(0, w - 1, n) if rng.random() < 0.5 else rng.integers(0, w, n).astype(float)
        y0 = rng.uniform(0, h - 1, n) if rng.random() < 0.5 else rng.integers(0, h, n).astype(float)
        x1 = np.minimum(w, x0 + rng.uniform(0.25, w, n))  # may touch the border: x1 == W is allowed
        y1 = np.minimum(h, y0 + rng.uniform(0.25, h, n))
        s["boxes"] = np.stack([rng.integers(0, k, n), x0, y0, x1, y1], 1).astype(np.float32).reshape(n, 5)
    if "points" in keys:
        n = int(rng.integers(0, 5))
        pts = np.stack([rng.integers(0, k, n), rng.uniform(0, h - 1, n), rng.uniform(0, w - 1, n)], 1)
        if n and rng.random() < 0.5:
            pts[:, 1:] = np.round(pts[:, 1:])
        s["points"] = pts.reshape(n, 3).astype(np.float32)
    return s


def inject(s: dict, fault: tuple[str, str], rng: np.random.Generator, k: int, c: int) -> dict:
    field, kind = fault
    s = dict(s)
    img = np.asarray(s["image"]).astype(np.float32)
    h, w = img.shape[1:]
    if field == "image":
        bad = {"nan": lambda: np.where(rng.random(img.shape) < 0.5, np.nan, img).astype(np.float32) + np.where(
                   np.arange(img.size).reshape(img.shape) == 0, np.nan, 0).astype(np.float32),
               "inf": lambda: np.full_like(img, -np.inf),
               "ndim": lambda: img[0],
               "channels": lambda: np.repeat(img, 2, 0),
               "int32": lambda: img.astype(np.int32),
               "empty": lambda: img[:, :0],
               "string": lambda: "image.png",
               "f64_overflow": lambda: np.full(img.shape, 1e300)}[kind]()
        s["image"] = bad
    elif field in ("mask", "noisy_mask", "scribble", "instances"):
        m = np.asarray(s.get(field, np.zeros((h, w), np.int64))).astype(np.int64)
        if kind == "too_big":
            m[rng.integers(h), rng.integers(w)] = rng.choice([k, k + 7, 254, 256, 10 ** 12])
        elif kind == "negative":
            m[rng.integers(h), rng.integers(w)] = -1
        elif kind == "shape":
            m = np.zeros((h + 1, w), np.int64)
        elif kind == "fraction":
            m = m.astype(np.float32)
            m[rng.integers(h), rng.integers(w)] = 0.5
        elif kind == "nan":
            m = m.astype(np.float32)
            m[0, 0] = np.nan
        elif kind == "string":
            m = [["a"] * w] * h
        elif kind == "complex":
            m = m.astype(np.complex64)
        s[field] = m
    elif field == "tags":
        t = np.zeros(k, np.float32)
        s["tags"] = {"length": lambda: np.zeros(k + 1, np.float32), "two": lambda: np.where(t == 0, 2.0, t),
                     "nan": lambda: np.full(k, np.nan)}[kind]()
    elif field == "boxes":
        good = [0, 0.0, 0.0, min(2.0, w), min(2.0, h)]
        row = {"nan": [0, np.nan, 0, 1, 1], "inf": [0, 0, 0, np.inf, 1], "degenerate": [0, 1, 0, 1, 1],
               "outside": [0, 0, 0, w + rng.uniform(0.01, 1e9), h], "class": [k, 0, 0, 1, 1]}.get(kind)
        if kind == "width":
            s["boxes"] = np.zeros((2, 4), np.float32)
        elif kind == "ragged":
            s["boxes"] = [good, good[:3]]
        else:
            s["boxes"] = np.array([good, row], np.float64)
    elif field == "points":
        row = {"outside": [0, h - 1 + rng.uniform(0.01, 1e30), 0], "nan": [0, np.nan, 0], "class": [-1, 0, 0],
               "negative": [0, 0, -0.5]}.get(kind)
        s["points"] = np.zeros((1, 2), np.float32) if kind == "width" else np.array([[0, 0, 0], row], np.float32)
    elif field == "labels":
        for key in ("mask", "noisy_mask", "scribble", "instances", "tags", "boxes", "points", "pseudo"):
            s.pop(key, None)
    return s


@st.composite
def sample_cases(draw):
    seed = draw(st.integers(0, 2 ** 32 - 1))
    h, w = draw(st.integers(1, 12)), draw(st.integers(1, 12))
    c, k = draw(st.sampled_from([1, 3])), draw(st.sampled_from([2, 4]))
    keys = draw(st.lists(st.sampled_from(["mask", "noisy_mask", "scribble", "instances", "tags", "boxes", "points"]),
                         min_size=1, max_size=4, unique=True))
    fault = draw(st.none() | st.sampled_from(FAULTS))
    return seed, h, w, c, k, keys, fault


@settings(FAST, max_examples=250)
@given(sample_cases())
def test_validate_sample_and_collate_accept_or_name_the_field(case):
    seed, h, w, c, k, keys, fault = case
    rng = np.random.default_rng(seed)
    good = valid_sample(rng, h, w, c, k, keys)
    if fault is None:
        validate_sample(good, k, in_channels=c)
        batch = collate([good, good])
        validate_batch(batch, k)
        img = torch.as_tensor(np.asarray(good["image"])).float()
        assert torch.equal(batch["image"][1], img)
        for key in ("mask", "noisy_mask", "scribble", "instances"):
            if key in good:
                assert torch.equal(batch[key][0], torch.as_tensor(np.asarray(good[key]).astype(np.int64)))
                assert batch[f"has_{key}"].all()
        for key, width in (("boxes", 5), ("points", 3)):
            if key in good:
                want = torch.as_tensor(np.asarray(good[key], np.float32)).reshape(-1, width)
                assert torch.equal(batch[key][0], want)
        return
    name = good["id"]
    bad = inject(good, fault, rng, k, c)
    with pytest.raises(WeakSegDataError) as info:
        validate_sample(bad, k, in_channels=c, name=name)
    assert info.value.field == fault[0], f"{fault}: blamed {info.value.field!r}: {info.value}"
    assert info.value.sample == name and name in str(info.value) and f"'{fault[0]}'" in str(info.value)


@settings(FAST, max_examples=120)
@given(sample_cases(), st.integers(1, 3))
def test_collate_of_unvalidated_samples_is_correct_or_names_the_sample(case, position):
    """collate alone (a user's data set that skips validation): shape faults are caught there, naming the sample;
    what it lets through, validate_batch (called by every training step) catches."""
    seed, h, w, c, k, keys, fault = case
    rng = np.random.default_rng(seed)
    samples = [valid_sample(np.random.default_rng(seed + j), h, w, c, k, keys) for j in range(3)]
    name = samples[position - 1]["id"]
    if fault is not None:
        samples[position - 1] = inject(samples[position - 1], fault, rng, k, c)
    try:
        batch = collate(samples)
        validate_batch(batch, k)
    except WeakSegDataError as e:
        assert fault is not None, f"a valid batch was refused: {e}"
        assert e.sample is None or name == e.sample or name in (e.sample if isinstance(e.sample, list) else []) \
            or e.sample == position - 1, f"{fault}: blamed {e.sample!r} instead of {name!r}: {e}"
        return
    # accepted: the fault (if any) is one the contract allows at batch level (e.g. the channel count)
    assert fault in (None, ("labels", "none")), fault
    assert batch["id"] == [s["id"] for s in samples]


# ------------------------------------------------------------------ batches through the loss of every regime

SMALL = dict(encoder="tu-resnet18", norm="group", model_kwargs={"encoder_depth": 3, "decoder_channels": [8, 8, 4]})
HW, K, C = 16, 3, 3
REGIMES = [  # (module, extra kwargs); one line per regime
    ("lightning_weakseg:WeakSegModule", {"dice_weight": 1.0}),
    ("lightning_weakseg.regimes:BoxSegModule", {"box_emptiness": "barrier"}),
    ("lightning_weakseg.regimes:BoxSegModule", {}),
    ("lightning_weakseg.regimes:PointSegModule", {"point_crf_downscale": 1}),
    ("lightning_weakseg.regimes:CoTeachingSegModule", {"selection": "pixel"}),
    ("lightning_weakseg.regimes:RobustSegModule", {"robust_loss": "sce"}),
    ("lightning_weakseg.regimes:ScribbleSegModule", {}),
    ("lightning_weakseg.regimes:MixedSegModule", {}),
    ("lightning_weakseg.regimes:TagSegModule", {}),
]
_MODELS: dict = {}


def model(i: int):
    if i not in _MODELS:
        spec, kw = REGIMES[i]
        mod, _, name = spec.partition(":")
        torch.manual_seed(i)
        _MODELS[i] = getattr(importlib.import_module(mod), name)(in_channels=C, num_classes=K, **SMALL, **kw)
        if hasattr(_MODELS[i], "keep_ratio"):
            _MODELS[i].keep_ratio = 0.5
    return _MODELS[i]


@st.composite
def batches(draw):
    seed = draw(st.integers(0, 2 ** 32 - 1))
    b = draw(st.integers(1, 3))
    scale = draw(st.sampled_from([1.0, 1.0, 1e3]))  # images in [0, 1] (contract) or un-normalised intensities
    rng = np.random.default_rng(seed)
    samples = []
    for j in range(b):
        keys = [key for key in ("mask", "noisy_mask", "scribble", "tags", "boxes", "points") if rng.random() < 0.6]
        s = valid_sample(rng, HW, HW, C, K, keys or ["mask"])
        s["image"] = np.asarray(s["image"]).astype(np.float32) * (scale if np.asarray(s["image"]).dtype != np.uint8
                                                                  else scale / 255)
        if rng.random() < 0.5:
            s["pseudo"] = np.where(rng.random((HW, HW)) < 0.5, 255, rng.integers(0, K, (HW, HW)))
        if rng.random() < 0.2:  # all pixels unknown, or nothing clicked / boxed
            for key in ("mask", "noisy_mask", "scribble"):
                if key in s:
                    s[key] = np.full((HW, HW), 255)
            s.update({key: np.zeros((0, w), np.float32) for key, w in (("boxes", 5), ("points", 3)) if key in s})
        s["index"] = j
        samples.append(s)
    return samples, draw(st.integers(0, len(REGIMES) - 1))


@settings(FAST, max_examples=120)
@given(batches())
def test_accepted_batches_give_finite_losses_and_gradients(case):
    samples, regime = case
    for s in samples:
        validate_sample(s, K, in_channels=C)
    batch = collate(samples)
    validate_batch(batch, K)
    m = model(regime)
    m.zero_grad(set_to_none=True)
    out = m(batch["image"])
    terms = m.loss_terms(batch, out)
    for name, v in terms.items():
        assert v.ndim == 0 and torch.isfinite(v), f"{REGIMES[regime][0]}: term {name} = {v}"
    if terms:
        sum(terms.values()).backward()
        for n, p in m.named_parameters():
            assert p.grad is None or torch.isfinite(p.grad).all(), f"{REGIMES[regime][0]}: non-finite grad in {n}"


# ------------------------------------------------------------------ malformed collated batches

BATCH_FAULTS = ["no_flag", "flag_dtype", "mask_shape", "mask_float", "mask_value", "box_nan", "box_outside",
                "box_width", "box_not_tensor", "box_count", "point_outside", "point_class", "tags_shape",
                "tags_value", "image_nan", "image_int"]


@settings(FAST, max_examples=80)
@given(st.integers(0, 2 ** 32 - 1), st.sampled_from(BATCH_FAULTS), st.integers(0, 2))
def test_validate_batch_refuses_malformed_batches(seed, fault, i):
    rng = np.random.default_rng(seed)
    samples = [valid_sample(rng, HW, HW, C, K, ["mask", "boxes", "points", "tags"]) for _ in range(3)]
    batch = collate(samples)
    validate_batch(batch, K)
    sid = batch["id"][i]
    expect_sample = sid
    if fault == "no_flag":
        del batch["has_mask"]
        expect_sample = None
    elif fault == "flag_dtype":
        batch["has_boxes"] = batch["has_boxes"].long()
        expect_sample = None
    elif fault == "mask_shape":
        batch["mask"] = batch["mask"][:, :-1]
        expect_sample = None
    elif fault == "mask_float":
        batch["mask"] = batch["mask"].float()
        expect_sample = None
    elif fault == "mask_value":
        batch["mask"][i, rng.integers(HW), rng.integers(HW)] = K
    elif fault == "box_nan":
        batch["boxes"][i] = torch.tensor([[0, float("nan"), 0, 1, 1]])
    elif fault == "box_outside":
        batch["boxes"][i] = torch.tensor([[0, 0, 0, HW + 0.5, 1]])
    elif fault == "box_width":
        batch["boxes"][i] = torch.zeros(2, 4)
    elif fault == "box_not_tensor":
        batch["boxes"][i] = [[0, 0, 0, 1, 1]]
    elif fault == "box_count":
        batch["boxes"] = batch["boxes"][:-1]
        expect_sample = None
    elif fault == "point_outside":
        batch["points"][i] = torch.tensor([[0.0, 0.0, HW]])
    elif fault == "point_class":
        batch["points"][i] = torch.tensor([[K, 0.0, 0.0]])
    elif fault == "tags_shape":
        batch["tags"] = batch["tags"][:, :-1]
        expect_sample = None
    elif fault == "tags_value":
        batch["tags"][i, 0] = 0.5
    elif fault == "image_nan":
        batch["image"][i, 0, 0, 0] = float("nan")
    elif fault == "image_int":
        batch["image"] = batch["image"].long()
        expect_sample = None
    with pytest.raises(WeakSegDataError) as info:
        validate_batch(batch, K)
    assert info.value.sample == expect_sample, f"{fault}: blamed {info.value.sample!r}: {info.value}"


# ------------------------------------------------------------------ folder data sets with broken files

FOLDER_FAULTS = [None, None, "image_garbage", "image_truncated", "image_empty_file", "mask_size", "mask_value",
                 "mask_rgb", "mask_missing", "json_list", "json_value", "json_nan", "json_three", "json_nested",
                 "json_string", "json_outside", "json_degenerate", "json_syntax", "image_channels"]


@settings(FAST, max_examples=60)
@given(st.integers(0, 2 ** 32 - 1), st.sampled_from(FOLDER_FAULTS), st.sampled_from([1, 3]),
       st.sampled_from(["u8", "u16"]), st.integers(8, 20))
def test_folder_dataset_reads_correctly_or_names_file_and_field(seed, fault, c, depth, size):
    rng = np.random.default_rng(seed)
    k = 3
    with tempfile.TemporaryDirectory() as root:
        os.makedirs(f"{root}/images"), os.makedirs(f"{root}/masks")
        stems, truth = [f"img{j}" for j in range(3)], {}
        boxes = {}
        for stem in stems:
            hi = 255 if depth == "u8" else 65535
            img = rng.integers(0, hi + 1, (size, size, c) if c == 3 else (size, size)).astype(
                np.uint8 if depth == "u8" else np.uint16)
            assert cv2.imwrite(f"{root}/images/{stem}.png", img)
            mask = rng.integers(0, k, (size, size)).astype(np.uint8)
            mask[rng.random((size, size)) < 0.2] = 255
            assert cv2.imwrite(f"{root}/masks/{stem}.png", mask)
            x0, y0 = rng.integers(0, size - 1, 2)
            boxes[stem] = [[int(x0), int(y0), int(rng.integers(x0 + 1, size + 1)), int(rng.integers(y0 + 1, size + 1))]]
            rgb = img[..., ::-1] if c == 3 else img[..., None]
            truth[stem] = (rgb.astype(np.float32) / hi, mask.astype(np.int64), boxes[stem])
        victim = stems[int(rng.integers(3))]
        field = "mask" if fault and fault.startswith("mask") else "boxes" if fault and fault.startswith("json") \
            else "image"
        ipath, mpath = f"{root}/images/{victim}.png", f"{root}/masks/{victim}.png"
        if fault == "image_garbage":
            open(ipath, "wb").write(rng.bytes(64))
        elif fault == "image_truncated":
            data = open(ipath, "rb").read()
            open(ipath, "wb").write(data[: len(data) // 2])
        elif fault == "image_empty_file":
            open(ipath, "wb").close()
        elif fault == "image_channels":
            cv2.imwrite(ipath, np.zeros((size, size, 4 - c if c == 3 else 3), np.uint8))
        elif fault == "mask_size":
            cv2.imwrite(mpath, np.zeros((size + 1, size), np.uint8))
        elif fault == "mask_value":
            m = cv2.imread(mpath, cv2.IMREAD_UNCHANGED)
            m[0, 0] = k
            cv2.imwrite(mpath, m)
        elif fault == "mask_rgb":
            cv2.imwrite(mpath, np.zeros((size, size, 3), np.uint8))
        elif fault == "mask_missing":
            os.remove(mpath)
        elif fault is not None and fault.startswith("json"):
            boxes[victim] = {"json_value": 7, "json_nan": [[float("nan"), 0, 1, 1]], "json_three": [[0, 0, 1]],
                             "json_nested": [[[0, 0], [1, 1]]], "json_string": [["a", 0, 1, 1]],
                             "json_outside": [[0, 0, size + 3, 2]], "json_degenerate": [[2, 0, 2, 2]]}.get(fault)
        text = json.dumps(list(boxes.values()) if fault == "json_list" else boxes)
        open(f"{root}/boxes.json", "w").write(text[:-3] if fault == "json_syntax" else text)
        try:
            ds = FolderDataset(root, boxes_json="boxes.json", num_classes=k, in_channels=c, image_size=size,
                               labels=("mask", "boxes"))
        except WeakSegDataError as e:  # faults of the whole boxes file surface when the data set is built
            assert fault in ("json_list", "json_syntax") and e.field == "boxes" and "boxes.json" in str(e.sample)
            return
        assert fault not in ("json_list", "json_syntax")
        for j, stem in enumerate(stems):
            if stem == victim and fault is not None:
                with pytest.raises(WeakSegDataError) as info:
                    ds[j]
                assert info.value.field == field, f"{fault}: blamed field {info.value.field!r}: {info.value}"
                assert stem in str(info.value.sample), f"{fault}: blamed {info.value.sample!r}: {info.value}"
                continue
            s = ds[j]
            img, mask, bx = truth[stem]
            assert torch.allclose(s["image"], torch.from_numpy(np.moveaxis(img, 2, 0)), atol=1e-6)
            assert torch.equal(s["mask"], torch.from_numpy(mask))
            assert torch.equal(s["boxes"], torch.tensor([[1.0, *bx[0]]]))
