"""Noisy-mask benchmark regimes (issue 6): co-teaching variants, per-class forget rates, peer relabelling and the
oracle. ``common.py`` adds them to its registry (``REGIMES.update(noisy_regimes(Regime))``).
"""
from __future__ import annotations


def noisy_regimes(Regime) -> dict:  # noqa: N803 - the dataclass from common.py (no circular import)
    REGIMES: dict = {}  # noqa: N806 - same name as the registry, so that entries read as in common.py
    # noisy-mask variants (issue 6). At noise rate 0.5 the simulated masks have ~7 % wrong pixels (11 % of the
    # noisy foreground, 5.5 % of the noisy background; 64-px Kvasir, benchmarks/noise_stats.py) and
    # 20 % of the images lost their polyp (drop probability 0.4 x rate): the forget rate follows those numbers,
    # and the ramp T_k is a quarter of a 20-epoch run (the paper: 10 of 200 epochs)
    _COTEACH = "lightning_weakseg.regimes.coteaching:CoTeachingSegModule"
    _FORGET = [("lightning_weakseg.callbacks:ForgetRateSchedule", {})]
    _NOISY = {"mask_key": "noisy_mask", "loss_weights": {"seg/ce": 0.0}, "num_gradual": 5}
    REGIMES["coteaching_bal"] = Regime(_COTEACH, ("noisy_mask",), callbacks=_FORGET,
                                       model_kwargs={**_NOISY, "forget_rate": 0.1, "class_balanced": True})
    REGIMES["coteaching_sample"] = Regime(_COTEACH, ("noisy_mask",), callbacks=_FORGET,
                                          model_kwargs={**_NOISY, "forget_rate": 0.2, "selection": "sample"})
    REGIMES["coteaching_plus_bal"] = Regime(_COTEACH, ("noisy_mask",), callbacks=_FORGET,
                                            model_kwargs={**_NOISY, "forget_rate": 0.1, "class_balanced": True,
                                                          "coteach_plus": True, "plus_min_disagreement": 0.0})
    # co-teaching+ from epoch 0 collapsed (the two random networks soon agree on "background" everywhere, so no
    # foreground pixel stays a candidate); the authors start the disagreement rule after a warm-up
    REGIMES["coteaching_plus_bal_w5"] = Regime(_COTEACH, ("noisy_mask",), callbacks=_FORGET,
                                               model_kwargs={**_NOISY, "forget_rate": 0.1, "class_balanced": True,
                                                             "coteach_plus": True, "plus_start_epoch": 5,
                                                             "plus_min_disagreement": 0.0})
    # the fix (session 4): a class whose disagreement pixels are < 10 % of its labelled pixels uses plain co-teaching
    REGIMES["coteaching_plus_fb"] = Regime(_COTEACH, ("noisy_mask",), callbacks=_FORGET,
                                           model_kwargs={**_NOISY, "forget_rate": 0.1, "class_balanced": True,
                                                         "coteach_plus": True, "plus_min_disagreement": 0.1})
    # a larger forget rate (ACDC at 64 px: 15 % / 28 % of the noisy foreground is wrong at rates 0.3 / 0.5) and an
    # earlier ramp (T_k = 2: drop before the networks memorise)
    REGIMES["coteaching_bal_t20"] = Regime(_COTEACH, ("noisy_mask",), callbacks=_FORGET,
                                           model_kwargs={**_NOISY, "forget_rate": 0.2, "class_balanced": True})
    REGIMES["coteaching_bal_k2"] = Regime(_COTEACH, ("noisy_mask",), callbacks=_FORGET,
                                          model_kwargs={**_NOISY, "forget_rate": 0.1, "class_balanced": True,
                                                        "num_gradual": 2})
    REGIMES["coteaching_plus_fb_t20"] = Regime(_COTEACH, ("noisy_mask",), callbacks=_FORGET,
                                               model_kwargs={**_NOISY, "forget_rate": 0.2, "class_balanced": True,
                                                             "coteach_plus": True, "plus_min_disagreement": 0.1})

    # the same, validated with the main network alone (the default averages the two networks' softmaxes: an ensemble of
    # two, which single-network baselines do not get)
    REGIMES["coteaching_bal_a"] = Regime(_COTEACH, ("noisy_mask",), callbacks=_FORGET,
                                         model_kwargs={**_NOISY, "forget_rate": 0.1, "class_balanced": True,
                                                       "inference": "a"})
    # peer relabelling (session 5): selection only drops labels — even dropping exactly the wrong pixels (oracle_selection)
    # reaches only 0.84 / 0.71 (Kvasir, seeds 0 / 1) and 0.82 (ACDC) of clean at rate 0.5, since the borders and vanished
    # objects then get no label at all; here the rejected pixels learn the peer's arg-max from epoch T_k
    REGIMES["coteaching_bal_relabel"] = Regime(_COTEACH, ("noisy_mask",), callbacks=_FORGET,
                                               model_kwargs={**_NOISY, "forget_rate": 0.1, "class_balanced": True,
                                                             "relabel_rejected": True})
    REGIMES["coteaching_bal_t20_relabel"] = Regime(_COTEACH, ("noisy_mask",), callbacks=_FORGET,
                                                   model_kwargs={**_NOISY, "forget_rate": 0.2, "class_balanced": True,
                                                                 "relabel_rejected": True})
    # one forget rate per class (session 5): τ_c = the fraction of wrong labels among the pixels the simulator labels c,
    # pooled over 400 masks at 64 px (python benchmarks/noise_stats.py --data ../shared/data --dataset D --n 400).
    # A single τ drops correct background (1 % wrong on ACDC at 0.5) and keeps wrong foreground (25-33 % wrong).
    _PER_CLASS_TAU = {("kvasir", 0.5): [0.064, 0.199], ("kvasir", 0.3): [0.039, 0.109],
                      ("acdc", 0.5): [0.012, 0.245, 0.332, 0.234], ("acdc", 0.3): [0.006, 0.137, 0.182, 0.110]}
    for (_ds, _rate), _tau in _PER_CLASS_TAU.items():
        REGIMES[f"coteaching_pc_{_ds}{int(_rate * 100)}"] = Regime(_COTEACH, ("noisy_mask",), callbacks=_FORGET,
                                                                   model_kwargs={**_NOISY, "forget_rate": _tau,
                                                                                 "class_balanced": True})

    # a perfect noise detector whose detections are ignored (not a method: it reads the clean mask): CE on the noisy
    # mask without its wrong pixels (benchmarks/oracle.py)
    REGIMES["oracle_selection"] = Regime("oracle:OracleSelectionSegModule", ("mask", "noisy_mask"),
                                         model_kwargs={"mask_key": "noisy_mask"})

    # Kvasir: the measured background rate with the polyp's τ kept at one-τ's 0.1 (the measured 0.199 drops too much of
    # the rare class)
    REGIMES["coteaching_pc_kvasir50_fg10"] = Regime(_COTEACH, ("noisy_mask",), callbacks=_FORGET,
                                                    model_kwargs={**_NOISY, "forget_rate": [0.064, 0.1],
                                                                  "class_balanced": True})
    # session 6: peer relabelling restricted to foreground targets (relabel_to="foreground") — recovers vanished /
    # eroded objects, cannot teach a class away (the unrestricted rule collapsed ACDC seed 1)
    _FG = {"relabel_rejected": True, "relabel_to": "foreground"}
    REGIMES["coteaching_bal_relabel_fg"] = Regime(_COTEACH, ("noisy_mask",), callbacks=_FORGET,
                                                  model_kwargs={**_NOISY, "forget_rate": 0.1, "class_balanced": True,
                                                                **_FG})
    for (_ds, _rate), _tau in _PER_CLASS_TAU.items():
        REGIMES[f"coteaching_pc_{_ds}{int(_rate * 100)}_relabel_fg"] = Regime(
            _COTEACH, ("noisy_mask",), callbacks=_FORGET,
            model_kwargs={**_NOISY, "forget_rate": _tau, "class_balanced": True, **_FG})
    # Kvasir: a background τ above the measured 0.064 (vanished polyps are 19 % of the images) with the polyp at 0.1
    for _bg in (0.15, 0.2):
        REGIMES[f"coteaching_pc_kvasir50_bg{int(_bg * 100)}"] = Regime(
            _COTEACH, ("noisy_mask",), callbacks=_FORGET,
            model_kwargs={**_NOISY, "forget_rate": [_bg, 0.1], "class_balanced": True})
    # ACDC: the same question — a background τ above its measured 0.012, the structures at their measured rates
    for _bg in (0.05, 0.1):
        REGIMES[f"coteaching_pc_acdc50_bg{int(_bg * 100):02d}"] = Regime(
            _COTEACH, ("noisy_mask",), callbacks=_FORGET,
            model_kwargs={**_NOISY, "forget_rate": [_bg, 0.245, 0.332, 0.234], "class_balanced": True})
    REGIMES["coteaching_pc_kvasir50_bg15_fg05"] = Regime(_COTEACH, ("noisy_mask",), callbacks=_FORGET,
                                                          model_kwargs={**_NOISY, "forget_rate": [0.15, 0.05],
                                                                        "class_balanced": True})
    # session 7: the literature's noise model (--noise-fraction 0.5: half of the masks corrupted, the others clean).
    # τ = the share of corrupted masks, as in Han et al. (τ = the noise rate, no tuning); per-sample selection is the
    # mode the model is for: whole masks are wrong or right
    for _tau in (0.3, 0.5):
        REGIMES[f"coteaching_sample_t{int(_tau * 100)}"] = Regime(
            _COTEACH, ("noisy_mask",), callbacks=_FORGET,
            model_kwargs={**_NOISY, "forget_rate": _tau, "selection": "sample"})
        REGIMES[f"coteaching_plus_sample_t{int(_tau * 100)}"] = Regime(
            _COTEACH, ("noisy_mask",), callbacks=_FORGET,
            model_kwargs={**_NOISY, "forget_rate": _tau, "selection": "sample", "coteach_plus": True})
    # per-sample selection ranked by each network's per-image soft Dice loss (mean CE ranks the masks that lost their
    # object first: coteaching_sample_t50 collapsed to 0.045 on Kvasir)
    for _tau in (0.3, 0.5):
        REGIMES[f"coteaching_sample_dice_t{int(_tau * 100)}"] = Regime(
            _COTEACH, ("noisy_mask",), callbacks=_FORGET,
            model_kwargs={**_NOISY, "forget_rate": _tau, "selection": "sample", "sample_rank": "dice"})
        REGIMES[f"coteaching_plus_sample_dice_t{int(_tau * 100)}"] = Regime(
            _COTEACH, ("noisy_mask",), callbacks=_FORGET,
            model_kwargs={**_NOISY, "forget_rate": _tau, "selection": "sample", "sample_rank": "dice",
                          "coteach_plus": True})
    # the same model's per-class wrong fractions at severity 1.0 on a share f of the masks (noise_stats.py --rates 1.0
    # --fraction f --n 400): ACDC f = 0.5: bg 0.010 / RV 0.167 / Myo 0.215 / LV 0.179; f = 0.3: 0.007 / 0.120 / 0.160 /
    # 0.121 (Kvasir keeps the class-balanced τ = 0.1 of coteaching_bal; measured f = 0.5: bg 0.046 / polyp 0.137)
    for _f, _tau in ((50, [0.010, 0.167, 0.215, 0.179]), (30, [0.007, 0.120, 0.160, 0.121])):
        REGIMES[f"coteaching_pc_acdcfrac{_f}"] = Regime(_COTEACH, ("noisy_mask",), callbacks=_FORGET,
                                                        model_kwargs={**_NOISY, "forget_rate": _tau,
                                                                      "class_balanced": True})
        REGIMES[f"coteaching_plus_pc_acdcfrac{_f}"] = Regime(
            _COTEACH, ("noisy_mask",), callbacks=_FORGET,
            model_kwargs={**_NOISY, "forget_rate": _tau, "class_balanced": True, "coteach_plus": True,
                          "plus_min_disagreement": 0.1})
    # session 8: the ideal per-sample selection — CE on the clean share of the masks only (benchmarks/oracle.py reads
    # the clean mask to find it): the bound per-sample co-teaching at τ = f approaches with a perfect ranking
    REGIMES["oracle_clean_subset"] = Regime("oracle:OracleCleanSubsetSegModule", ("mask", "noisy_mask"),
                                            model_kwargs={"mask_key": "noisy_mask"})
    # Dice-ranked per-sample selection with a 2-epoch ramp (T_k = 2 of 20, nearer the paper's 10 of 200): the corrupted
    # half of the masks is trained on for fewer epochs before it is dropped
    REGIMES["coteaching_sample_dice_t50_k2"] = Regime(
        _COTEACH, ("noisy_mask",), callbacks=_FORGET,
        model_kwargs={**_NOISY, "forget_rate": 0.5, "selection": "sample", "sample_rank": "dice", "num_gradual": 2})
    # Dice-ranked per-sample selection whose rejected images learn the peer's arg-max from T_k on (session 8): dropping
    # the corrupted half leaves too little data at this budget (oracle_clean_subset: 0.72-0.73 of clean), so the images
    # of the dropped masks train on the peer's prediction instead (relabel_to "any" or "foreground")
    for _to in ("any", "foreground"):
        REGIMES["coteaching_sample_dice_t50_relabel" + ("" if _to == "any" else "_fg")] = Regime(
            _COTEACH, ("noisy_mask",), callbacks=_FORGET,
            model_kwargs={**_NOISY, "forget_rate": 0.5, "selection": "sample", "sample_rank": "dice",
                          "relabel_rejected": True, "relabel_to": _to})
    return REGIMES
