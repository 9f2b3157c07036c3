"""WeakSegModule: any SMP arch × encoder trains a step; terms compose; NaN guard; checkpoint rebuilds."""
import lightning as L
import pytest
import torch

from lightning_weakseg import NonFiniteLossError, WeakSegModule
from lightning_weakseg.data import WeakSegDataModule, collate
from lightning_weakseg.data.synthetic import SyntheticDataset
from lightning_weakseg.module import masked_cross_entropy


@pytest.fixture(scope="module")
def batch():
    ds = SyntheticDataset("organ", n=2, image_size=32, in_channels=3, labels=("mask",))
    return collate([ds[0], ds[1]])


@pytest.mark.parametrize("arch", ["Unet", "UnetPlusPlus", "FPN", "DeepLabV3Plus", "Segformer"])
@pytest.mark.parametrize("encoder", ["resnet18", "mobilenet_v2", "efficientnet-b0", "tu-resnet10t"])
def test_any_arch_encoder_trains_a_step(arch, encoder, batch):
    torch.manual_seed(0)
    # GroupNorm: batch-independent and well conditioned at random init (eval-mode BatchNorm with untrained running
    # statistics gives gradient norms of 1e6 on some encoders); it also checks norm replacement on every encoder
    m = WeakSegModule(arch=arch, encoder=encoder, in_channels=3, num_classes=4, norm="group")
    assert not any(isinstance(x, torch.nn.BatchNorm2d) for x in m.modules())
    torch.manual_seed(1)  # same dropout masks in both forward passes
    out = m(batch["image"])
    assert out["logits"].shape == (2, 4, 32, 32)
    loss = m.loss_terms(batch, out)["seg/ce"]
    loss.backward()
    first = next(p for p in m.model.encoder.parameters() if p.ndim == 4)
    last = [p for p in m.model.segmentation_head.parameters()][0]
    assert first.grad.abs().sum() > 0 and last.grad.abs().sum() > 0  # the gradient reaches both ends
    # a short normalised gradient step: small enough for any architecture's curvature
    params = [p for p in m.parameters() if p.grad is not None]
    gnorm = torch.sqrt(sum((p.grad ** 2).sum() for p in params))
    with torch.no_grad():
        for p in params:
            p -= 1e-2 * p.grad / gnorm
    torch.manual_seed(1)
    with torch.no_grad():
        assert m.loss_terms(batch, m(batch["image"]))["seg/ce"] < loss  # a step down the gradient lowers the loss


def test_masked_ce_equals_reference():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 3, 5, 5, generator=g)
    target = torch.randint(0, 3, (2, 5, 5), generator=g)
    target[0, :2] = 255
    target[1] = 255
    got = masked_cross_entropy(logits, target, reduction="none")
    lab = target[0] != 255
    ref0 = torch.nn.functional.cross_entropy(logits[0].permute(1, 2, 0)[lab], target[0][lab])
    assert torch.allclose(got[0], ref0) and got[1] == 0
    assert masked_cross_entropy(logits, target) == got.sum()  # the library's default reduction


class ExtraTermMixin:
    default_loss_weights = {"extra/const": 0.5}

    def __init__(self, *, extra_value: float = 2.0, **kwargs):
        super().__init__(**kwargs)
        self.extra_value = extra_value

    def loss_terms(self, batch, out):
        terms = super().loss_terms(batch, out)
        terms["extra/const"] = out["logits"].mean() * 0 + self.extra_value
        return terms


class ExtraModule(ExtraTermMixin, WeakSegModule):
    pass


def test_mixin_terms_compose_weighted_and_hparams_recorded(batch):
    m = ExtraModule(in_channels=3, num_classes=4, extra_value=3.0, loss_weights={"seg/ce": 2.0})
    assert m.hparams.extra_value == 3.0 and m.hparams.num_classes == 4
    out = m(batch["image"])
    terms = m.loss_terms(batch, out)
    assert set(terms) == {"seg/ce", "extra/const"}
    m._trainer = None
    m.log = lambda *a, **k: None
    total = m.combine_terms(terms, out, batch, "train")
    assert torch.allclose(total, 2.0 * terms["seg/ce"] + 0.5 * 3.0)


def test_unlabelled_sample_gets_exactly_zero_gradient(batch):
    m = WeakSegModule(in_channels=3, num_classes=4, norm="group")
    b = dict(batch)
    b["has_mask"] = torch.tensor([True, False])
    b["mask"] = batch["mask"].clone()
    b["mask"][1] = 255
    x = batch["image"].clone().requires_grad_(True)
    loss = m.loss_terms(b, m(x))["seg/ce"]
    loss.backward()
    assert x.grad[1].abs().max() == 0 and x.grad[0].abs().max() > 0


def test_nonfinite_term_names_term_step_and_samples(batch):
    m = ExtraModule(in_channels=3, num_classes=4, extra_value=float("nan"))
    m.log = lambda *a, **k: None
    out = m(batch["image"])
    with pytest.raises(NonFiniteLossError, match=r"extra/const.*step 0.*organ_0_00000"):
        m.combine_terms(m.loss_terms(batch, out), out, batch, "train")
    m.hparams.on_nonfinite = "skip"
    with pytest.warns(UserWarning, match=r"skipping the batch.*extra/const"):
        assert m.combine_terms(m.loss_terms(batch, out), out, batch, "train") is None


def test_fit_checkpoint_rebuild_and_predict(tmp_path):
    L.seed_everything(0)
    dm = WeakSegDataModule(synthetic_kind="organ", n_samples=24, image_size=32, batch_size=8)
    m = ExtraModule(in_channels=1, num_classes=4, encoder="resnet18", extra_value=1.5)
    tr = L.Trainer(max_epochs=1, accelerator="cpu", default_root_dir=tmp_path, enable_progress_bar=False,
                   logger=False)
    tr.fit(m, dm)
    assert {"val/dice", "val/iou", "val/hd95", "val/dice_1", "val/dice_3"} <= set(tr.callback_metrics)
    ckpt = tmp_path / "m.ckpt"
    tr.save_checkpoint(ckpt)
    m2 = ExtraModule.load_from_checkpoint(ckpt)
    assert m2.hparams.extra_value == 1.5 and m2.hparams.in_channels == 1
    x = torch.rand(2, 1, 32, 32)
    m.eval(), m2.eval()
    assert torch.allclose(m(x)["logits"], m2(x)["logits"])
    preds = tr.predict(m, dm)
    p = preds[0]["probs"][0]  # per image, at its source size (K, H0, W0)
    assert p.shape == (4, 32, 32)
    assert torch.allclose(p.sum(0), torch.ones_like(p[0]), atol=1e-5)
    assert torch.equal(preds[0]["labels"][0], p.argmax(0))
