"""lightning_weakseg.inference: whole-image padding, sliding windows (MONAI), flip TTA, the map back to native size."""
import cv2
import numpy as np
import pytest
import segmentation_models_pytorch as smp
import torch

from lightning_weakseg.data.geometry import fit
from lightning_weakseg.inference import (flip_tta, native_inference, output_stride, pad_to_multiple,
                                         sliding_window, to_native, whole_image)


def pointwise_predictor(seed=0, k=3, c=3):
    """A per-pixel predictor (1×1 conv + softmax): its output at a pixel depends on that pixel only, so any correct
    tiling into windows must give exactly the whole-image result."""
    g = torch.Generator().manual_seed(seed)
    w, b = torch.randn(k, c, 1, 1, generator=g), torch.randn(k, generator=g)
    return lambda x: torch.conv2d(x, w, b).softmax(1)


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    m = smp.create_model("Unet", encoder_name="resnet18", encoder_weights=None, in_channels=3, classes=3)
    with torch.no_grad():  # move the BatchNorm statistics away from their defaults
        m.train()
        m(torch.rand(4, 3, 64, 64))
    return m.eval()


def test_output_stride(unet):
    assert output_stride(unet) == 32
    assert output_stride(torch.nn.Conv2d(1, 1, 1)) == 32  # not an SMP model: the default


def test_whole_image_pads_bottom_right_and_crops(unet):
    x = torch.rand(2, 3, 45, 70)
    seen = []

    def pred(z):
        seen.append(tuple(z.shape[-2:]))
        return unet(z).softmax(1)

    with torch.no_grad():
        out = whole_image(pred, x, 32)
        padded = torch.zeros(2, 3, 64, 96)
        padded[..., :45, :70] = x
        ref = unet(padded).softmax(1)[..., :45, :70]
    assert seen == [(64, 96)]
    assert out.shape == (2, 3, 45, 70)
    torch.testing.assert_close(out, ref)
    xp, hw = pad_to_multiple(x, 32)
    assert hw == (45, 70) and xp.shape[-2:] == (64, 96) and torch.equal(xp[..., :45, :70], x)


@pytest.mark.parametrize("hw", [(60, 70), (64, 64), (33, 90)])
def test_sliding_window_equals_whole_image_in_one_window(unet, hw):
    x = torch.rand(1, 3, *hw)
    with torch.no_grad():
        pred = lambda z: unet(z).softmax(1)  # noqa: E731
        whole = whole_image(pred, x, 32)
        windows = sliding_window(pred, x, window=96, overlap=0.5, stride=32)
    assert windows.shape == whole.shape == (1, 3, *hw)
    torch.testing.assert_close(windows, whole, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("blend", ["gaussian", "constant"])
def test_sliding_window_stitches_windows_in_place(blend):
    """Many overlapping windows over a 150×170 image: with a per-pixel predictor every window holds the exact
    values of the whole image, so the blend must reproduce it; a window put at a wrong offset would not."""
    pred = pointwise_predictor()
    x = torch.rand(2, 3, 150, 170)
    calls = []

    def counting(z):
        calls.append(z.shape[0])
        return pred(z)

    out = sliding_window(counting, x, window=64, overlap=0.25, stride=32, blend=blend)
    torch.testing.assert_close(out, pred(x), atol=1e-5, rtol=1e-5)
    assert sum(calls) > 2 * 4  # several windows per image
    # native_inference: sliding windows only for images larger than the window
    torch.testing.assert_close(native_inference(pred, x, 32, window=64), pred(x), atol=1e-5, rtol=1e-5)


def test_sliding_window_checks_arguments():
    pred = pointwise_predictor()
    with pytest.raises(ValueError, match="multiples of the encoder's output stride"):
        sliding_window(pred, torch.rand(1, 3, 64, 64), window=50, stride=32)
    with pytest.raises(ValueError, match="overlap"):
        sliding_window(pred, torch.rand(1, 3, 64, 64), window=64, overlap=1.0)


def test_flip_tta_is_the_mean_over_flips():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(2, 3, 3, 3, generator=g)
    pred = lambda z: torch.conv2d(z, w, padding=1).softmax(1)  # noqa: E731  (not flip-invariant)
    x = torch.rand(1, 3, 16, 20)
    ref = (pred(x) + pred(x.flip(-1)).flip(-1) + pred(x.flip(-2)).flip(-2) + pred(x.flip(-2, -1)).flip(-2, -1)) / 4
    out = flip_tta(pred)(x)
    torch.testing.assert_close(out, ref)
    assert not torch.allclose(out, pred(x), atol=1e-3)
    torch.testing.assert_close(flip_tta(pred, [()])(x), pred(x))


def test_to_native_matches_a_per_channel_cv2_resize():
    """Letterboxed base views of 64 px back to 97×131 and 256×216 (upscaling): the crop of ``content`` resized
    with OpenCV's bilinear (half-pixel centres, like the data pipeline) channel by channel."""
    sizes = [(97, 131), (256, 216)]
    probs = torch.rand(2, 3, 64, 64).softmax(1)
    content, orig = [], []
    for h0, w0 in sizes:
        g = fit(h0, w0, 64, 64, "longest")
        content.append([g.top, g.left, g.h, g.w])
        orig.append([h0, w0])
    out = to_native(probs, torch.tensor(content), torch.tensor(orig))
    for p, (top, left, h, w), (h0, w0) in zip(probs.numpy(), content, orig):
        ref = np.stack([cv2.resize(np.ascontiguousarray(p[k, top:top + h, left:left + w]), (w0, h0),
                                   interpolation=cv2.INTER_LINEAR) for k in range(3)])
        got = out.pop(0)
        assert got.shape == (3, h0, w0)
        np.testing.assert_allclose(got.numpy(), ref, atol=1e-5)
    # no geometry: the base view is the native view
    same = to_native(probs, None, None)
    assert len(same) == 2 and torch.equal(same[1], probs[1])
    # shrinking (base view larger than the file) keeps probabilities summing to one
    small = to_native(probs, torch.tensor([[0, 0, 64, 64]] * 2), torch.tensor([[20, 30]] * 2))
    assert small[0].shape == (3, 20, 30)
    torch.testing.assert_close(small[0].sum(0), torch.ones(20, 30), atol=1e-5, rtol=0)
