"""Noisy-mask benchmark regimes: each one is ``(config, overrides)``, a recipe of ``configs/`` and what the row
changes (:func:`lightning_weakseg.recipes.load_recipe`). ``common.py`` adds them to its registry.

``configs/noisy.yaml`` is the recommended co-teaching recipe (per-sample selection ranked by Dice, τ = 0.3,
T_k = 5); the rows below state their τ, their selection and, for the variants that are not recommended, the
``experimental`` options of :class:`~lightning_weakseg.regimes.CoTeachingMixin` that reproduce them.
"""
from __future__ import annotations

# Forget rates. Under the every-mask model (--noise r) the simulated masks at r = 0.5 have ~7 % wrong pixels (11 % of
# the noisy foreground, 5.5 % of the noisy background; 64-px Kvasir, benchmarks/noise_stats.py) and 20 % of the
# images lost their polyp (drop probability 0.4 x r): pixel selection drops τ = 0.1 of each class. Under the
# literature's model (--noise 1.0 --noise-fraction f: a share f of the masks corrupted) per-sample selection drops
# τ = f. The ramp T_k of noisy.yaml is a quarter of a 20-epoch run (the paper: 10 of 200 epochs).
PIXEL = {"selection": "pixel"}  # class-balanced pixel selection
PLUS = {"coteach_plus": True}  # co-teaching+ (Yu et al. 2019) with its fallback at plus_min_disagreement 0.1
PAPER_PLUS = {"coteach_plus": True, "plus_min_disagreement": 0.0}  # the paper's disagreement rule, no fallback
CE_RANK = {"sample_rank": "ce"}  # images ranked by mean CE (the paper's rule)
RELABEL = {"relabel_rejected": True}  # rejected pixels learn the peer's arg-max from T_k on
RELABEL_FG = {"relabel_rejected": True, "relabel_to": "foreground"}  # ... only where the peer says foreground

# τ_c = the fraction of wrong labels among the pixels the simulator labels c, pooled over 400 masks at 64 px
# (python benchmarks/noise_stats.py --data ../shared/data --dataset D --n 400): one τ drops correct background
# (1 % wrong on ACDC at 0.5) and keeps wrong foreground (25-33 % wrong)
PER_CLASS_TAU = {("kvasir", 0.5): [0.064, 0.199], ("kvasir", 0.3): [0.039, 0.109],
                 ("acdc", 0.5): [0.012, 0.245, 0.332, 0.234], ("acdc", 0.3): [0.006, 0.137, 0.182, 0.110]}
# the same at severity 1.0 on a share f of the masks (noise_stats.py --rates 1.0 --fraction f --n 400)
ACDC_FRACTION_TAU = {50: [0.010, 0.167, 0.215, 0.179], 30: [0.007, 0.120, 0.160, 0.121]}


def coteaching(experimental: dict | None = None, **model) -> tuple[str, dict]:
    """A co-teaching row: configs/noisy.yaml with these module arguments (and experimental options)."""
    if experimental:
        model["experimental"] = dict(experimental)
    return "noisy", {"model": model}


NOISY_REGIMES: dict[str, tuple[str, dict]] = {
    # baselines: plain CE on the noisy mask, the robust losses, and two oracles that read the clean mask
    "naive": ("full", {"model": {"mask_key": "noisy_mask"}, "data": {"train_labels": ["noisy_mask"]}}),
    "gce": ("noisy_robust", {}),
    "sce": ("noisy_robust", {"model": {"robust_loss": "sce"}}),
    # a perfect noise detector whose detections are ignored: CE on the noisy mask without its wrong pixels
    "oracle_selection": ("full", {"class_path": "oracle:OracleSelectionSegModule",
                                  "model": {"mask_key": "noisy_mask"},
                                  "data": {"train_labels": ["mask", "noisy_mask"]}}),
    # the ideal per-sample selection: CE on the clean share of the masks only (benchmarks/oracle.py)
    "oracle_clean_subset": ("full", {"class_path": "oracle:OracleCleanSubsetSegModule",
                                     "model": {"mask_key": "noisy_mask"},
                                     "data": {"train_labels": ["mask", "noisy_mask"]}}),

    # the paper's pixel rule (one ranking over all pixels, τ = 0.3 over 10 epochs) and its co-teaching+
    "coteaching": coteaching({"class_balanced": False}, **PIXEL, num_gradual=10),
    "coteaching_plus": coteaching({"class_balanced": False, **PLUS}, **PIXEL, num_gradual=10),

    # class-balanced pixel selection
    "coteaching_bal": coteaching(**PIXEL, forget_rate=0.1),
    "coteaching_bal_t20": coteaching(**PIXEL, forget_rate=0.2),  # ACDC: 15 % / 28 % of the noisy fg wrong at 0.3 / 0.5
    "coteaching_bal_k2": coteaching(**PIXEL, forget_rate=0.1, num_gradual=2),  # drop before the networks memorise
    # validated with the main network alone (the default averages the two networks' softmaxes)
    "coteaching_bal_a": coteaching(**PIXEL, forget_rate=0.1, inference="a"),
    # Kvasir: the measured background rate with the polyp's τ kept at 0.1; then background τ above the measured one
    "coteaching_pc_kvasir50_fg10": coteaching(**PIXEL, forget_rate=[0.064, 0.1]),
    "coteaching_pc_kvasir50_bg15": coteaching(**PIXEL, forget_rate=[0.15, 0.1]),
    "coteaching_pc_kvasir50_bg20": coteaching(**PIXEL, forget_rate=[0.2, 0.1]),
    "coteaching_pc_kvasir50_bg15_fg05": coteaching(**PIXEL, forget_rate=[0.15, 0.05]),
    # ACDC: a background τ above its measured 0.012, the structures at their measured rates
    "coteaching_pc_acdc50_bg05": coteaching(**PIXEL, forget_rate=[0.05, 0.245, 0.332, 0.234]),
    "coteaching_pc_acdc50_bg10": coteaching(**PIXEL, forget_rate=[0.1, 0.245, 0.332, 0.234]),

    # co-teaching+: the paper's rule collapses (also after a 5-epoch warm-up); the fallback keeps a class whose
    # disagreement pixels are < 10 % of its labelled ones on plain co-teaching
    "coteaching_plus_bal": coteaching(PAPER_PLUS, **PIXEL, forget_rate=0.1),
    "coteaching_plus_bal_w5": coteaching({**PAPER_PLUS, "plus_start_epoch": 5}, **PIXEL, forget_rate=0.1),
    "coteaching_plus_fb": coteaching(PLUS, **PIXEL, forget_rate=0.1),
    "coteaching_plus_fb_t20": coteaching(PLUS, **PIXEL, forget_rate=0.2),

    # peer relabelling of the rejected pixels
    "coteaching_bal_relabel": coteaching(RELABEL, **PIXEL, forget_rate=0.1),
    "coteaching_bal_t20_relabel": coteaching(RELABEL, **PIXEL, forget_rate=0.2),
    "coteaching_bal_relabel_fg": coteaching(RELABEL_FG, **PIXEL, forget_rate=0.1),

    # per-sample selection (the literature's noise model, --noise-fraction f: whole masks are wrong or right)
    "coteaching_sample": coteaching(CE_RANK, forget_rate=0.2),
    "coteaching_sample_dice_t50_k2": coteaching(forget_rate=0.5, num_gradual=2),
    # the rejected images learn the peer's arg-max from T_k on (dropping half of the masks leaves too little data)
    "coteaching_sample_dice_t50_relabel": coteaching(RELABEL, forget_rate=0.5),
    "coteaching_sample_dice_t50_relabel_fg": coteaching(RELABEL_FG, forget_rate=0.5),
}
for (_ds, _rate), _tau in PER_CLASS_TAU.items():
    NOISY_REGIMES[f"coteaching_pc_{_ds}{int(_rate * 100)}"] = coteaching(**PIXEL, forget_rate=_tau)
    NOISY_REGIMES[f"coteaching_pc_{_ds}{int(_rate * 100)}_relabel_fg"] = coteaching(RELABEL_FG, **PIXEL,
                                                                                     forget_rate=_tau)
for _tau in (0.3, 0.5):  # τ = the share of corrupted masks, as in Han et al. (τ = the noise rate)
    _t = int(_tau * 100)
    NOISY_REGIMES[f"coteaching_sample_t{_t}"] = coteaching(CE_RANK, forget_rate=_tau)
    NOISY_REGIMES[f"coteaching_plus_sample_t{_t}"] = coteaching({**CE_RANK, **PLUS}, forget_rate=_tau)
    NOISY_REGIMES[f"coteaching_sample_dice_t{_t}"] = coteaching(forget_rate=_tau)
    NOISY_REGIMES[f"coteaching_plus_sample_dice_t{_t}"] = coteaching(PLUS, forget_rate=_tau)
for _f, _tau in ACDC_FRACTION_TAU.items():
    NOISY_REGIMES[f"coteaching_pc_acdcfrac{_f}"] = coteaching(**PIXEL, forget_rate=_tau)
    NOISY_REGIMES[f"coteaching_plus_pc_acdcfrac{_f}"] = coteaching(PLUS, **PIXEL, forget_rate=_tau)
