"""Train the semi-supervised regimes with 1 CPU process and with 2 DDP processes (gloo); tests/test_semi.py compares
the runs (the teacher of the mean teacher, both networks of cross pseudo supervision).

    python scripts/ddp_semi_check.py --out /tmp/ddp_semi                   # every case
    python scripts/ddp_semi_check.py --out /tmp/ddp_semi --case mean_teacher

The runs, their outputs (``<out>/<case>/<variant>/weights_rank<r>.pt``, ``records_rank<r>.pt``, ``metrics.json``)
and why they are comparable (float64, GroupNorm, no shuffle, no augmentation) are those of
``scripts/ddp_regime_check.py``, whose runner this script uses with the cases below. Half of the training samples
carry a mask and half nothing (``label_fractions={"mask": 0.5, "none": 0.5}``; in the two-stream case a quarter carry
a mask and every batch is half labelled); the student's strong view is drawn
per sample (seeded by its index), so it does not depend on the rank a sample is dealt to.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import ddp_regime_check as check  # noqa: E402

SEMI = {"label_fractions": {"mask": 0.5, "none": 0.5}}
CASES = {
    "mean_teacher": dict(module="lightning_weakseg.regimes:MeanTeacherSegModule", kind="organ", labels=["mask"],
                         data=SEMI, kwargs={"ema_decay": 0.9, "consistency_rampup_steps": 3}),
    # two-stream batches (labelled_share): every rank's batch half labelled, the ranks' batches together the
    # one-process batch
    "mean_teacher_two_stream": dict(module="lightning_weakseg.regimes:MeanTeacherSegModule", kind="organ",
                                    labels=["mask"], data={"label_fractions": {"mask": 0.25, "none": 0.75},
                                                           "labelled_share": 0.5},
                                    kwargs={"ema_decay": 0.9, "consistency_rampup_steps": 3}),
    "cps": dict(module="lightning_weakseg.regimes:CPSSegModule", kind="organ", labels=["mask"], data=SEMI,
                kwargs={"consistency_rampup_steps": 3}),
}
check.CASES.clear()
check.CASES.update(CASES)

if __name__ == "__main__":
    sys.exit(check.main())
