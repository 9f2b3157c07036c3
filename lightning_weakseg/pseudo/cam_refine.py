"""From class activation maps to pseudo-masks: affinity random walk, dense-CRF refinement, confident thresholds.

Layout everywhere: ``cams`` (B, K, H, W) scores in [0, 1] with one column per class *including* background at
column 0, aligned with the multi-hot ``tags`` (B, K) of the batch contract. Column 0 of ``cams`` is unused by
:func:`cam_to_pseudo` (background comes from the thresholds) and may hold a background map for the
refiners.

* :func:`affinity_random_walk` — Ahn & Kwak (CVPR 2018, AffinityNet) propagation without the second network:
  affinities from colour and position over a local disk, T = D⁻¹A^{∘β}, refined = T^t·vec(CAM). Batched torch
  (a block-diagonal sparse T), any device.
* :func:`crf_refine_cams` — dense CRF (pydensecrf2) on CAM scores turned into probabilities (NumPy, offline).
* :func:`cam_to_pseudo` — confident foreground / background with an ignore band (255), multi-class by arg-max
  over the tagged classes.
"""
from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor

from ..data.batch import IGNORE_INDEX


__all__ = ["affinity_random_walk", "disk_offsets", "cam_to_pseudo", "cams_to_probs", "crf_refine_cams"]


def disk_offsets(radius: float, device=None) -> Tensor:
    """(O, 2) integer offsets (dy, dx) with dy² + dx² ≤ radius², the centre included."""
    r = int(math.floor(radius))
    d = torch.arange(-r, r + 1, device=device)
    dy, dx = torch.meshgrid(d, d, indexing="ij")
    keep = (dy * dy + dx * dx) <= radius * radius
    return torch.stack([dy[keep], dx[keep]], 1)


def _check_cams(cams: Tensor, name: str = "cams") -> None:
    if not isinstance(cams, Tensor) or cams.ndim != 4:
        shape = tuple(cams.shape) if isinstance(cams, Tensor) else type(cams).__name__
        raise ValueError(f"{name}: expected (B, K, H, W), got {shape}")


def _tag_mask(tags: Tensor, cams: Tensor) -> Tensor:
    if tags.ndim != 2 or tags.shape != cams.shape[:2]:
        raise ValueError(f"tags: expected (B, K) = {tuple(cams.shape[:2])} like cams, got {tuple(tags.shape)}")
    return tags.to(cams.device) > 0.5


def transition_matrix(image: Tensor, radius: float = 5.0, sigma_rgb: float = 0.1, sigma_xy: float | None = None,
                      beta: float = 8.0) -> Tensor:
    """Block-diagonal sparse (B·N, B·N) row-stochastic T = D⁻¹A^{∘β}, N = H·W, for images (B, C, H, W).

    a_ij = exp(−‖I_i − I_j‖²/2σ_rgb² − ‖p_i − p_j‖²/2σ_xy²) for ‖p_i − p_j‖ ≤ radius (else 0; no position term
    when ``sigma_xy`` is None), raised element-wise to β. Self-affinity is 1, so every row has mass.
    """
    b, c, h, w = image.shape
    n = h * w
    dev = image.device
    off = disk_offsets(radius, dev)                                           # (O, 2)
    yy, xx = torch.meshgrid(torch.arange(h, device=dev), torch.arange(w, device=dev), indexing="ij")
    ny, nx = yy.reshape(-1, 1) + off[:, 0], xx.reshape(-1, 1) + off[:, 1]     # (N, O)
    valid = (ny >= 0) & (ny < h) & (nx >= 0) & (nx < w)
    col = (ny.clamp(0, h - 1) * w + nx.clamp(0, w - 1))                       # (N, O)
    feat = image.float().flatten(2).transpose(1, 2)                          # (B, N, C)
    diff = feat[:, :, None, :] - feat[:, col.reshape(-1), :].view(b, n, -1, c)
    energy = diff.pow(2).sum(-1) / (2 * sigma_rgb ** 2)                       # (B, N, O)
    if sigma_xy is not None:
        energy = energy + off.pow(2).sum(1).float() / (2 * sigma_xy ** 2)
    a = torch.exp(-beta * energy) * valid                                    # A^{∘β}
    a = a / a.sum(-1, keepdim=True)                                          # D⁻¹ (self-affinity keeps D > 0)
    # rows are already in CSR order (sample, pixel) and each row's columns ascend with the offsets (dy, dx)
    keep = valid[None].expand_as(a)
    cols = (torch.arange(b, device=dev)[:, None, None] * n + col[None]).expand_as(a)[keep]
    crow = torch.zeros(b * n + 1, dtype=torch.long, device=dev)
    crow[1:] = valid.sum(1).repeat(b).cumsum(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "sparse CSR support is in beta"
        return torch.sparse_csr_tensor(crow, cols, a[keep], (b * n, b * n))


def affinity_random_walk(cams: Tensor, image: Tensor, *, radius: float = 5.0, sigma_rgb: float = 0.1,
                         sigma_xy: float | None = None, beta: float = 8.0, iterations: int = 64,
                         downscale: int = 1, tags: Tensor | None = None, background_alpha: float | None = None,
                         renormalize: bool = True) -> Tensor:
    """Propagate CAM scores along image affinities (Ahn & Kwak 2018, without a learned affinity network).

    With features f_i = (colour I_i, position p_i), for j within ``radius`` of i:

        a_ij = exp(−‖I_i − I_j‖²/2σ_rgb² − ‖p_i − p_j‖²/2σ_xy²),   T = D⁻¹ A^{∘β},   M* = T^t · vec(M)

    (D the diagonal of row sums, t = ``iterations``). Each channel is propagated independently; T is built
    per image and applied as one block-diagonal sparse matrix for the whole batch.

    Args:
        cams: (B, K, H, W) non-negative scores, column 0 = background (see the module docstring).
        image: (B, C, H', W') float image; resized (area) to the working resolution.
        radius, sigma_rgb, sigma_xy, beta: the affinity (pixels of the working resolution; σ in image units).
        iterations: t, the power of T (AffinityNet: 256 at 1/8 resolution; more steps diffuse further).
        downscale: work at (H/downscale, W/downscale) (average pooling), then upsample bilinearly.
        tags: optional (B, K) multi-hot; untagged columns are zeroed before the walk.
        background_alpha: if set, column 0 is replaced by the background map (1 − max_{c≥1} M_c)^α before the
            walk, and after it every foreground column is set to 0 where the propagated background is larger
            than every foreground column (AffinityNet's background "class").
        renormalize: divide each propagated channel by its per-sample maximum (the walk averages, so peaks drop).

    Returns:
        (B, K, H, W) refined scores (in [0, 1] when ``renormalize``).

    Example:
        >>> img = torch.zeros(1, 1, 6, 6); img[..., 3:] = 1          # two flat halves
        >>> cam = torch.zeros(1, 2, 6, 6); cam[0, 1, 2, 1] = 1       # one seed in the left half
        >>> out = affinity_random_walk(cam, img, radius=2, iterations=200)
        >>> bool(out[0, 1, :, :3].min() > 0.9), bool(out[0, 1, :, 3:].max() < 1e-6)
        (True, True)
    """
    _check_cams(cams)
    if not isinstance(image, Tensor) or image.ndim != 4 or image.shape[0] != cams.shape[0]:
        shape = tuple(image.shape) if isinstance(image, Tensor) else type(image).__name__
        raise ValueError(f"image: expected (B, C, H, W) with B = {cams.shape[0]}, got {shape}")
    if iterations < 0 or downscale < 1 or radius < 1:
        raise ValueError(f"expected iterations >= 0, downscale >= 1, radius >= 1; got {iterations}, {downscale}, {radius}")
    b, k, h, w = cams.shape
    m = cams.float()
    if tags is not None:
        m = m * _tag_mask(tags, cams)[:, :, None, None]
    if background_alpha is not None:
        m = m.clone()
        m[:, 0] = (1 - m[:, 1:].amax(1).clamp(0, 1)).pow(background_alpha) if k > 1 else 1.0
    hs, ws = max(1, h // downscale), max(1, w // downscale)
    small = F.adaptive_avg_pool2d(m, (hs, ws)) if (hs, ws) != (h, w) else m
    img = F.adaptive_avg_pool2d(image.float(), (hs, ws)) if tuple(image.shape[2:]) != (hs, ws) else image.float()
    t = transition_matrix(img, radius, sigma_rgb, sigma_xy, beta)
    v = small.flatten(2).transpose(1, 2).reshape(b * hs * ws, k)              # (B·N, K)
    for _ in range(int(iterations)):
        v = t @ v
    out = v.view(b, hs * ws, k).transpose(1, 2).reshape(b, k, hs, ws)
    if (hs, ws) != (h, w):
        out = F.interpolate(out, size=(h, w), mode="bilinear", align_corners=False)
    if renormalize:
        peak = out.flatten(2).amax(2)[:, :, None, None]
        out = torch.where(peak > 0, out / peak.clamp_min(1e-12), torch.zeros_like(out))
    if background_alpha is not None and k > 1:
        bg_wins = out[:, :1] > out[:, 1:].amax(1, keepdim=True)
        out = torch.cat([out[:, :1], out[:, 1:].masked_fill(bg_wins, 0.0)], 1)
    return out.to(cams.dtype)


def cam_to_pseudo(cams: Tensor, tags: Tensor, fg_threshold: float = 0.4, bg_threshold: float = 0.15) -> Tensor:
    """Pseudo-mask (B, H, W) long with 255 = ignore from CAM scores and image tags.

    Per pixel, s = max over the tagged foreground classes c ≥ 1 of cams_c and ĉ its arg-max:

    * s ≥ ``fg_threshold`` → ĉ (confident foreground);
    * s < ``bg_threshold`` → 0 (confident background), or 255 when the background itself is not tagged;
    * otherwise → 255 (the ignore band; none when the two thresholds are equal).

    A sample with exactly one tag (including background alone) is that class everywhere; a sample without any
    tag is 255 everywhere. Untagged classes are never assigned. Column 0 of ``cams`` is not used.

    Example:
        >>> cams = torch.tensor([[[[0.0, 0.0]], [[0.9, 0.2]], [[0.5, 0.05]]]])   # (1, 3, 1, 2)
        >>> cam_to_pseudo(cams, torch.tensor([[1.0, 1.0, 1.0]]), 0.4, 0.1).tolist()
        [[[1, 255]]]
        >>> cam_to_pseudo(cams, torch.tensor([[1.0, 0.0, 1.0]]), 0.4, 0.1).tolist()   # class 1 untagged
        [[[2, 0]]]
    """
    _check_cams(cams)
    if not 0.0 <= bg_threshold <= fg_threshold:
        raise ValueError(f"expected 0 <= bg_threshold <= fg_threshold, got bg={bg_threshold}, fg={fg_threshold}")
    tagged = _tag_mask(tags, cams)
    b, k, h, w = cams.shape
    if k < 2:
        raise ValueError(f"cams: expected K >= 2 columns (background + classes), got {k}")
    fg = cams[:, 1:].float().masked_fill(~tagged[:, 1:, None, None], float("-inf"))
    score, arg = fg.max(1)
    score = torch.where(tagged[:, 1:].any(1)[:, None, None], score, torch.zeros_like(score))
    bg_ok = tagged[:, 0][:, None, None]
    out = torch.full((b, h, w), IGNORE_INDEX, dtype=torch.long, device=cams.device)
    out = torch.where(score >= fg_threshold, arg + 1, out)
    out = torch.where((score < bg_threshold) & bg_ok, torch.zeros_like(out), out)
    n_tags = tagged.sum(1)
    only = tagged.float().argmax(1)  # the single tag where n_tags == 1
    out = torch.where((n_tags == 1)[:, None, None], only[:, None, None].expand(b, h, w), out)
    return torch.where((n_tags == 0)[:, None, None], torch.full_like(out, IGNORE_INDEX), out)


def cams_to_probs(cams: Tensor, tags: Tensor, background_alpha: float = 1.0, eps: float = 1e-5) -> Tensor:
    """Class probabilities (B, K, H, W) from CAM scores: p_0 ∝ (1 − max_c M_c)^α (0 when the background is not
    tagged), p_c ∝ M_c for tagged classes, 0 for untagged ones, then normalised per pixel (ε keeps every tagged
    class alive for the CRF's −log p)."""
    _check_cams(cams)
    tagged = _tag_mask(tags, cams).float()[:, :, None, None]
    fg = cams[:, 1:].float().clamp(0, 1) * tagged[:, 1:]
    bg = (1 - fg.amax(1, keepdim=True)).pow(background_alpha) if fg.shape[1] else torch.ones_like(cams[:, :1])
    p = (torch.cat([bg, fg], 1) + eps) * tagged
    return p / p.sum(1, keepdim=True).clamp_min(1e-12)


def crf_refine_cams(cams: Tensor, image: Tensor, tags: Tensor, *, background_alpha: float = 1.0,
                    **crf_kwargs) -> Tensor:
    """Dense CRF refinement of CAM scores: :func:`cams_to_probs` → pydensecrf2 mean field per image → (B, K, H, W)
    marginals (untagged classes stay 0). ``image`` (B, C, H, W) float in [0, 1]; ``crf_kwargs`` go to
    :func:`~lightning_weakseg.pseudo.dense_crf` (``iterations``, ``sxy_bilateral``, ``srgb``…). Offline (NumPy)."""
    from .dense_crf import dense_crf

    probs = cams_to_probs(cams, tags, background_alpha)
    tagged = _tag_mask(tags, cams)
    img = (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    out = torch.zeros_like(probs)
    for i in range(probs.shape[0]):  # pydensecrf works on one image at a time
        keep = tagged[i].nonzero()[:, 0]
        if len(keep) < 2:
            out[i, keep] = 1.0
            continue
        p = probs[i, keep].detach().cpu().numpy()
        im = img[i][..., 0] if img.shape[-1] == 1 else img[i]
        out[i, keep] = torch.from_numpy(dense_crf(im, p, **crf_kwargs)).to(out.device)
    return out.to(cams.dtype)
