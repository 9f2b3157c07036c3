"""CAM family against pytorch-grad-cam / torchcam on the same SMP encoder + linear head, plus the contract:
hooks released, model state untouched, works inside Lightning validation (inference mode), 3D, batching."""
import copy
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import lightning as L
import numpy as np
import pytest
import segmentation_models_pytorch as smp
import torch
import torch.nn.functional as F
from torch import nn

import pytorch_grad_cam as pgc
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from pytorch_grad_cam.utils.svd_on_activations import get_2d_projection

from lightning_weakseg.cam import (CAM, EigenCAM, GradCAM, GradCAMPlusPlus, HiResCAM, LayerCAM, ScoreCAM, XGradCAM,
                                   ClassifierAdapter)
from lightning_weakseg.cam.base import normalize_maps, upsample_maps


class EncoderClassifier(nn.Module):
    """SMP resnet18 encoder + global average pooling + linear head."""

    def __init__(self, classes=3):
        super().__init__()
        self.encoder = smp.encoders.get_encoder("resnet18", weights=None)
        self.fc = nn.Linear(512, classes)

    def forward(self, x):
        return self.fc(self.encoder(x)[-1].mean((2, 3)))


def _warm(model, size=64):
    torch.manual_seed(0)
    model.train()
    with torch.no_grad():  # non-trivial BatchNorm statistics
        for _ in range(2):
            model(torch.rand(6, 3, size, size))
    return model.eval()


@pytest.fixture(scope="module")
def clf():
    torch.manual_seed(0)
    return _warm(EncoderClassifier())


@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator().manual_seed(1)
    return torch.rand(3, 3, 64, 64, generator=g), torch.tensor([0, 2, 1])


def pearson(a, b):
    a = a.reshape(len(a), -1).astype(np.float64)
    b = b.reshape(len(b), -1).astype(np.float64)
    a = a - a.mean(1, keepdims=True)
    b = b - b.mean(1, keepdims=True)
    return (a * b).sum(1) / np.sqrt((a * a).sum(1) * (b * b).sum(1))


def assert_agree(ours, theirs):
    ours = ours.detach().cpu().numpy() if torch.is_tensor(ours) else ours
    assert ours.shape == theirs.shape
    assert ours.std() > 0.05, "degenerate map: the comparison would prove nothing"
    r = pearson(ours, theirs)
    assert (r >= 0.99).all(), f"pearson {r}"
    assert np.abs(ours - theirs).max() <= 1e-3


PAIRS = [(GradCAM, pgc.GradCAM), (GradCAMPlusPlus, pgc.GradCAMPlusPlus), (XGradCAM, pgc.XGradCAM),
         (LayerCAM, pgc.LayerCAM), (HiResCAM, pgc.HiResCAM)]


@pytest.mark.parametrize("ours,theirs", PAIRS, ids=[p[0].__name__ for p in PAIRS])
def test_gradient_methods_match_pytorch_grad_cam(clf, inputs, ours, theirs):
    # layer3: gradients vary in space (layer4 lies between it and the pooled head), so the five methods differ;
    # the default layer (layer4) is compared in test_smp_aux_model_and_adapter
    layer = "encoder.layer3"
    x, idx = inputs
    got = ours(clf, layer)(x, idx)
    with theirs(clf, [clf.get_submodule(layer)]) as ref:
        want = ref(x, [ClassifierOutputTarget(int(i)) for i in idx])
    assert float(got.min()) >= 0 and float(got.max()) <= 1
    assert_agree(got, want)


def test_eigencam_matches_up_to_sign(clf, inputs):
    x, _ = inputs
    got = EigenCAM(clf)(x).numpy()
    with pgc.EigenCAM(clf, [clf.encoder.layer4]) as ref:
        want = ref(x, None)
    # pytorch-grad-cam leaves the SVD sign free: rebuild both signs of its projection and pick per sample
    acts = {}
    h = clf.encoder.layer4.register_forward_hook(lambda m, i, o: acts.setdefault("a", o.detach()))
    with torch.no_grad():
        clf(x)
    h.remove()
    proj = torch.from_numpy(get_2d_projection(acts["a"].numpy()))
    for b in range(len(x)):
        cands = [normalize_maps(upsample_maps(torch.relu(s * proj[b:b + 1]), (64, 64)))[0].numpy() for s in (1, -1)]
        # the peer equals one of the two signs ...
        assert min(np.abs(c - want[b]).max() for c in cands) <= 1e-3
        # ... and ours takes the sign that correlates positively with the channel-mean activation
        mean_act = acts["a"][b].mean(0).flatten().numpy()
        expected = cands[0] if np.corrcoef(proj[b].flatten().numpy(), mean_act)[0, 1] >= 0 else cands[1]
        assert_agree(got[b:b + 1], expected[None])


def test_cam_matches_torchcam_and_gradcam(clf, inputs):
    from torchcam.methods import CAM as TorchCAM

    x, idx = inputs
    method = CAM(clf)
    low = method.compute(x, idx)  # ReLU'd map at layer4 resolution
    extractor = TorchCAM(clf, target_layer="encoder.layer4", fc_layer="fc")
    extractor._relu = True  # torchcam's CAM skips the ReLU by default; METHODS.md (and grad-cam) apply it
    try:
        # torchcam uses the activations of the last forward: one sample at a time
        want = []
        for b, i in enumerate(idx):
            with torch.no_grad():
                s = clf(x[b:b + 1])
            want.append(extractor([int(i)], s, normalized=True)[0][0])
        want = torch.stack(want)
    finally:
        extractor.remove_hooks()
    assert_agree(normalize_maps(low, eps=1e-8), want.numpy())
    # after global average pooling + linear, Grad-CAM's weights are w^c / HW: the same map
    assert_agree(method(x, idx), GradCAM(clf)(x, idx).numpy())


def test_scorecam_matches_pytorch_grad_cam(clf):
    torch.manual_seed(3)
    x = torch.rand(2, 3, 32, 32)
    method = ScoreCAM(clf, "encoder.layer2", batch_size=128)
    got = method(x, 1)
    with pgc.ScoreCAM(clf, [clf.encoder.layer2]) as ref:
        ref.batch_size = 128
        want = ref(x, [ClassifierOutputTarget(1)] * 2)
    assert_agree(got, want)
    assert method.last_num_forward <= 2 * 128 + 1
    # the approximate mode keeps fewer channels and stays close
    approx = ScoreCAM(clf, "encoder.layer2", batch_size=128, mass_tol=0.05)
    got2 = approx(x, 1)
    assert approx.last_num_forward < method.last_num_forward
    assert (pearson(got2.numpy(), want) > 0.95).all()


class _NearConstantChannel(nn.Module):
    """Eight ReLU channels plus one whose range (1e-6 around 1.0) is of the order of float32 rounding after
    upsampling — as dead-ish channels of trained networks are."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(5)
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(4))
        self.target = nn.Identity()
        self.head = nn.Linear(9, 3)
        with torch.no_grad():
            self.head.weight.mul_(20)

    def forward(self, x):
        f = self.features(x)
        a = self.target(torch.cat([f, 1.0 + 1e-6 * f[:, :1]], 1))
        return self.head(a.mean((2, 3)))


def test_scorecam_normalises_nearly_constant_channels_like_pytorch_grad_cam():
    # min-max normalisation must use the upsampled map's own extremes: for a nearly constant channel the grid's
    # extremes differ from them by rounding, which is the whole range of that channel
    model = _NearConstantChannel().eval()
    x = torch.rand(2, 3, 40, 40, generator=torch.Generator().manual_seed(2))
    got = ScoreCAM(model, "target", batch_size=64, optimize=False)(x, 1)
    with pgc.ScoreCAM(model, [model.target]) as ref:
        want = ref(x, [ClassifierOutputTarget(1)] * 2)
    assert_agree(got, want)


def test_scorecam_skips_the_decoder_of_an_smp_aux_model():
    """score_model="auto": an SMP Unet with a classification head is scored with encoder + head only (and a
    BatchNorm-folded, channels-last copy); the maps still match pytorch-grad-cam run on the whole model."""
    torch.manual_seed(0)
    net = _warm(smp.create_model("Unet", "resnet18", encoder_weights=None, classes=2, aux_params={"classes": 3}), 32)
    x = torch.rand(2, 3, 64, 64)
    idx = torch.tensor([2, 0])
    calls = []
    handle = net.decoder.register_forward_hook(lambda mod, inp, out: calls.append(out.shape[0]))
    try:
        method = ScoreCAM(net, "encoder.layer3", batch_size=128)
        got = method(x, idx)
        assert method.last_scorer == "encoder+head, optimized"
        assert calls == [2]  # the forward that reads the activation; no masked input went through the decoder
        calls.clear()
        slow = ScoreCAM(net, "encoder.layer3", batch_size=128, score_model=None, optimize=False)
        want_slow = slow(x, idx)
        assert slow.last_scorer == "model" and sum(calls) == 2 + slow.last_num_forward
    finally:
        handle.remove()
    torch.testing.assert_close(got, want_slow, atol=1e-5, rtol=0)
    with pgc.ScoreCAM(ClassifierAdapter(net), [net.encoder.layer3]) as ref:
        ref.batch_size = 128
        want = ref(x, [ClassifierOutputTarget(2), ClassifierOutputTarget(0)])
    assert_agree(got, want)


def test_scorecam_score_model_fallbacks_and_cache():
    torch.manual_seed(0)
    net = _warm(smp.create_model("Unet", "resnet18", encoder_weights=None, classes=2, aux_params={"classes": 3}), 32)
    x = torch.rand(1, 3, 32, 32)

    class Doubled(type(net)):  # forward overridden: the head's logit is no longer the model's score
        def forward(self, x):
            mask, labels = super().forward(x)
            return mask, 2 * labels

    other = copy.deepcopy(net)
    other.__class__ = Doubled
    method = ScoreCAM(other, "encoder.layer4", batch_size=256)
    got = method(x, 1)
    assert method.last_scorer.startswith("model")
    torch.testing.assert_close(got, ScoreCAM(other, "encoder.layer4", batch_size=256, optimize=False,
                                             score_model=None)(x, 1), atol=1e-5, rtol=0)
    # an explicit score_model that does not give the model's logits is refused
    class Shifted(nn.Module):
        def forward(self, z):
            return ClassifierAdapter(net)(z) + 1.0

    with pytest.raises(ValueError, match="score_model"):
        ScoreCAM(net, "encoder.layer4", score_model=Shifted())(x, 1)
    # the optimised copy follows in-place weight updates (optimizer steps): same maps as a fresh method
    method = ScoreCAM(net, "encoder.layer4", batch_size=256)
    before = method(x, 1)
    with torch.no_grad():
        net.encoder.layer2[0].conv1.weight.mul_(-3.0)
        net.classification_head[-2].weight.add_(0.5)  # the head's linear layer
    after = method(x, 1)
    assert method.last_scorer == "encoder+head, optimized"  # a stale copy would fail the logit check
    fresh = ScoreCAM(net, "encoder.layer4", batch_size=256, optimize=False)(x, 1)
    torch.testing.assert_close(after, fresh, atol=1e-5, rtol=0)
    assert (after - before).abs().max() > 1e-2
    # built and run under inference mode (Lightning validation), on an inference tensor
    with torch.inference_mode():
        inside = ScoreCAM(net, "encoder.layer4", batch_size=256)
        got = inside(x.clone(), 1)
    assert inside.last_scorer == "encoder+head, optimized"
    torch.testing.assert_close(got, fresh, atol=1e-5, rtol=0)


def test_smp_aux_model_and_adapter():
    torch.manual_seed(0)
    net = _warm(smp.create_model("Unet", "resnet18", encoder_weights=None, classes=2, aux_params={"classes": 3}), 32)
    x = torch.rand(2, 3, 64, 64)
    got = GradCAMPlusPlus(net)(x, torch.tensor([2, 0]))  # default target: last encoder stage
    adapter = ClassifierAdapter(net)
    with pgc.GradCAMPlusPlus(adapter, [net.encoder.layer4]) as ref:
        want = ref(x, [ClassifierOutputTarget(2), ClassifierOutputTarget(0)])
    assert_agree(got, want)
    assert torch.equal(GradCAMPlusPlus(net, "encoder.layer4")(x, torch.tensor([2, 0])), got)


def test_per_sample_class_idx_is_batch_independent(clf, inputs):
    x, idx = inputs
    method = LayerCAM(clf)
    batched = method(x, idx)
    for b in range(len(x)):
        single = method(x[b:b + 1], int(idx[b]))
        torch.testing.assert_close(batched[b:b + 1], single, atol=1e-5, rtol=0)
    assert torch.equal(method(x, None), method(x, clf(x).argmax(1)))
    with pytest.raises(ValueError, match="class_idx"):
        method(x, 7)


def _hook_count(model):
    return sum(len(m._forward_hooks) + len(m._backward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_hooks_released_and_model_state_untouched():
    torch.manual_seed(0)
    model = EncoderClassifier()
    model.train()
    model.encoder.layer1.eval()  # mixed modes must come back as they were
    for p in model.encoder.conv1.parameters():
        p.requires_grad_(False)
    modes = {n: m.training for n, m in model.named_modules()}
    req = {n: p.requires_grad for n, p in model.named_parameters()}
    bn = model.encoder.layer4[1].bn2
    stats = bn.running_mean.clone(), bn.num_batches_tracked.clone()
    x = torch.rand(2, 3, 32, 32)
    for cls in (CAM, GradCAM, GradCAMPlusPlus, XGradCAM, LayerCAM, HiResCAM, EigenCAM, ScoreCAM):
        with cls(model, **({"batch_size": 256} if cls is ScoreCAM else {})) as method:
            method(x, 1)
        assert _hook_count(model) == 0, cls.__name__
    with pytest.raises(ValueError):
        GradCAM(model)(x, torch.tensor([0, 1, 2]))  # wrong length: raises after the forward
    assert _hook_count(model) == 0
    assert {n: m.training for n, m in model.named_modules()} == modes
    assert {n: p.requires_grad for n, p in model.named_parameters()} == req
    assert all(p.grad is None for p in model.parameters())  # no backward to the parameters
    assert torch.equal(bn.running_mean, stats[0]) and torch.equal(bn.num_batches_tracked, stats[1])


class _CamProbe(L.LightningModule):
    def __init__(self, clf):
        super().__init__()
        self.clf = clf
        self.maps = []

    def forward(self, x):
        return self.clf(x)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        assert torch.is_inference_mode_enabled()
        self.maps.append(GradCAMPlusPlus(self, "clf.encoder.layer3")(x, y).clone())
        self.maps.append(CAM(self, "clf.encoder.layer4")(x, y).clone())


def test_works_inside_lightning_validation(clf):
    torch.manual_seed(0)
    x = torch.rand(2, 3, 64, 64)
    y = torch.tensor([1, 2])
    probe = _CamProbe(clf)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=2)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    trainer.validate(probe, loader, verbose=False)
    assert len(probe.maps) == 2
    torch.testing.assert_close(probe.maps[0], GradCAMPlusPlus(clf, "encoder.layer3")(x, y), atol=1e-5, rtol=0)
    torch.testing.assert_close(probe.maps[1], CAM(clf)(x, y), atol=1e-5, rtol=0)
    assert _hook_count(clf) == 0


def test_differentiable_map_reaches_parameters(clf):
    x = torch.rand(2, 3, 64, 64)
    plain = GradCAM(clf)(x, 1)
    maps = GradCAM(clf, differentiable=True)(x, 1)
    torch.testing.assert_close(maps.detach(), plain, atol=1e-5, rtol=0)
    clf.zero_grad()
    maps.square().mean().backward()
    g_enc, g_fc = clf.encoder.layer3[0].conv1.weight.grad, clf.fc.weight.grad
    assert g_enc is not None and g_enc.abs().sum() > 0 and g_fc.abs().sum() > 0
    clf.zero_grad(set_to_none=True)


class Tiny3D(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv3d(4, 6, 3, stride=2, padding=1),
                                      nn.ReLU(), nn.Conv3d(6, 8, 3, padding=1), nn.ReLU())
        self.head = nn.Sequential(nn.Conv3d(8, 8, 1), nn.Tanh())
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        return self.fc(self.head(self.features(x)).mean((2, 3, 4)))


def test_3d_against_autograd_reference():
    torch.manual_seed(0)
    model = Tiny3D().eval()
    x = torch.randn(2, 1, 8, 12, 10)
    idx = torch.tensor([2, 0])
    # slow obvious reference: full backward with retain_grad on the target output, per sample
    refs = {"grad": [], "layer": [], "hires": []}
    for b in range(2):
        store = {}
        def keep(m, i, o):
            o.retain_grad()
            store["a"] = o

        h = model.features.register_forward_hook(keep)
        model(x[b:b + 1].requires_grad_())[0, idx[b]].backward()
        h.remove()
        a, g = store["a"][0].detach(), store["a"].grad[0]
        refs["grad"].append((g.mean((1, 2, 3))[:, None, None, None] * a).sum(0))
        refs["layer"].append((g.clamp(min=0) * a).sum(0))
        refs["hires"].append((g * a).sum(0))
    model.zero_grad(set_to_none=True)
    for name, cls in (("grad", GradCAM), ("layer", LayerCAM), ("hires", HiResCAM)):
        ref = torch.relu(torch.stack(refs[name]))
        ref = F.interpolate(ref[:, None], size=(8, 12, 10), mode="trilinear", align_corners=False)[:, 0]
        lo = ref.flatten(1).min(1).values.view(-1, 1, 1, 1)
        ref = (ref - lo) / ((ref - lo).flatten(1).max(1).values.view(-1, 1, 1, 1) + 1e-7)
        got = cls(model, "features")(x, idx)
        assert got.shape == (2, 8, 12, 10)
        assert ref.std() > 0.05
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)


def test_3d_scorecam_and_eigencam_against_slow_references():
    torch.manual_seed(1)
    model = Tiny3D().eval()
    x = torch.randn(2, 1, 8, 12, 10)
    idx = torch.tensor([1, 2])
    with torch.no_grad():
        act = model.features(x)
    size = (8, 12, 10)

    def finish(raw):
        ref = F.interpolate(torch.relu(raw)[:, None], size=size, mode="trilinear", align_corners=False)[:, 0]
        lo = ref.flatten(1).min(1).values.view(-1, 1, 1, 1)
        return (ref - lo) / ((ref - lo).flatten(1).max(1).values.view(-1, 1, 1, 1) + 1e-7)

    # Score-CAM: one masked forward per (sample, channel), in a loop
    raws = []
    for b in range(2):
        scores = []
        for k in range(act.shape[1]):
            up = F.interpolate(act[b:b + 1, k:k + 1], size=size, mode="trilinear", align_corners=True)[0, 0]
            mask = (up - up.min()) / (up.max() - up.min() + 1e-8)
            with torch.no_grad():
                scores.append(model(x[b:b + 1] * mask)[0, idx[b]])
        w = torch.softmax(torch.stack(scores), 0)
        raws.append((w[:, None, None, None] * act[b]).sum(0))
    ref = finish(torch.stack(raws))
    assert ref.std() > 0.05
    torch.testing.assert_close(ScoreCAM(model, "features", batch_size=5)(x, idx), ref, atol=2e-4, rtol=0)
    # Eigen-CAM: first right singular vector of the centred (N, C) activations, sign fixed by the mean activation
    raws = []
    for b in range(2):
        a = act[b].reshape(act.shape[1], -1).T.double()
        a = a - a.mean(0)
        _, _, vh = torch.linalg.svd(a, full_matrices=False)
        proj = a @ vh[0]
        if torch.corrcoef(torch.stack([proj, act[b].mean(0).flatten().double()]))[0, 1] < 0:
            proj = -proj
        raws.append(proj.float().view(act.shape[2:]))
    ref = finish(torch.stack(raws))
    torch.testing.assert_close(EigenCAM(model, "features")(x), ref, atol=1e-4, rtol=0)
