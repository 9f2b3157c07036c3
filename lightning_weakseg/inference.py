"""Inference shared by ``predict_step``, the test metrics and the benchmarks: from a batch to class
probabilities at each image's own height × width.

A **predictor** is any callable ``(B,C,H,W) float → (B,K,H,W)`` class probabilities at the input's size
(``lambda x: module(x)["probs"]``). On top of it:

* :func:`whole_image` — pad to a multiple of the encoder's output stride, predict, crop back;
* :func:`sliding_window` — overlapping windows blended by MONAI's ``sliding_window_inference`` (Gaussian or
  uniform weights), for images larger than the network should see at once;
* :func:`flip_tta` — the mean of the probabilities over flipped copies (test-time augmentation);
* :func:`to_native` — map base-view probabilities back to the source file's pixels: crop the ``content`` region
  that holds the resized image (the rest is letterbox padding) and resize it bilinearly to ``orig_size``.

Two scales (``WeakSegModule(predict_scale=...)``):

* ``"train"`` (default) — the image goes through the same resize as in training (the base view of
  ``image_size``), the model predicts there, :func:`to_native` maps the probabilities back. A model trained on
  images downscaled to 64 px has learnt the objects' downscaled size; this is the scale it knows.
* ``"native"`` — the model sees the image at its own pixel size (:func:`native_inference`: the whole image padded
  to the stride, or sliding windows of ``window`` px when it is larger), for models trained at full resolution.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

Predictor = Callable[[Tensor], Tensor]

__all__ = ["Predictor", "class_map", "output_stride", "pad_to_multiple", "whole_image", "sliding_window", "flip_tta",
           "to_native", "native_inference"]


def class_map(probs: Tensor, dim: int = 1) -> Tensor:
    """The label map: index of the largest score along ``dim`` (the first on ties, as ``argmax``).
    ``torch.max(...).indices`` rather than ``argmax``: on CPU, ``argmax`` over a dimension that is not the last
    runs an order of magnitude slower."""
    return torch.max(probs, dim).indices


def output_stride(model: torch.nn.Module, default: int = 32) -> int:
    """The factor the input's height and width must be divisible by: an SMP model's ``encoder.output_stride``
    (32 for most encoders, less with dilation), ``default`` for other models."""
    enc = getattr(model, "encoder", None)
    s = getattr(enc, "output_stride", None)
    if s is None:
        return default
    return int(s)


def pad_to_multiple(x: Tensor, multiple: int, value: float = 0.0) -> tuple[Tensor, tuple[int, int]]:
    """Pad (B,C,H,W) at the bottom and right with ``value`` to the next multiple of ``multiple``; returns the
    padded tensor and the original (H, W). Zero is what the letterbox padding of training holds."""
    h, w = x.shape[-2:]
    ph, pw = (-h) % multiple, (-w) % multiple
    if ph or pw:
        x = F.pad(x, (0, pw, 0, ph), value=value)
    return x, (h, w)


def whole_image(predictor: Predictor, x: Tensor, stride: int = 32) -> Tensor:
    """Probabilities (B,K,H,W) of the whole image in one forward pass: padded to a multiple of ``stride``,
    cropped back to (H, W)."""
    _check_image(x)
    xp, (h, w) = pad_to_multiple(x, stride)
    return predictor(xp)[..., :h, :w]


def sliding_window(predictor: Predictor, x: Tensor, window: int | Sequence[int], overlap: float = 0.25,
                   stride: int = 32, blend: str = "gaussian", batch_size: int = 4) -> Tensor:
    """Probabilities (B,K,H,W) from overlapping ``window``-px windows blended by
    ``monai.inferers.sliding_window_inference`` (``blend="gaussian"`` weighs window centres more, ``"constant"``
    averages uniformly).

    The image is first padded like :func:`whole_image` (bottom/right to a multiple of ``stride``) and the window
    clipped to the padded size, so an image that fits in one window gives the :func:`whole_image` result.

    Args:
        window: window height and width (int or (h, w)), each a multiple of ``stride``.
        overlap: fraction of a window shared with its neighbour, in [0, 1).
        batch_size: windows per forward pass.
    """
    from monai.inferers import sliding_window_inference

    _check_image(x)
    wh, ww = (window, window) if isinstance(window, int) else tuple(window)
    if wh % stride or ww % stride or wh <= 0 or ww <= 0:
        raise ValueError(f"window {(wh, ww)} must be positive multiples of the encoder's output stride {stride}")
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    if blend not in ("gaussian", "constant"):
        raise ValueError(f"blend must be 'gaussian' or 'constant', got {blend!r}")
    xp, (h, w) = pad_to_multiple(x, stride)
    roi = (min(wh, xp.shape[-2]), min(ww, xp.shape[-1]))
    out = sliding_window_inference(xp, roi, batch_size, predictor, overlap=overlap, mode=blend)
    return out[..., :h, :w]


def flip_tta(predictor: Predictor, flips: Sequence[Sequence[int]] = ((), (-1,), (-2,), (-2, -1))) -> Predictor:
    """A predictor that averages ``predictor``'s probabilities over flipped inputs (each flipped back):
    by default identity, horizontal, vertical and both."""
    flips = [tuple(f) for f in flips]
    if not flips:
        raise ValueError("flip_tta needs at least one flip (() is the identity)")

    def predict(x: Tensor) -> Tensor:
        total = None
        for dims in flips:
            p = predictor(x.flip(dims) if dims else x)
            p = p.flip(dims) if dims else p
            total = p if total is None else total + p
        return total / len(flips)

    return predict


def to_native(probs: Tensor, content: Tensor | None, orig_size: Tensor | None) -> list[Tensor]:
    """Base-view probabilities (B,K,H,W) → a list of B tensors (K,H0_i,W0_i) at each source image's size.

    ``content[i] = [top, left, h, w]`` is the region of the base view that holds image ``i`` (the rest is
    padding), ``orig_size[i] = [H0, W0]`` its size in the file (the batch contract's geometry keys). The region is
    cropped and resized bilinearly (half-pixel centres, as the data pipeline's resize; antialiased when it
    shrinks). Without geometry the base view is the native view: the probabilities are returned per image.
    """
    if probs.ndim != 4:
        raise ValueError(f"expected probabilities (B,K,H,W), got shape {tuple(probs.shape)}")
    B = probs.shape[0]
    if content is None or orig_size is None:
        return list(probs.unbind(0))
    content, orig_size = torch.as_tensor(content).reshape(B, 4), torch.as_tensor(orig_size).reshape(B, 2)
    out = []
    for p, (top, left, h, w), (h0, w0) in zip(probs, content.tolist(), orig_size.tolist()):
        crop = p[:, top:top + h, left:left + w]
        if (h, w) != (h0, w0):
            shrink = h0 < h or w0 < w
            crop = F.interpolate(crop[None].float(), size=(h0, w0), mode="bilinear", align_corners=False,
                                 antialias=shrink)[0].to(p.dtype)
        out.append(crop)
    return out


def native_inference(predictor: Predictor, image: Tensor, stride: int = 32, window: int | None = None,
                     overlap: float = 0.25, blend: str = "gaussian", batch_size: int = 4) -> Tensor:
    """Probabilities (B,K,H,W) of images at their own pixel size: :func:`whole_image` when ``window`` is None
    or the image fits in it, otherwise :func:`sliding_window` with ``window``-px windows."""
    _check_image(image)
    h, w = image.shape[-2:]
    if window is None or (h <= window and w <= window):
        return whole_image(predictor, image, stride)
    return sliding_window(predictor, image, window, overlap, stride, blend, batch_size)


def _check_image(x: Tensor) -> None:
    if not isinstance(x, Tensor) or x.ndim != 4 or not x.is_floating_point():
        raise ValueError(f"expected a float image batch (B,C,H,W), got {type(x).__name__} "
                         f"{tuple(getattr(x, 'shape', ()))} {getattr(x, 'dtype', '')}")
