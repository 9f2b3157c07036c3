"""Shared machinery of the CAM family: target-layer hooks, class indices, inference-mode handling.

A method is built once, ``method = GradCAM(model, target_layer)``, and called as often as needed,
``maps = method(x, class_idx)`` → (B, *spatial) in [0, 1] at the input size. Hooks are registered at the
start of a call and removed at its end (also on error), so a method object never leaves hooks behind.

How the gradient is obtained (non-differentiable mode, the default): the forward runs under
``torch.no_grad()`` until the target layer; the hook there re-enables grad mode and swaps the layer's
output for a fresh leaf tensor, so the autograd graph starts at the target layer. ``torch.autograd.grad
(score, leaf)`` then back-propagates through the head only: no graph is built for the encoder, nothing
is accumulated in any ``.grad`` and the parameters' ``requires_grad`` are never touched.
With ``differentiable=True`` the forward keeps the full graph and the map stays differentiable with
respect to the parameters (``create_graph=True``), for CAM-based losses inside ``training_step``.
"""
from __future__ import annotations

from contextlib import ExitStack
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["BaseCAM", "ClassifierAdapter", "logits_from_output", "resolve_target_layer", "default_target_layer",
           "normalize_maps", "upsample_maps"]


def logits_from_output(out: Any) -> Tensor:
    """Image-level logits (B, K) from a model's output.

    Accepts a (B, K) tensor (a classifier), a ``(mask, label)`` tuple (SMP model built with
    ``aux_params``) or a dict with ``"cls_logits"`` (``WeakSegModule(cls_head=True)``).
    """
    if isinstance(out, dict):
        if "cls_logits" not in out:
            raise ValueError(f"CAM needs image-level logits: expected a dict with 'cls_logits', got keys {sorted(out)}"
                             " (build the module with cls_head=True)")
        out = out["cls_logits"]
    elif isinstance(out, (tuple, list)):
        if len(out) != 2:
            raise ValueError(f"CAM expected a (mask, label) pair from an SMP model with aux_params, got {len(out)} items")
        out = out[1]
    if not isinstance(out, Tensor) or out.ndim != 2:
        shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise ValueError(f"CAM expected image-level logits of shape (B, K), got {shape}")
    return out


class ClassifierAdapter(nn.Module):
    """Wrap a model so that ``forward`` returns (B, K) image logits (see :func:`logits_from_output`).

    Useful to hand an SMP ``aux_params`` model or a ``WeakSegModule`` to libraries that expect a classifier.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        return logits_from_output(self.model(x))


def _find_encoder(model: nn.Module) -> nn.Module | None:
    for path in ("encoder", "model.encoder", "model.model.encoder"):
        try:
            return model.get_submodule(path)
        except AttributeError:
            continue
    return None


def default_target_layer(model: nn.Module) -> nn.Module:
    """The deepest stage of an SMP encoder (``model.encoder``, also through ``.model``), else the last conv layer."""
    encoder = _find_encoder(model)
    if encoder is not None:
        if hasattr(encoder, "get_stages"):
            stages = encoder.get_stages()
            if isinstance(stages, dict) and stages:
                last = stages[max(stages)]
                return last[-1] if isinstance(last, (list, tuple)) else last
            if isinstance(stages, (list, tuple)) and stages:
                return stages[-1]
        children = [m for m in encoder.children() if any(True for _ in m.parameters())]
        if children:
            return children[-1]
    convs = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Conv3d))]
    if not convs:
        raise ValueError("cannot pick a default CAM target layer: no SMP encoder and no Conv2d/Conv3d in the model; "
                         "pass target_layer")
    return convs[-1]


def resolve_target_layer(model: nn.Module, target_layer: nn.Module | str | None) -> nn.Module:
    """A module of ``model`` given as a module, a dotted path (``"encoder.layer4"``) or ``None`` (default)."""
    if target_layer is None:
        return default_target_layer(model)
    if isinstance(target_layer, str):
        try:
            return model.get_submodule(target_layer)
        except AttributeError as err:
            raise ValueError(f"target_layer {target_layer!r} is not a submodule of {type(model).__name__}") from err
    if isinstance(target_layer, nn.Module):
        if not any(m is target_layer for m in model.modules()):
            raise ValueError(f"target_layer {type(target_layer).__name__} is not a submodule of the model")
        return target_layer
    raise TypeError(f"target_layer must be an nn.Module, a dotted name or None, got {type(target_layer).__name__}")


def upsample_maps(maps: Tensor, size: tuple[int, ...], align_corners: bool = False) -> Tensor:
    """(B, *s) → (B, *size), (bi|tri)linear; ``align_corners=False`` matches OpenCV's ``cv2.resize``."""
    mode = {2: "bilinear", 3: "trilinear"}.get(len(size))
    if mode is None:
        raise ValueError(f"expected a 2D or 3D spatial size, got {size}")
    if tuple(maps.shape[1:]) == tuple(size):
        return maps
    return F.interpolate(maps.unsqueeze(1), size=size, mode=mode, align_corners=align_corners).squeeze(1)


def normalize_maps(maps: Tensor, eps: float = 1e-7) -> Tensor:
    """Per-sample min–max to [0, 1]: (m − min) / (max − min + eps), as pytorch-grad-cam's ``scale_cam_image``."""
    flat = maps.flatten(1)
    lo = flat.amin(1).view(-1, *([1] * (maps.ndim - 1)))
    shifted = maps - lo
    hi = shifted.flatten(1).amax(1).view_as(lo)
    return shifted / (hi + eps)


class BaseCAM:
    """Base of every CAM method.

    Args:
        model: a classifier returning (B, K) logits, an SMP model with ``aux_params`` (returns
            ``(mask, label)``), or a ``WeakSegModule`` with ``cls_head=True`` (returns a dict).
        target_layer: module, dotted name, or ``None`` for the last stage of ``model.encoder``.
        differentiable: keep the map in the autograd graph (for losses); slower.
        eval_mode: run the model in eval mode during the call (BatchNorm running statistics are
            neither used from the batch nor updated); every module's previous ``training`` flag is restored.

    Subclasses implement :meth:`raw_cam`.
    """

    uses_gradients = True
    supports_differentiable = True

    def __init__(self, model: nn.Module, target_layer: nn.Module | str | None = None, *,
                 differentiable: bool = False, eval_mode: bool = True):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        if differentiable and not self.supports_differentiable:
            raise ValueError(f"{type(self).__name__} does not support differentiable=True")
        self.model = model
        self.target_layer = resolve_target_layer(model, target_layer)
        self.differentiable = differentiable
        self.eval_mode = eval_mode

    # -- context manager: hooks only live during a call, so there is nothing to release ----------------
    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        return None

    def __repr__(self) -> str:
        return f"{type(self).__name__}(target_layer={type(self.target_layer).__name__}, differentiable={self.differentiable})"

    # -- public API -------------------------------------------------------------------------------------
    def __call__(self, x: Tensor, class_idx: int | Tensor | None = None) -> Tensor:
        """Maps (B, *spatial) in [0, 1] at the input size; ``class_idx`` int, (B,) tensor or None (argmax)."""
        cam = self.compute(x, class_idx)
        return normalize_maps(upsample_maps(cam, tuple(x.shape[2:])))

    def compute(self, x: Tensor, class_idx: int | Tensor | None = None) -> Tensor:
        """ReLU'd maps at the target layer's resolution (B, *s), before upsampling and normalisation."""
        self._check_input(x)
        with ExitStack() as stack:
            if torch.is_inference_mode_enabled() and (self.uses_gradients or self.differentiable):
                # Lightning validates under inference mode: leave it and work on a normal copy of the input.
                stack.enter_context(torch.inference_mode(False))
                x = x.clone()
            saved = {m: m.training for m in self.model.modules()} if self.eval_mode else None
            if self.eval_mode:
                self.model.eval()
            try:
                cam = self._run(x, class_idx)
            finally:
                if saved is not None:
                    for m, flag in saved.items():
                        m.training = flag
        return cam

    # -- machinery ----------------------------------------------------------------------------------------
    @staticmethod
    def _check_input(x: Tensor) -> None:
        if not isinstance(x, Tensor) or x.ndim not in (4, 5):
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"CAM expected an input of shape (B, C, H, W) or (B, C, D, H, W), got {shape}")

    @staticmethod
    def class_indices(class_idx: int | Tensor | None, logits: Tensor) -> Tensor:
        """(B,) long class indices from an int, a (B,) tensor or None (the predicted class)."""
        b, k = logits.shape
        if class_idx is None:
            idx = logits.detach().argmax(1)
        elif isinstance(class_idx, int):
            idx = torch.full((b,), class_idx, dtype=torch.long, device=logits.device)
        else:
            idx = torch.as_tensor(class_idx, device=logits.device).long().reshape(-1)
            if idx.numel() == 1:
                idx = idx.expand(b)
            if idx.shape != (b,):
                raise ValueError(f"class_idx: expected an int or a tensor of shape ({b},), got {tuple(idx.shape)}")
        if (idx < 0).any() or (idx >= k).any():
            raise ValueError(f"class_idx must lie in [0, {k - 1}] (the model has {k} classes), got {idx.tolist()}")
        return idx.clone()  # an inference tensor (e.g. from a validation batch) cannot enter autograd

    def forward_with_activation(self, x: Tensor, need_graph: bool) -> tuple[Tensor, Tensor]:
        """One forward pass; returns (logits (B, K), activation (B, C, *s) at the target layer).

        ``need_graph``: the logits must be differentiable w.r.t. the activation (gradient methods).
        """
        store: dict[str, Tensor] = {}
        leaf_mode = need_graph and not self.differentiable

        def hook(module, inputs, output):
            seq = isinstance(output, (list, tuple))
            act = output[-1] if seq else output
            if not isinstance(act, Tensor):
                raise ValueError(f"target layer {type(module).__name__} returned {type(act).__name__}, expected a tensor")
            if leaf_mode:
                torch.set_grad_enabled(True)  # graph starts here; the enclosing no_grad() restores the mode
                act = act.detach().requires_grad_(True)
            store["act"] = act
            new = act.clone()  # downstream in-place ops must not modify the stored activation
            if seq:
                return type(output)([*output[:-1], new]) if isinstance(output, tuple) else [*output[:-1], new]
            return new

        handle = self.target_layer.register_forward_hook(hook)
        try:
            if self.differentiable:
                ctx = torch.enable_grad()
            else:
                ctx = torch.no_grad()
            with ctx:
                logits = logits_from_output(self.model(x))
        finally:
            handle.remove()
        if "act" not in store:
            raise ValueError(f"the target layer {type(self.target_layer).__name__} was not called during the forward pass")
        act = store["act"]
        if act.ndim != x.ndim:
            raise ValueError(f"target layer output must be (B, C, *spatial) with {x.ndim - 2} spatial dims like the input, "
                             f"got {tuple(act.shape)}")
        return logits, act

    def activation_gradient(self, logits: Tensor, act: Tensor, idx: Tensor) -> Tensor:
        """∂(Σ_b y_b^{c_b})/∂A: per-sample gradients (samples are independent in eval mode)."""
        score = logits.gather(1, idx[:, None]).sum()
        if not score.requires_grad:
            raise ValueError("the class score does not depend on the target layer's output; check target_layer")
        (grad,) = torch.autograd.grad(score, act, create_graph=self.differentiable, retain_graph=self.differentiable)
        return grad

    def _run(self, x: Tensor, class_idx: int | Tensor | None) -> Tensor:
        logits, act = self.forward_with_activation(x, need_graph=self.uses_gradients)
        idx = self.class_indices(class_idx, logits)
        grad = self.activation_gradient(logits, act, idx) if self.uses_gradients else None
        if not self.differentiable:
            act = act.detach()
        with torch.set_grad_enabled(self.differentiable):
            cam = self.raw_cam(x, act, grad, idx)
        return torch.relu(cam)

    def raw_cam(self, x: Tensor, act: Tensor, grad: Tensor | None, idx: Tensor) -> Tensor:
        """The map before ReLU, (B, *s), from activation (B, C, *s), gradient (or None) and class indices."""
        raise NotImplementedError


def spatial_sum(t: Tensor, keepdim: bool = False) -> Tensor:
    """Sum over all dims after (B, C)."""
    return t.sum(dim=tuple(range(2, t.ndim)), keepdim=keepdim)


def weighted_sum(weights: Tensor, act: Tensor) -> Tensor:
    """Σ_k w_k A^k: weights (B, C), act (B, C, *s) → (B, *s)."""
    return (weights.view(*weights.shape, *([1] * (act.ndim - 2))) * act).sum(1)
