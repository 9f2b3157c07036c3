"""CAM speed: lightning_weakseg.cam vs pytorch-grad-cam on the same model and input, in one run.

Models (random weights, BatchNorm statistics warmed up; ``--trained N``: the classifier trained N epochs on
synthetic tags, explaining synthetic slices), target layer ``encoder.layer4``:

* ``--model classifier`` (default): SMP resnet18 encoder + global average pooling + linear head. Both
  libraries run the whole model on every masked input (there is nothing to skip).
* ``--model unet``: SMP ``Unet`` resnet18 with ``aux_params`` (SMP classification head), the model of
  ``WeakSegModule(cls_head=True)``. pytorch-grad-cam needs a (B, K) classifier, so it gets
  ``ClassifierAdapter(unet)`` and runs encoder + decoder + heads per masked input; ours is given the Unet
  itself and, by default (``score_model="auto"``), scores the masked inputs with encoder + classification
  head only (the decoder cannot change the class logit). Both use the classification head's raw logit.

Grad-CAM on a batch of 16 images at 224², Score-CAM on 2 images (Score-CAM costs one forward per channel:
512 per image here). Reports the median of ``--repeats`` calls, the speed-up, and the agreement of the maps
(Pearson r per sample, minimum over samples; max |difference|), then prints a markdown table. Our Score-CAM
rows name the scorer used (``ScoreCAM.last_scorer``); ``--ablation`` adds our Score-CAM with
``score_model=None, optimize=False`` (whole model, no BatchNorm folding, contiguous memory format).

    python benchmarks/cam_speed.py                       # CPU, as in docs/regimes/tags.md
    python benchmarks/cam_speed.py --model unet --ablation
    python benchmarks/cam_speed.py --device cuda --repeats 5
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")  # pytorch-grad-cam's Score-CAM progress bars

import numpy as np  # noqa: E402
import segmentation_models_pytorch as smp  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402


class EncoderClassifier(nn.Module):
    def __init__(self, classes: int = 4):
        super().__init__()
        self.encoder = smp.encoders.get_encoder("resnet18", weights=None)
        self.fc = nn.Linear(512, classes)

    def forward(self, x):
        return self.fc(self.encoder(x)[-1].mean((2, 3)))


def timed(fn, repeats: int, sync) -> tuple[float, object]:
    out, times = None, []
    for _ in range(repeats):
        sync()
        t = time.perf_counter()
        out = fn()
        sync()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def agreement(ours, theirs) -> tuple[float, float]:
    """(min Pearson r over samples, max |difference|). A sample whose two maps are both constant (e.g. an all-zero
    Grad-CAM for a class the trained model does not see) counts as r = 1 when the maps are equal."""
    a = np.asarray(ours, np.float64).reshape(len(ours), -1)
    b = np.asarray(theirs, np.float64).reshape(len(theirs), -1)
    a0, b0 = a - a.mean(1, keepdims=True), b - b.mean(1, keepdims=True)
    va, vb = (a0 * a0).sum(1), (b0 * b0).sum(1)
    flat = (va == 0) & (vb == 0)
    r = np.where(flat, np.where(np.abs(a - b).max(1) == 0, 1.0, 0.0),
                 (a0 * b0).sum(1) / np.sqrt(np.maximum(va * vb, 1e-300)))
    return float(r.min()), float(np.abs(a - b).max())


def train_on_synthetic_tags(model, epochs: int, batch: int, size: int, dev) -> torch.Tensor:
    """Train ``model`` (4 logits) on the tags of 64-px synthetic organ slices (multi-label BCE, AdamW 3e-3);
    return ``batch`` 224-px slices of the same generator (other seeds) to explain. A trained network's channels
    and scores are far less uniform than a random one's: this is the case Score-CAM's shortcuts must face."""
    from lightning_weakseg.data import WeakSegDataModule
    dm = WeakSegDataModule(n_samples=320, image_size=64, class_presence=0.5, train_labels=("tags",), batch_size=16,
                           augment="none")
    dm.setup("fit")
    opt = torch.optim.AdamW(model.parameters(), 3e-3)
    model.train()
    for _ in range(epochs):
        for b in dm.train_dataloader():
            logits = model(b["image"].expand(-1, 3, -1, -1).to(dev))
            loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, b["tags"].to(dev))
            opt.zero_grad()
            loss.backward()
            opt.step()
    test = WeakSegDataModule(n_samples=batch, image_size=size, class_presence=0.5, train_labels=("tags",),
                             augment="none", val_fraction=0.0, batch_size=batch, seed=1)
    test.setup("fit")
    return next(iter(test.train_dataloader()))["image"].expand(-1, 3, -1, -1).contiguous().to(dev)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--model", choices=("classifier", "unet"), default="classifier")
    p.add_argument("--ablation", action="store_true", help="also time our Score-CAM without its speed-ups")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--score-images", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3, help="Grad-CAM repeats (median)")
    p.add_argument("--score-repeats", type=int, default=1, help="Score-CAM repeats (median)")
    p.add_argument("--score-batch", type=int, default=32, help="our masked images per forward (pytorch-grad-cam: "
                   "its default, 16)")
    p.add_argument("--mass-tol", type=float, default=0.05, help="approximate Score-CAM row (0 = skip it)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--floor", action="store_true", help="also compare pytorch-grad-cam's Score-CAM with itself "
                   "at batch --score-batch (the float32 noise floor of the agreement)")
    p.add_argument("--trained", type=int, default=0, metavar="EPOCHS",
                   help="classifier only: first train it this many epochs on 64-px synthetic organ tags "
                        "(class_presence 0.5), then explain 224-px synthetic organ slices instead of noise")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    warnings.filterwarnings("ignore")
    import pytorch_grad_cam as pgc
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    from lightning_weakseg.cam import ClassifierAdapter, GradCAM, ScoreCAM

    dev = torch.device(a.device)
    sync = (lambda: torch.cuda.synchronize()) if dev.type == "cuda" else (lambda: None)
    torch.manual_seed(0)
    if a.model == "unet":
        model = smp.create_model("Unet", "resnet18", encoder_weights=None, classes=2,
                                 aux_params={"classes": 4}).to(dev)
        peer = ClassifierAdapter(model)  # pytorch-grad-cam needs (B, K) logits
    else:
        model = peer = EncoderClassifier().to(dev)
    x = torch.rand(a.batch, 3, a.size, a.size, device=dev)
    if a.trained and a.model == "classifier":
        x = train_on_synthetic_tags(model, a.trained, a.batch, a.size, dev)
    else:
        with torch.no_grad():  # non-trivial BatchNorm statistics, then eval
            for _ in range(2):
                model(torch.rand(8, 3, 64, 64, device=dev))
    model.eval()
    idx = torch.arange(a.batch, device=dev) % 4
    targets = [ClassifierOutputTarget(int(i)) for i in idx]
    rows = []

    ours = GradCAM(model, "encoder.layer4")
    theirs = pgc.GradCAM(peer, [model.encoder.layer4])
    t_ours, m_ours = timed(lambda: ours(x, idx), a.repeats, sync)
    t_theirs, m_theirs = timed(lambda: theirs(input_tensor=x, targets=targets), a.repeats, sync)
    theirs.activations_and_grads.release()
    for prm in model.parameters():  # pytorch-grad-cam back-propagates into the parameters
        prm.grad = None
    rows.append(("Grad-CAM", f"{a.batch}×{a.size}²", t_theirs, t_ours, *agreement(m_ours.cpu().numpy(), m_theirs)))

    xs, ids = x[:a.score_images], idx[:a.score_images]
    ref = pgc.ScoreCAM(peer, [model.encoder.layer4])  # as shipped: 16 masked images per forward
    t_theirs, m_theirs = timed(lambda: ref(input_tensor=xs, targets=targets[:a.score_images]), a.score_repeats, sync)
    ref.activations_and_grads.release()
    exact = ScoreCAM(model, "encoder.layer4", batch_size=a.score_batch)
    t_ours, m_ours = timed(lambda: exact(xs, ids), a.score_repeats, sync)
    rows.append((f"Score-CAM [{exact.last_scorer}]", f"{a.score_images}×{a.size}²", t_theirs, t_ours,
                 *agreement(m_ours.cpu().numpy(), m_theirs)))
    t_ref, n_exact = t_theirs, exact.last_num_forward
    if a.floor:  # float32 noise floor: pytorch-grad-cam against itself with another batch size
        ref32 = pgc.ScoreCAM(peer, [model.encoder.layer4])
        ref32.batch_size = a.score_batch
        t32, m32 = timed(lambda: ref32(input_tensor=xs, targets=targets[:a.score_images]), 1, sync)
        ref32.activations_and_grads.release()
        rows.append((f"pytorch-grad-cam Score-CAM, batch {a.score_batch} vs its default 16 (noise floor)",
                     f"{a.score_images}×{a.size}²", t_ref, t32, *agreement(m32, m_theirs)))
    if a.ablation:
        plain = ScoreCAM(model, "encoder.layer4", batch_size=a.score_batch, score_model=None, optimize=False)
        t_ours, m_ours = timed(lambda: plain(xs, ids), a.score_repeats, sync)
        rows.append((f"Score-CAM [{plain.last_scorer}] (score_model=None, optimize=False)",
                     f"{a.score_images}×{a.size}²", t_ref, t_ours, *agreement(m_ours.cpu().numpy(), m_theirs)))
    if a.mass_tol > 0:
        approx = ScoreCAM(model, "encoder.layer4", batch_size=a.score_batch, mass_tol=a.mass_tol)
        t_ours, m_ours = timed(lambda: approx(xs, ids), a.score_repeats, sync)
        rows.append((f"Score-CAM [{approx.last_scorer}], mass_tol={a.mass_tol} ({approx.last_num_forward}/{n_exact} "
                     "forwards)", f"{a.score_images}×{a.size}²", t_ref, t_ours, *agreement(m_ours.cpu().numpy(), m_theirs)))

    print(f"model={a.model} device={dev} threads={torch.get_num_threads()} repeats={a.repeats}/{a.score_repeats} "
          f"torch={torch.__version__} command: python benchmarks/cam_speed.py {' '.join(sys.argv[1:] if argv is None else argv)}")
    print("| method | input | pytorch-grad-cam (s) | ours (s) | speed-up | Pearson r (min) | max abs diff |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, shape, t_ref, t_new, r, d in rows:
        print(f"| {name} | {shape} | {t_ref:.3f} | {t_new:.3f} | {t_ref / t_new:.1f}× | {r:.4f} | {d:.1e} |")
    return rows


if __name__ == "__main__":
    main()
