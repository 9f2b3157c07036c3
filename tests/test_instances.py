"""Instance post-processing and instance metrics against hand-computed cases."""
import numpy as np
import pytest

from lightning_weakseg.instances import (aji, contingency, instance_metrics, instances_from_mask,
                                         instances_from_points, object_f1, pixel_dice)


def hand_case():
    gt = np.zeros((6, 10), int)
    gt[0:2, 0:4] = 7      # G1: 8 px
    gt[3:6, 0:3] = 3      # G2: 9 px
    gt[0:3, 6:10] = 5     # G3: 12 px (missed)
    pred = np.zeros((6, 10), int)
    pred[0:2, 0:3] = 1    # S1: 6 px inside G1 -> IoU 6/8
    pred[3:6, 0:1] = 2    # S2: 3 px inside G2 -> IoU 3/9
    pred[5, 5:9] = 4      # S3: 4 px false positive
    return gt, pred


def test_object_f1_hand_case():
    gt, pred = hand_case()
    r = object_f1(gt, pred)
    # only S1 matches (IoU 0.75 > 0.5); S2 (0.33) and S3 do not: tp 1, fp 2, fn 2
    assert (r["tp"], r["fp"], r["fn"]) == (1, 2, 2)
    assert r["f1"] == pytest.approx(2 / (2 + 2 + 2))
    assert r["precision"] == pytest.approx(1 / 3) and r["recall"] == pytest.approx(1 / 3)


def test_aji_hand_case():
    gt, pred = hand_case()
    # G1-S1: ∩ 6, ∪ 8; G2-S2: ∩ 3, ∪ 9; G3 unmatched: + 12; S3 never chosen: + 4
    assert aji(gt, pred) == pytest.approx((6 + 3) / (8 + 9 + 12 + 4))


def test_aji_prediction_chosen_twice_and_split_nucleus():
    gt = np.zeros((4, 8), int)
    gt[:, 0:4] = 1
    gt[:, 4:8] = 2
    pred = np.zeros((4, 8), int)
    pred[:, 1:7] = 9        # one segment over both nuclei
    pred[0, 0] = 4          # a 1-px sliver of G1
    # G1: IoU(9) = 12/(16+24-12) = 3/7 > IoU(4) = 1/16, same for G2: S=9 chosen twice, S=4 unused
    expected = (12 + 12) / (28 + 28 + 1)
    assert aji(gt, pred) == pytest.approx(expected)
    assert object_f1(gt, pred)["tp"] == 0


def test_perfect_and_empty():
    gt, _ = hand_case()
    shuffled = np.where(gt > 0, gt * 11 + 2, 0)  # any relabelling
    assert aji(gt, shuffled) == 1.0 and object_f1(gt, shuffled)["f1"] == 1.0
    assert pixel_dice(gt, shuffled) == 1.0
    z = np.zeros_like(gt)
    assert aji(z, z) == 1.0 and object_f1(z, z)["f1"] == 1.0 and pixel_dice(z, z) == 1.0
    assert aji(gt, z) == 0.0 and object_f1(gt, z)["f1"] == 0.0


def test_contingency_and_dice():
    gt, pred = hand_case()
    c, ag, ap = contingency(gt, pred)
    assert c.shape == (4, 4) and ag.tolist() == [60 - 29, 9, 12, 8] and c.sum() == gt.size
    inter = ((gt > 0) & (pred > 0)).sum()
    assert pixel_dice(gt, pred) == pytest.approx(2 * inter / ((gt > 0).sum() + (pred > 0).sum()))
    m = instance_metrics(gt, pred)
    assert set(m) == {"dice", "aji", "f1", "precision", "recall"}


def test_instances_from_mask_and_points():
    m = np.zeros((10, 20), bool)
    yy, xx = np.mgrid[0:10, 0:20]
    m |= (yy - 5) ** 2 + (xx - 5) ** 2 <= 16
    m |= (yy - 5) ** 2 + (xx - 11) ** 2 <= 16    # touches the first disc
    m[0, 18:20] = True                           # a 2-px speck
    cc = instances_from_mask(m)
    assert cc.max() == 2
    assert instances_from_mask(m, min_size=3).max() == 1
    ws = instances_from_points(m, np.array([[5, 5], [5, 11]]), min_size=3)
    assert ws.max() == 2
    # the watershed cut sits at the neck between the centres (column 8)
    assert ws[5, 6] != ws[5, 10] and ws[5, 6] > 0 and ws[5, 10] > 0
    cut_cols = np.nonzero(ws[5, :-1] != ws[5, 1:])[0]
    assert set(cut_cols) & {7, 8}
    # speck without a point stays as an extra instance unless dropped
    assert instances_from_points(m, np.array([[5, 5], [5, 11]])).max() == 3
    assert instances_from_points(m, np.array([[5, 5], [5, 11]]), keep_unseeded=False).max() == 2
