"""Activation-based CAM methods (no gradient needed): CAM, Score-CAM, Eigen-CAM."""
from __future__ import annotations

import copy
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import BaseCAM, ClassifierAdapter, logits_from_output, weighted_sum

__all__ = ["CAM", "ScoreCAM", "EigenCAM", "smp_encoder_head"]


class CAM(BaseCAM):
    """CAM (Zhou et al. 2016): M = Σ_k w_k^c A^k, w^c the row of the linear layer that follows global
    average pooling of the target layer.

    Args:
        fc_layer: that linear layer (module or dotted name); ``None`` picks the last ``nn.Linear`` of the
            model whose ``in_features`` equals the target layer's channel count.
    """

    uses_gradients = False

    def __init__(self, model: nn.Module, target_layer: nn.Module | str | None = None, *,
                 fc_layer: nn.Module | str | None = None, differentiable: bool = False, eval_mode: bool = True):
        super().__init__(model, target_layer, differentiable=differentiable, eval_mode=eval_mode)
        if isinstance(fc_layer, str):
            fc_layer = model.get_submodule(fc_layer)
        if fc_layer is not None and not isinstance(fc_layer, nn.Linear):
            raise TypeError(f"fc_layer must be an nn.Linear, got {type(fc_layer).__name__}")
        self.fc_layer = fc_layer

    def _fc(self, channels: int) -> nn.Linear:
        if self.fc_layer is not None:
            fc = self.fc_layer
        else:
            cands = [m for m in self.model.modules() if isinstance(m, nn.Linear) and m.in_features == channels]
            if not cands:
                raise ValueError(f"CAM found no nn.Linear with in_features={channels} (the target layer's channels); "
                                 "pass fc_layer")
            fc = cands[-1]
        if fc.in_features != channels:
            raise ValueError(f"fc_layer has in_features={fc.in_features}, expected the target layer's {channels} channels")
        return fc

    def raw_cam(self, x: Tensor, act: Tensor, grad: None, idx: Tensor) -> Tensor:
        weight = self._fc(act.shape[1]).weight
        if not self.differentiable:
            weight = weight.detach()
        return weighted_sum(weight[idx].to(act.dtype), act)


class _EncoderHead(nn.Module):
    """Image logits of an SMP model with a classification head, without its decoder:
    ``classification_head(encoder(x)[-1])`` — what ``SegmentationModel.forward`` returns as ``labels``."""

    def __init__(self, smp_model: nn.Module):
        super().__init__()
        self.encoder = smp_model.encoder
        self.classification_head = smp_model.classification_head
        self.training = smp_model.training  # this flag only: the wrapped modules keep theirs

    def forward(self, x: Tensor) -> Tensor:
        return self.classification_head(self.encoder(x)[-1])


def smp_encoder_head(model: nn.Module) -> nn.Module | None:
    """Encoder + classification head of an SMP model with ``aux_params``, if ``model``'s image logits are
    exactly that model's ``labels`` output: ``model`` is such a ``SegmentationModel`` (``forward`` not
    overridden), or a :class:`ClassifierAdapter` / ``WeakSegModule`` (``forward`` not overridden) around
    one. ``None`` otherwise."""
    try:
        from segmentation_models_pytorch.base import SegmentationModel
    except ImportError:  # pragma: no cover - SMP is a dependency
        return None
    inner = model
    for _ in range(4):
        if isinstance(inner, SegmentationModel):
            break
        if type(inner) is ClassifierAdapter or _is_plain_weakseg(inner):
            inner = inner.model
        else:
            return None
    if (not isinstance(inner, SegmentationModel) or type(inner).forward is not SegmentationModel.forward
            or getattr(inner, "classification_head", None) is None):
        return None
    return _EncoderHead(inner)


def _is_plain_weakseg(model: nn.Module) -> bool:
    try:
        from ..module import WeakSegModule
    except ImportError:  # pragma: no cover
        return False
    return isinstance(model, WeakSegModule) and type(model).forward is WeakSegModule.forward


def _fingerprint(module: nn.Module) -> tuple | None:
    """Every parameter and buffer (held, so their identity cannot be reused) with its in-place version counter;
    equal fingerprints (:func:`_same`) mean unchanged weights."""
    try:
        tensors = (*module.parameters(), *module.buffers())
        return tensors, tuple((t._version, t.data_ptr()) for t in tensors)
    except RuntimeError:  # inference tensors have no version counter: do not cache
        return None


def _same(a: tuple, b: tuple) -> bool:
    return len(a[0]) == len(b[0]) and all(x is y for x, y in zip(a[0], b[0])) and a[1] == b[1]


class ScoreCAM(BaseCAM):
    """Score-CAM (Wang et al. 2020): H^k = minmax(upsample(A^k)) (bilinear, align_corners=True, as
    pytorch-grad-cam), s_k = y^c(x ⊙ H^k) the raw class logit, M = ReLU(Σ_k softmax_k(s) A^k).

    All (sample, channel) masked inputs go through a *scorer* ``batch_size`` at a time, under inference
    mode. Savings, exact unless said otherwise:

    * decoder skipped — with ``score_model="auto"`` (default), when the image logits are those of an SMP
      model's classification head (an SMP ``aux_params`` model, a ``WeakSegModule(cls_head=True)`` or a
      :class:`ClassifierAdapter` around either, ``forward`` not overridden), the masked inputs only go
      through ``encoder`` + ``classification_head``: the segmentation decoder does not influence the
      score. Any other model is scored whole. ``score_model`` may also be a module mapping an input to
      the same image logits as ``model`` (e.g. a sub-network), or ``None`` to always run ``model``.
    * inference copy — ``optimize=True`` (default): the scorer is run as a copy with every eval-mode
      Conv→BatchNorm pair folded into one convolution (``torch.fx``) and in channels-last memory format
      (oneDNN's fast path on CPU); float32 throughout. The copy is rebuilt only when the weights change
      (parameter/buffer version counters). Models that ``torch.fx`` cannot trace keep their BatchNorms.
      Folding changes float rounding only (~1e-7 relative).
    * constant channel — a constant channel (e.g. all zero after ReLU) gives the all-zero mask, whose score
      is computed once.
    * approximate, ``mass_tol > 0`` — per sample, channels are sorted by their activation mass Σ_ij A^k_ij
      and only the smallest set holding a fraction ≥ 1 − mass_tol of the total mass is scored; the other
      channels get weight 0. ``mass_tol=0`` (default) reproduces Score-CAM.

    Safety: before scoring, the scorer's logits on the unmasked input are compared with ``model``'s
    (rtol 1e-3, atol 1e-4·max|logit|); on a mismatch the optimised copy, then the auto-detected sub-network,
    is dropped (an explicit ``score_model`` that disagrees raises ``ValueError``). The scorer is therefore
    used in eval mode only: with ``eval_mode=False`` on a model in training mode, ``model`` itself is run.

    Args:
        batch_size: masked inputs per forward.
        mass_tol: see above; 0 = exact.
        score_model: ``"auto"``, ``None`` or a module (see above).
        optimize: run the scorer as a BatchNorm-folded, channels-last copy.
    """

    uses_gradients = False
    supports_differentiable = False

    def __init__(self, model: nn.Module, target_layer: nn.Module | str | None = None, *, batch_size: int = 32,
                 mass_tol: float = 0.0, score_model: nn.Module | str | None = "auto", optimize: bool = True,
                 eval_mode: bool = True):
        super().__init__(model, target_layer, eval_mode=eval_mode)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0.0 <= mass_tol < 1.0:
            raise ValueError(f"mass_tol must lie in [0, 1), got {mass_tol}")
        if not (score_model is None or score_model == "auto" or isinstance(score_model, nn.Module)):
            raise TypeError(f"score_model must be 'auto', None or an nn.Module, got {score_model!r}")
        self.batch_size = batch_size
        self.mass_tol = mass_tol
        self.score_model = score_model
        self.optimize = optimize
        self.last_num_forward = 0  # masked forward passes of the last call (for benchmarks)
        self.last_scorer = ""  # which scorer the last call used: "model", "encoder+head", "score_model" (+ ", optimized")
        self._logits: Tensor | None = None
        self._cache: tuple | None = None  # (type of the base module, memory format, fingerprint, optimised copy)

    def selected_channels(self, act: Tensor) -> Tensor:
        """(B, C) bool: channels that are scored (non-constant and within the kept activation mass)."""
        flat = act.flatten(2)
        keep = (flat.amax(2) - flat.amin(2)) > 0
        if self.mass_tol > 0:
            mass = flat.abs().sum(2)
            order = mass.argsort(1, descending=True)
            sorted_mass = mass.gather(1, order)
            before = sorted_mass.cumsum(1) - sorted_mass  # mass of the strictly larger channels
            needed = before < (1 - self.mass_tol) * mass.sum(1, keepdim=True)
            keep_mass = torch.zeros_like(keep).scatter(1, order, needed)
            keep &= keep_mass
        return keep

    # -- scorer ---------------------------------------------------------------------------------------------
    def _optimized_copy(self, base: nn.Module, fmt: torch.memory_format) -> nn.Module | None:
        """BatchNorm-folded, channels-last copy of ``base`` (cached while the weights are unchanged)."""
        key = _fingerprint(base)
        if key is not None and self._cache is not None:
            c_base, c_fmt, c_key, c_copy = self._cache
            if c_base is type(base) and c_fmt == fmt and _same(c_key, key):
                return c_copy
        with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                fast = copy.deepcopy(base)
            except Exception:  # noqa: BLE001 - not copyable: no optimised copy
                return None
            try:
                from torch.fx.experimental.optimization import fuse
                fast = fuse(fast, inplace=True)
            except Exception:  # noqa: BLE001 - not traceable by torch.fx: keep the BatchNorms
                pass
            fast = fast.to(memory_format=fmt).eval().requires_grad_(False)
        self._cache = (type(base), fmt, key, fast) if key is not None else None
        return fast

    def _scorer(self, x: Tensor) -> tuple[nn.Module, torch.memory_format]:
        """The module that scores the masked inputs, checked against ``model``'s logits on ``x``."""
        fmt = {4: torch.channels_last, 5: torch.channels_last_3d}.get(x.ndim, torch.contiguous_format)
        if any(m.training for m in self.model.modules()):
            return self.model, torch.contiguous_format
        explicit = isinstance(self.score_model, nn.Module)
        cands: list[tuple[str, nn.Module]] = []
        if explicit:
            cands.append(("score_model", self.score_model))
        elif self.score_model == "auto":
            head = smp_encoder_head(self.model)
            if head is not None:
                cands.append(("encoder+head", head))
        cands.append(("model", self.model))
        ref = self._logits
        if ref is None:  # raw_cam called directly
            ref = logits_from_output(self.model(x))
        for name, base in cands:
            options = []
            if self.optimize and not any(m.training for m in base.modules()):
                fast = self._optimized_copy(base, fmt)
                if fast is not None:
                    options.append((f"{name}, optimized", fast, fmt))
            options.append((name, base, torch.contiguous_format))
            for label, module, mf in options:
                if name == "model" and module is base:  # the reference itself
                    self.last_scorer = label
                    return module, mf
                got = logits_from_output(module(x.contiguous(memory_format=mf))).to(ref.dtype)
                scale = float(ref.abs().max()) + 1e-12
                if got.shape == ref.shape and torch.allclose(got, ref, rtol=1e-3, atol=1e-4 * scale):
                    self.last_scorer = label
                    return module, mf
            if explicit:
                raise ValueError("score_model does not reproduce the model's image logits on the input")
        raise AssertionError("unreachable")  # pragma: no cover

    # -- computation ----------------------------------------------------------------------------------------
    def _run(self, x: Tensor, class_idx: int | Tensor | None) -> Tensor:
        logits, act = self.forward_with_activation(x, need_graph=False)
        idx = self.class_indices(class_idx, logits)
        self._logits = logits.detach()
        try:
            with torch.no_grad():
                cam = self.raw_cam(x, act.detach(), None, idx)
        finally:
            self._logits = None
        return torch.relu(cam)

    def raw_cam(self, x: Tensor, act: Tensor, grad: None, idx: Tensor) -> Tensor:
        b, c = act.shape[:2]
        size = tuple(x.shape[2:])
        mode = "bilinear" if len(size) == 2 else "trilinear"
        flat = act.flatten(2)
        span = flat.amax(2) - flat.amin(2)
        scored = self.selected_channels(act)
        constant = span <= 0
        scores = torch.full((b, c), float("-inf"), dtype=act.dtype, device=act.device)
        n_forward = 0
        with torch.inference_mode():
            scorer, fmt = self._scorer(x)
            xf = x.contiguous(memory_format=fmt)
            if constant.any():  # mask ≡ 0: one forward of a zero image serves every such channel
                zero_logits = logits_from_output(scorer(torch.zeros_like(xf[:1])))[0]
                scores = torch.where(constant, zero_logits[idx][:, None].to(act.dtype), scores)
                n_forward += 1
            pairs = scored.nonzero()
            shape = (-1, 1, *([1] * len(size)))
            for chunk in pairs.split(self.batch_size):
                bi, ki = chunk[:, 0], chunk[:, 1]
                up = F.interpolate(act[bi, ki].unsqueeze(1), size=size, mode=mode, align_corners=True)
                # min and max of the upsampled map itself (equal to the grid's up to rounding, which matters for
                # nearly constant channels: their normalised masks are mostly rounding, as in pytorch-grad-cam)
                flat_up = up.flatten(1)
                u_lo, u_hi = flat_up.amin(1), flat_up.amax(1)
                mask = (up - u_lo.view(shape)) / ((u_hi - u_lo).view(shape) + 1e-8)
                logits = logits_from_output(scorer((xf[bi] * mask).contiguous(memory_format=fmt)))
                scores[bi, ki] = logits.gather(1, idx[bi][:, None])[:, 0].to(act.dtype)
                n_forward += len(chunk)
        self.last_num_forward = n_forward
        # channels neither scored nor constant (skipped by mass_tol) keep -inf → weight 0
        weights = torch.softmax(scores, dim=1)
        weights = torch.nan_to_num(weights, nan=0.0)
        return weighted_sum(weights.clone(), act)


class EigenCAM(BaseCAM):
    """Eigen-CAM (Muhammad & Yeasin 2020), class-agnostic: A reshaped to (HW, C), centred over HW,
    projected on its first right singular vector. The SVD's sign is arbitrary; it is fixed so that the map
    correlates positively with the channel-mean activation (pytorch-grad-cam leaves it free: compare up
    to sign). ``class_idx`` is accepted and ignored.
    """

    uses_gradients = False

    def raw_cam(self, x: Tensor, act: Tensor, grad: None, idx: Tensor) -> Tensor:
        feats = torch.nan_to_num(act).flatten(2).transpose(1, 2)  # (B, N, C)
        feats = feats - feats.mean(1, keepdim=True)
        _, _, vh = torch.linalg.svd(feats, full_matrices=False)
        proj = (feats @ vh[:, 0, :, None])[..., 0]  # (B, N)
        mean_act = act.flatten(2).mean(1)
        corr = ((proj - proj.mean(1, keepdim=True)) * (mean_act - mean_act.mean(1, keepdim=True))).sum(1)
        sign = torch.where(corr < 0, -1.0, 1.0).to(proj.dtype)
        return (proj * sign[:, None]).view(act.shape[0], *act.shape[2:])
