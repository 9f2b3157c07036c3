"""Contracts between the parts: one meaning of ``reduction`` in every loss, one masked cross-entropy, every
exception in ``errors.py``, ``__all__`` everywhere, and regime mixins that compose by declared rules — not by
the order of the bases (one owner of the barrier t, one pseudo-label dispatcher, a declared base-term
replacement, no state toggled around a ``super()`` call)."""
from __future__ import annotations

import importlib
import inspect
import pkgutil
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import lightning_weakseg
from lightning_weakseg import losses
from lightning_weakseg.losses.partial import masked_cross_entropy
from lightning_weakseg.module import WeakSegModule
from lightning_weakseg.regimes import (BarrierMixin, BoxSegModule, BoxTightnessMixin, ImageLevelMixin, MixedSegModule,
                                       PointVoronoiMixin, PseudoLabelMixin, ScribbleMixin, TagSegModule)

K, H, W, B = 3, 16, 16, 3


# ----------------------------------------------------------------------------- reduction: one meaning everywhere
def _inputs():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(B, K, H, W, generator=g, dtype=torch.float64)
    probs = logits.softmax(1)
    target = torch.randint(0, K, (B, H, W), generator=g)
    target[0, 2:] = 255          # few labelled pixels in sample 0, many in sample 1: per-sample ≠ pooled mean
    target[2] = 255              # none in sample 2
    image = torch.rand(B, 3, H, W, generator=g, dtype=torch.float64)
    valid = torch.rand(B, H, W, generator=g) > 0.3
    boxes5 = [torch.tensor([[1., 2., 3., 9., 12.], [2., 0., 0., 5., 4.]]), torch.tensor([[1., 4., 4., 16., 10.]]),
              torch.zeros(0, 5)]
    boxes4 = [b[:, 1:] for b in boxes5]
    tags = torch.tensor([[1., 1., 0.], [1., 0., 1.], [1., 1., 1.]])
    return dict(logits=logits, probs=probs, target=target, image=image, valid=valid, boxes5=boxes5,
                boxes4=boxes4, tags=tags)


LOSSES = {
    "tightness_prior": lambda x, **r: losses.tightness_prior(x["probs"][:, 1], x["boxes4"], 3.0, band_width=3, **r),
    "emptiness_constraint": lambda x, **r: losses.emptiness_constraint(x["probs"], x["boxes5"], 3.0, **r),
    "emptiness_ce": lambda x, **r: losses.emptiness_ce(x["logits"], x["boxes5"], **r),
    "box_size_constraint": lambda x, **r: losses.box_size_constraint(x["probs"], x["boxes5"], 3.0, **r),
    "gated_crf_loss": lambda x, **r: losses.gated_crf_loss(x["probs"], x["image"], 2, valid=x["valid"], **r),
    "dense_crf_loss": lambda x, **r: losses.dense_crf_loss(x["probs"], x["image"], 2, valid=x["valid"], **r),
    "mil_loss": lambda x, **r: losses.mil_loss(losses.mil_lse(x["logits"]), x["tags"], **r),
    "tag_size_constraint": lambda x, **r: losses.tag_size_constraint(x["probs"], x["tags"], 3.0, 0.1, 0.4, **r),
    "generalized_cross_entropy": lambda x, **r: losses.generalized_cross_entropy(x["logits"], x["target"], **r),
    "symmetric_cross_entropy": lambda x, **r: losses.symmetric_cross_entropy(x["logits"], x["target"], **r),
    "masked_cross_entropy": lambda x, **r: losses.masked_cross_entropy(x["logits"], x["target"], **r),
    "entropy_loss": lambda x, **r: losses.entropy_loss(x["probs"], x["valid"], **r),
    "total_variation_loss": lambda x, **r: losses.total_variation_loss(x["probs"], **r),
}


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_every_loss_reduces_its_per_sample_values_alike(name):
    x, fn = _inputs(), LOSSES[name]
    per = fn(x, reduction="none")
    assert per.shape == (B,), name
    assert torch.equal(fn(x, reduction="sum"), per.sum())
    assert torch.equal(fn(x, reduction="mean"), per.mean())
    assert torch.equal(fn(x), per.sum())                       # the one default: "sum"
    with pytest.raises(ValueError, match="reduction"):
        fn(x, reduction="batchmean")


def test_mean_is_over_samples_not_pooled_pixels():
    """The data above tells the two apart: a per-pixel mean over the whole batch would weigh sample 1 more."""
    x = _inputs()
    ce = F.cross_entropy(x["logits"], x["target"], ignore_index=255)       # pooled over the batch's pixels
    assert not torch.allclose(losses.masked_cross_entropy(x["logits"], x["target"], reduction="mean"), ce)
    per = [F.cross_entropy(x["logits"][b:b + 1], x["target"][b:b + 1], ignore_index=255) for b in (0, 1)]
    want = (per[0] + per[1] + 0.0) / B                                      # sample 2 has no label: 0
    torch.testing.assert_close(losses.masked_cross_entropy(x["logits"], x["target"], reduction="mean"), want)


def test_every_loss_and_module_defaults_to_sum():
    takes = []
    for name in losses.__all__:
        obj = getattr(losses, name)
        if not callable(obj) or name in ("check_reduction", "reduce"):
            continue
        params = inspect.signature(obj).parameters
        if "reduction" in params:
            takes.append(name)
            assert params["reduction"].default == "sum", name
            if inspect.isclass(obj):
                required = [p for p in params.values() if p.default is inspect.Parameter.empty
                            and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)]
                if not required:
                    with pytest.raises(ValueError, match="reduction"):
                        obj(reduction="avg")
    assert {"TightnessPrior", "EmptinessCE", "GatedCRFLoss", "MILLoss", "GeneralizedCrossEntropyLoss",
            "PartialCrossEntropyLoss", "EntropyLoss", "mil_loss", "tag_size_constraint"} <= set(takes)


def test_robust_losses_keep_their_pixel_maps_under_their_own_name():
    x = _inputs()
    m = losses.generalized_cross_entropy_map(x["logits"], x["target"])
    assert m.shape == (B, H, W) and bool((m[x["target"] == 255] == 0).all())
    n = (x["target"] != 255).flatten(1).sum(1).clamp_min(1)
    torch.testing.assert_close(losses.generalized_cross_entropy(x["logits"], x["target"], reduction="none"),
                               m.flatten(1).sum(1) / n)


# ----------------------------------------------------------------------------- one masked cross-entropy
def test_one_masked_cross_entropy():
    import lightning_weakseg.module as module
    import lightning_weakseg.regimes.points as points

    assert module.masked_cross_entropy is masked_cross_entropy is losses.partial_cross_entropy
    assert not hasattr(points, "_weighted_ce")
    x = _inputs()
    w = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64)
    got = masked_cross_entropy(x["logits"], x["target"], weight=w, reduction="none")
    for b in range(B):  # Σ w[y]·CE over the labelled pixels / their count
        lab = x["target"][b] != 255
        z, y = x["logits"][b].permute(1, 2, 0)[lab], x["target"][b][lab]
        ref = (w[y] * F.cross_entropy(z, y, reduction="none")).sum() / max(int(lab.sum()), 1)
        torch.testing.assert_close(got[b], ref)


# ----------------------------------------------------------------------------- exceptions and __all__
def _all_modules():
    yield lightning_weakseg
    for info in pkgutil.walk_packages(lightning_weakseg.__path__, "lightning_weakseg."):
        yield importlib.import_module(info.name)


def test_every_library_exception_is_defined_in_errors():
    found = {}
    for mod in _all_modules():
        for name, obj in vars(mod).items():
            if inspect.isclass(obj) and issubclass(obj, BaseException) and obj.__module__.startswith("lightning_weakseg"):
                found.setdefault(obj, set()).add(mod.__name__)
    assert found, "no exception found"
    wrong = {cls.__qualname__: cls.__module__ for cls in found if cls.__module__ != "lightning_weakseg.errors"}
    assert not wrong, f"exceptions defined outside lightning_weakseg/errors.py: {wrong}"
    # the callbacks package exports the same classes
    from lightning_weakseg import errors
    from lightning_weakseg.callbacks import PseudoLabelCacheError as a
    from lightning_weakseg.callbacks.pseudo_label_refresh import PseudoLabelCacheMismatch as b
    assert a is errors.PseudoLabelCacheError and b is errors.PseudoLabelCacheMismatch
    assert issubclass(b, a) and issubclass(a, errors.WeakSegError) and issubclass(a, ValueError)


@pytest.mark.parametrize("package", ["lightning_weakseg", "lightning_weakseg.data", "lightning_weakseg.losses",
                                     "lightning_weakseg.cam", "lightning_weakseg.pseudo", "lightning_weakseg.regimes",
                                     "lightning_weakseg.callbacks"])
def test_packages_declare_all_and_it_resolves(package):
    mod = importlib.import_module(package)
    assert isinstance(getattr(mod, "__all__", None), list), package
    missing = [n for n in mod.__all__ if not hasattr(mod, n)]
    assert not missing and len(set(mod.__all__)) == len(mod.__all__), (package, missing)


# ----------------------------------------------------------------------------- mixins by contract, not by order
class ReorderedMixed(PointVoronoiMixin, BoxTightnessMixin, ImageLevelMixin, ScribbleMixin, WeakSegModule):
    """MixedSegModule's regimes with the bases in the opposite order."""


# thresholds that make the three rules tell apart on every sample: the point rule labels every pixel (argmax),
# the scribble rule only the scribbles, the tag rule every pixel of a tagged sample with a tagged class
MIXED_KW = dict(in_channels=1, num_classes=K, scribble_terms=("pce",), scribble_self_training=True,
                scribble_confidence=1.0, point_refine="none", point_confidence=0.0, point_crf_kernel_radius=2,
                tag_cls=False, tag_pseudo_source="mil", tag_refine="none", tag_fg_threshold=0.3,
                tag_bg_threshold=0.3, tag_size_bounds=(0.05, 0.6))


@pytest.fixture(scope="module")
def two_orders():
    torch.manual_seed(0)
    a = MixedSegModule(**MIXED_KW).eval()
    b = ReorderedMixed(**MIXED_KW).eval()
    b.load_state_dict(a.state_dict())
    return a, b


def _mixed_batch():
    """s0 points, s1 tags, s2 scribble + tags, s3 points + tags, s4 mask + boxes (claimed by no rule)."""
    g = torch.Generator().manual_seed(3)
    n, h, w = 5, 32, 32
    scribble = torch.full((n, h, w), 255, dtype=torch.long)
    scribble[2, 4:8, 4:20] = 1
    scribble[2, 24:28, :] = 0
    pts = [torch.tensor([[1., 8., 8.], [2., 20., 22.]]), torch.zeros(0, 3), torch.zeros(0, 3),
           torch.tensor([[1., 16., 16.]]), torch.zeros(0, 3)]
    return {
        "image": torch.rand(n, 1, h, w, generator=g),
        "points": pts, "has_points": torch.tensor([True, False, False, True, False]),
        "tags": torch.tensor([[1., 1., 0.], [1., 1., 1.], [1., 1., 0.], [1., 0., 1.], [1., 0., 0.]]),
        "has_tags": torch.tensor([False, True, True, True, False]),
        "scribble": scribble, "has_scribble": torch.tensor([False, False, True, False, False]),
        "mask": torch.randint(0, K, (n, h, w), generator=g), "has_mask": torch.tensor([False] * 4 + [True]),
        "boxes": [torch.zeros(0, 5)] * 4 + [torch.tensor([[1., 2., 2., 20., 18.]])],
        "has_boxes": torch.tensor([False] * 4 + [True]),
        "pseudo": torch.randint(0, K, (n, h, w), generator=g), "has_pseudo": torch.ones(n, dtype=torch.bool),
    }


def test_pseudo_labels_come_from_each_samples_own_regime_in_any_base_order(two_orders):
    a, b = two_orders
    batch = _mixed_batch()
    owners = a.pseudo_label_owners(batch)
    assert {k: v.tolist() for k, v in owners.items()} == {
        "scribble": [False, False, True, False, False],
        "tags": [False, True, False, True, False],       # s3: tags outrank points
        "points": [True, False, False, False, True]}     # s4: no rule claims it, the lowest priority labels it
    with torch.no_grad():
        rule = {"points": a.point_pseudo_labels(batch), "tags": a.tag_pseudo_labels(batch),
                "scribble": a.scribble_pseudo_labels(batch)}
        lab_a, lab_b = a.make_pseudo_labels(batch), b.make_pseudo_labels(batch)
    want = {0: "points", 1: "tags", 2: "scribble", 3: "tags", 4: "points"}
    for i, name in want.items():
        assert torch.equal(lab_a[i], rule[name][i]), (i, name)
        others = [r for r in rule if r != name]
        assert all(not torch.equal(rule[name][i], rule[o][i]) for o in others), (i, "rules must differ here")
    assert torch.equal(lab_a, lab_b)
    assert [r.name for r in a.pseudo_label_rules()] == [r.name for r in b.pseudo_label_rules()]
    assert "make_pseudo_labels" in PseudoLabelMixin.__dict__
    assert not any("make_pseudo_labels" in c.__dict__ for c in (ScribbleMixin, ImageLevelMixin, PointVoronoiMixin))


def test_loss_terms_do_not_depend_on_the_base_order(two_orders):
    a, b = two_orders
    batch = _mixed_batch()
    with torch.no_grad():
        out = a(batch["image"])
    ta, tb = a.loss_terms(batch, out), b.loss_terms(batch, out)
    assert set(ta) == set(tb) and {"seg/ce", "box/tightness", "point/voronoi", "tags/mil", "tags/size",
                                   "tags/pseudo", "scribble/pce", "scribble/pseudo"} <= set(ta)
    for name in ta:
        assert torch.equal(ta[name], tb[name]), name
    # tags/pseudo trains on the samples whose pseudo labels the tag rule makes (s1, s3), not on s2 (scribble's)
    ce = masked_cross_entropy(out["logits"], batch["pseudo"], reduction="none")
    torch.testing.assert_close(ta["tags/pseudo"], (ce[1] + ce[3]) / 5)


def test_one_barrier_t_for_every_constraint_term(two_orders, tmp_path):
    a, b = two_orders
    for cls in (MixedSegModule, ReorderedMixed, BoxSegModule, TagSegModule):
        assert [c for c in cls.__mro__ if c is BarrierMixin] == [BarrierMixin]
    assert not any("self.barrier_t =" in inspect.getsource(c) for c in (BoxTightnessMixin, ImageLevelMixin))
    batch = _mixed_batch()
    with torch.no_grad():
        out = a(batch["image"])
    for m in (a, b):
        m.barrier_t = 7.0                                     # what LogBarrierSchedule sets each epoch
        terms = m.loss_terms(batch, out)
        probs = out["probs"].float()
        size = losses.tag_size_constraint(probs, batch["tags"], 7.0, 0.05, 0.6, reduction="none")
        torch.testing.assert_close(terms["tags/size"], (size * batch["has_tags"]).sum() / 5)
        tight = losses.tightness_prior(probs, batch["boxes"], 7.0, 5, reduction="none") / (32 * 32)
        torch.testing.assert_close(terms["box/tightness"], (tight * batch["has_boxes"]).sum() / 5)
        m.barrier_t = 5.0
    # the starting values: one t, so two regimes asking for different ones is an error in either order
    for cls in (MixedSegModule, ReorderedMixed):
        assert cls(num_classes=2, box_t0=3.0, tag_t0=3.0).barrier_t == 3.0
        with pytest.raises(ValueError, match="box_t0=3.0.*tag_t0=5.0|tag_t0=5.0.*box_t0=3.0"):
            cls(num_classes=2, box_t0=3.0)
    # the checkpoint holds t: a module loaded without the schedule goes on with it
    ckpt = {}
    a.barrier_t = 6.5
    a.on_save_checkpoint(ckpt)
    a.barrier_t = 5.0
    fresh = BoxSegModule(num_classes=2)
    fresh.on_load_checkpoint(ckpt)
    assert fresh.barrier_t == 6.5


def test_point_cluster_labels_need_no_toggle():
    assert "on_fit_start" not in MixedSegModule.__dict__

    class Dataset:  # a training set without per-sample label keys: only the data module says what it carries
        def __init__(self):
            self.pseudo_labels = {}

        def __len__(self):
            return 2

        def raw_index(self, i):
            return i

        def set_pseudo_labels(self, labels):
            self.pseudo_labels = dict(labels)

    class Data:
        def __init__(self, train_labels):
            self.hparams = {"train_labels": train_labels}
            self.train_dataset = Dataset()
            self.calls = 0

        def train_eval_dataloader(self):
            self.calls += 1
            return []

    model = MixedSegModule(num_classes=2, scribble_terms=("pce",))
    for labels, passes in ((["mask", "boxes"], 0), (["points"], 1)):
        dm = Data(labels)
        model.trainer = SimpleNamespace(datamodule=dm, current_epoch=0)
        model.on_fit_start()
        assert dm.calls == passes and model.point_precompute is True, labels


class OwnLossOnBaseLabels:
    """A regime that trains on the base label map with a loss of its own."""

    replaces_base_term = True

    def loss_terms(self, batch, out):
        terms = super().loss_terms(batch, out)
        terms["own/ce"] = masked_cross_entropy(out["logits"], batch["mask"], reduction="mean")
        return terms


class Unrelated:
    def loss_terms(self, batch, out):
        return super().loss_terms(batch, out)


class ReplacingA(OwnLossOnBaseLabels, Unrelated, WeakSegModule):
    pass


class ReplacingB(Unrelated, OwnLossOnBaseLabels, WeakSegModule):
    pass


def test_a_regime_declares_that_it_replaces_the_base_term():
    g = torch.Generator().manual_seed(0)
    batch = {"image": torch.rand(2, 1, 32, 32, generator=g), "mask": torch.randint(0, 2, (2, 32, 32), generator=g),
             "has_mask": torch.tensor([True, True])}
    kw = dict(in_channels=1, num_classes=2)
    logits = torch.randn(2, 2, 32, 32, generator=g)
    out = {"logits": logits, "probs": logits.softmax(1)}
    assert set(WeakSegModule(**kw).loss_terms(batch, out)) == {"seg/ce"}
    for cls in (ReplacingA, ReplacingB):
        assert set(cls(**kw).loss_terms(batch, out)) == {"own/ce"}, cls.__name__
        # an explicit weight decides: 0 keeps it off, a positive weight brings it back
        assert set(cls(**kw, loss_weights={"seg/ce": 0.0}).loss_terms(batch, out)) == {"own/ce"}
        assert set(cls(**kw, loss_weights={"seg/ce": 2.0}).loss_terms(batch, out)) == {"own/ce", "seg/ce"}
    # the weight-0 way keeps working without the declaration
    assert WeakSegModule(**kw, loss_weights={"seg/ce": 0.0}).loss_terms(batch, out) == {}
