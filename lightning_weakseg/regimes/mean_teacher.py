"""Semi-supervised consistency: the mean teacher (Tarvainen & Valpola, "Mean teachers are better role models",
NeurIPS 2017), for unlabelled images beside any weak label.

The teacher is an exponential moving average (EMA) of the student's weights,
θ'_t = α_t θ'_{t-1} + (1 − α_t) θ_t with α_t = min(1 − 1/(t + 1), ema_decay) at optimizer step t (the paper's
warm-up: early on the teacher follows the student closely). The student sees a strongly perturbed view of each
image, the teacher the weakly augmented one (the data loader's view); the consistency term is the mean squared
difference of their softmaxes, weighted by the sigmoid ramp-up w(t) = exp(−5 (1 − t)²) of Laine & Aila (2017),
t the training progress clipped to [0, 1]. The perturbation is photometric (per-sample brightness, contrast,
Gaussian noise; batched tensor operations), so the two views share their geometry and every label of the batch
still applies to the student's view.

>>> from lightning_weakseg.regimes.mean_teacher import MeanTeacherSegModule
>>> model = MeanTeacherSegModule(in_channels=1, num_classes=4, ema_decay=0.99)
"""
from __future__ import annotations

import copy
import math

import torch

from ..module import WeakSegModule
from .scribbles import ScribbleMixin

__all__ = ["MeanTeacherMixin", "MeanTeacherSegModule", "sigmoid_rampup", "ema_alpha", "ema_update",
           "strong_view", "ConsistencyRamp", "ScribbleMeanTeacherSegModule"]


def sigmoid_rampup(step: float, length: float) -> float:
    """exp(−5 (1 − t)²) with t = clip(step / length, 0, 1) (Laine & Aila, ICLR 2017); 1 for ``length <= 0``."""
    if length <= 0:
        return 1.0
    t = min(max(float(step) / float(length), 0.0), 1.0)
    return math.exp(-5.0 * (1.0 - t) ** 2)


def ema_alpha(step: int, ema_decay: float) -> float:
    """α = min(1 − 1/(step + 1), ema_decay) (Tarvainen & Valpola 2017), ``step`` the optimizer steps so far."""
    return min(1.0 - 1.0 / (float(step) + 1.0), float(ema_decay))


@torch.no_grad()
def ema_update(teacher: torch.nn.Module, student: torch.nn.Module, alpha: float) -> None:
    """θ' ← α θ' + (1 − α) θ for every parameter and floating-point buffer (BatchNorm running statistics); integer
    buffers (batches tracked) are copied."""
    pairs = list(zip(teacher.parameters(), student.parameters()))
    pairs += [(t, s) for t, s in zip(teacher.buffers(), student.buffers()) if t.is_floating_point()]
    if pairs:  # one fused update, θ' + (1 − α)(θ − θ')
        torch._foreach_lerp_([t for t, _ in pairs], [s.detach() for _, s in pairs], 1.0 - alpha)
    for t, s in zip(teacher.buffers(), student.buffers()):
        if not t.is_floating_point():
            t.copy_(s)


def strong_view(images: torch.Tensor, brightness: float = 0.1, contrast: float = 0.2, noise_std: float = 0.05,
                noise_clip: float = 0.2, generator: torch.Generator | None = None,
                draws: torch.Tensor | None = None) -> torch.Tensor:
    """A photometric perturbation of a batch (B,C,H,W) in [0, 1]: per sample a contrast factor
    c ~ U(1 − contrast, 1 + contrast) around its mean and a brightness shift b ~ U(−brightness, brightness), then
    Gaussian noise N(0, noise_std²) clipped to ±noise_clip per pixel; the result clipped to [0, 1]. The geometry is
    untouched.

    ``draws`` (B, 2 + C·H·W) standard-uniform / standard-normal numbers may be given instead of a generator
    (:meth:`MeanTeacherMixin.view_draws` makes them per sample, so a sample's view does not depend on the batch it
    is in or on the DDP rank).

    >>> x = torch.rand(2, 1, 8, 8)
    >>> strong_view(x, generator=torch.Generator().manual_seed(0)).shape
    torch.Size([2, 1, 8, 8])
    """
    if images.ndim != 4:
        raise ValueError(f"strong_view: expected images (B,C,H,W), got shape {tuple(images.shape)}")
    b = images.shape[0]
    if draws is None:
        u = torch.rand(b, 2, generator=generator, device=images.device, dtype=images.dtype)
        n = torch.randn(images.shape, generator=generator, device=images.device, dtype=images.dtype)
    else:
        u = draws[:, :2].to(images)
        n = draws[:, 2:].to(images).reshape(images.shape)
    c = 1.0 + contrast * (2.0 * u[:, 0] - 1.0)
    s = brightness * (2.0 * u[:, 1] - 1.0)
    mean = images.mean(dim=(1, 2, 3), keepdim=True)
    out = (images - mean) * c.view(-1, 1, 1, 1) + mean + s.view(-1, 1, 1, 1)
    out = out + (noise_std * n).clamp(-noise_clip, noise_clip)
    return out.clamp(0.0, 1.0)


class ConsistencyRamp:
    """The ramp-up of a consistency weight, shared by the semi-supervised regimes: ``consistency_rampup_steps``
    optimizer steps, or ``consistency_rampup_epochs`` epochs (× the optimizer steps of an epoch). A function of
    ``global_step``, so a resumed run continues the ramp where it stopped."""

    def __init__(self, steps: int | None, epochs: float | None):
        if steps is not None and steps < 0:
            raise ValueError(f"consistency_rampup_steps must be >= 0, got {steps}")
        if epochs is not None and epochs < 0:
            raise ValueError(f"consistency_rampup_epochs must be >= 0, got {epochs}")
        self.steps, self.epochs = steps, epochs

    def length(self, module) -> float:
        if self.steps is not None or module._trainer is None:
            return float(self.steps or 0)
        trainer = module.trainer
        per_epoch = max(int(trainer.num_training_batches) // max(int(trainer.accumulate_grad_batches), 1), 1)
        return float(self.epochs or 0.0) * per_epoch

    def __call__(self, module) -> float:
        return sigmoid_rampup(module.global_step, self.length(module))


class MeanTeacherMixin:
    """Mean teacher (Tarvainen & Valpola, NeurIPS 2017): adds ``semi/consistency`` on every sample (or only the
    unlabelled ones), whatever else the batch carries; composes with any weak regime by inheritance
    (``class ScribbleMT(ScribbleMixin, MeanTeacherMixin, WeakSegModule)``).

    ``semi/consistency`` = w(step) · Σ_i m_i · mean_{k,pixels}(p_student − p_teacher)² / B with the student on the
    strong view (:func:`strong_view`, also the input of the other terms) and the teacher, without gradient, on
    the batch's image; m_i = 1 for every sample (``consistency_on="all"``, the paper) or for the samples without
    any label (``"unlabelled"``). The teacher (``self.teacher_model``) is updated after every optimizer step
    (:func:`ema_update`) and is part of the state dict, hence of every checkpoint. It stays in eval mode (its
    BatchNorm uses the EMA of the student's running statistics). Under DDP the student is the same on every
    rank after the gradient all-reduce, and so is its EMA.

    Args:
        ema_decay: the EMA's α ceiling (0.99 in the paper's early phase; 0.999 later).
        consistency_on: ``"all"`` or ``"unlabelled"``.
        consistency_rampup_steps / consistency_rampup_epochs: the ramp-up's length in optimizer steps, or in
            epochs when steps is ``None``. The term's full weight is ``loss_weights["semi/consistency"]``
            (default 1.0).
        strong_brightness, strong_contrast, strong_noise: the student's perturbation (:func:`strong_view`); 0 for
            all three gives the student the teacher's view.
        teacher_inference: validation, test, ``predict`` and ``save_pretrained`` use the teacher (default) or, with
            ``False``, the student.
    """

    default_loss_weights = {"semi/consistency": 1.0}

    def __init__(self, *, ema_decay: float = 0.99, consistency_on: str = "all",
                 consistency_rampup_steps: int | None = None, consistency_rampup_epochs: float | None = 5.0,
                 strong_brightness: float = 0.1, strong_contrast: float = 0.2, strong_noise: float = 0.05,
                 teacher_inference: bool = True, **kwargs):
        if not 0.0 <= ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {ema_decay}")
        if consistency_on not in ("all", "unlabelled"):
            raise ValueError(f"consistency_on: expected 'all' or 'unlabelled', got {consistency_on!r}")
        self._ramp = ConsistencyRamp(consistency_rampup_steps, consistency_rampup_epochs)
        super().__init__(**kwargs)
        self.teacher_model = copy.deepcopy(self.model)
        for p in self.teacher_model.parameters():
            p.requires_grad_(False)
        self.teacher_model.eval()
        self._ema_last_step: int | None = None

    # ------------------------------------------------------------------ the teacher
    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher_model.eval()  # Lightning switches the whole module to train mode each epoch
        return self

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        if not self.training and self.hparams.teacher_inference:
            return self.network_outputs(self.teacher_model(x))
        return super().forward(x)

    def inference_network(self) -> torch.nn.Module:
        return self.teacher_model if self.hparams.teacher_inference else super().inference_network()

    def inference_network_name(self) -> str:
        return "teacher_model" if self.hparams.teacher_inference else super().inference_network_name()

    def teacher_probs(self, x: torch.Tensor) -> torch.Tensor:
        """The teacher's softmax (B,K,H,W), without gradient."""
        with torch.no_grad():
            y = self.teacher_model(x)
            return (y[0] if isinstance(y, (tuple, list)) else y).softmax(1)

    def on_train_start(self) -> None:
        super().on_train_start()
        self._ema_last_step = int(self.global_step)

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        super().on_train_batch_end(outputs, batch, batch_idx)
        step = int(self.global_step)
        if self._ema_last_step is not None and step == self._ema_last_step:
            return  # no optimizer step in this batch (gradient accumulation)
        self._ema_last_step = step
        ema_update(self.teacher_model, self.model, ema_alpha(step, self.hparams.ema_decay))

    # ------------------------------------------------------------------ the views
    def view_draws(self, batch: dict) -> torch.Tensor | None:
        """Random numbers of each sample's strong view, from a generator seeded by (epoch, raw index): a sample's
        perturbation is the same whatever batch or DDP rank it lands in. ``None`` without ``batch["index"]``."""
        index = batch.get("index")
        if index is None:
            return None
        x = batch["image"]
        per = 2 + x[0].numel()
        rows = []
        for i in index.tolist():
            g = torch.Generator().manual_seed((int(i) * 1_000_003 + int(self.current_epoch) * 7_919 + 17) % (2 ** 63))
            rows.append(torch.cat([torch.rand(2, generator=g), torch.randn(per - 2, generator=g)]))
        return torch.stack(rows).to(x.device)

    def training_view(self, batch: dict) -> torch.Tensor:
        h = self.hparams
        x = super().training_view(batch)
        if h.strong_brightness == 0 and h.strong_contrast == 0 and h.strong_noise == 0:
            return x
        return strong_view(x, h.strong_brightness, h.strong_contrast, h.strong_noise, draws=self.view_draws(batch))

    # ------------------------------------------------------------------ loss terms
    def consistency_weight(self) -> float:
        """The ramp-up factor w(step) in [0, 1]."""
        return self._ramp(self)

    def loss_terms(self, batch: dict, out: dict) -> dict[str, torch.Tensor]:
        terms = super().loss_terms(batch, out)
        if "logits" not in out or not self.training:
            return terms
        target = self.teacher_probs(batch["image"])
        student = out["logits"].softmax(1)
        per_sample = (student - target.to(student.dtype)).pow(2).flatten(1).mean(1)
        has = None
        if self.hparams.consistency_on == "unlabelled":
            has = ~labelled_samples(batch)
        w = self.consistency_weight()
        terms["semi/consistency"] = w * self.batch_mean(per_sample, has)
        if self._trainer is not None:
            self.log("train/consistency_rampup", w, on_step=False, on_epoch=True, batch_size=per_sample.shape[0])
        return terms


def labelled_samples(batch: dict) -> torch.Tensor:
    """bool (B,): the samples that carry at least one label (some ``has_*`` flag set)."""
    x = batch["image"]
    has = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
    for k, v in batch.items():
        if k.startswith("has_") and k != "has_native_mask" and torch.is_tensor(v):
            has = has | v.to(has.device).bool()
    return has


class MeanTeacherSegModule(MeanTeacherMixin, WeakSegModule):
    """``WeakSegModule`` + :class:`MeanTeacherMixin`: masks (or any ``mask_key``) for the labelled samples,
    consistency for all (``configs/semi_mean_teacher.yaml``)."""



class ScribbleMeanTeacherSegModule(ScribbleMixin, MeanTeacherMixin, WeakSegModule):
    """Scribbles (:class:`~lightning_weakseg.regimes.ScribbleMixin`) + mean teacher: scribbled and unlabelled images
    in one batch (``label_fractions={"scribble": 0.1, "none": 0.9}``)."""
