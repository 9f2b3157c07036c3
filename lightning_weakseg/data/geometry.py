"""How an image of any size becomes the base view the model trains on, and back.

``resize`` modes (``WeakSegDataModule(resize=...)``):

* ``"longest"`` (default) — letterbox: scale by ``min(H/h0, W/w0)`` so the whole image fits and keeps its aspect,
  then pad (centred) to ``H × W``;
* ``"pad"`` — no scaling: pad (centred) to ``H × W``; an image larger than the base view is an error;
* ``"stretch"`` — resize to ``H × W``, changing the aspect ratio when the image is not of the base view's shape.

Padded pixels are 0 in the image and 255 (unknown) in every label map, so they add nothing to a loss or a metric;
:func:`fit` returns the geometry that maps the base view back to the file's pixels.
"""
from __future__ import annotations

from typing import NamedTuple

__all__ = ["Fit", "fit", "RESIZE_MODES"]

RESIZE_MODES = ("longest", "pad", "stretch")


class Fit(NamedTuple):
    """The resized image is ``h × w`` and sits at ``(top, left)`` of the ``H × W`` base view; ``sy, sx`` are the
    scale factors from the file's pixels to the base view's."""
    top: int
    left: int
    h: int
    w: int
    sy: float
    sx: float


def fit(h0: int, w0: int, H: int, W: int, mode: str = "longest") -> Fit:
    """Geometry of a ``h0 × w0`` image in a ``H × W`` base view.

    >>> fit(256, 216, 64, 64)                       # letterbox: 64 × 54, 5 columns of padding left and right
    Fit(top=0, left=5, h=64, w=54, sy=0.25, sx=0.25)
    >>> fit(256, 216, 64, 64, "stretch").sx
    0.2962962962962963
    """
    if mode == "stretch":
        return Fit(0, 0, H, W, H / h0, W / w0)
    if mode == "longest":
        s = min(H / h0, W / w0)
        h, w = min(H, max(1, round(h0 * s))), min(W, max(1, round(w0 * s)))
        return Fit((H - h) // 2, (W - w) // 2, h, w, h / h0, w / w0)
    if mode == "pad":
        if h0 > H or w0 > W:
            raise ValueError(f"resize='pad' keeps the pixel size: a {h0}x{w0} image does not fit a {H}x{W} base "
                             "view (use resize='longest')")
        return Fit((H - h0) // 2, (W - w0) // 2, h0, w0, 1.0, 1.0)
    raise ValueError(f"resize must be one of {RESIZE_MODES}, got {mode!r}")
