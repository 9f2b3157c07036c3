"""Batch contract: the validator names sample and field for every kind of bad input; collate pads lists."""
import math

import numpy as np
import pytest
import torch

from lightning_weakseg.data import WeakSegDataError, collate, validate_sample, validate_batch


def good(**over):
    s = {"image": torch.rand(3, 8, 10), "mask": torch.zeros(8, 10, dtype=torch.long), "id": "img7"}
    s.update(over)
    return s


def test_good_sample_passes():
    validate_sample(good(boxes=torch.tensor([[1, 0, 0, 10, 8.0]]), points=torch.tensor([[1, 7, 9.0]]),
                         tags=torch.tensor([1.0, 1.0])), num_classes=2, in_channels=3)


@pytest.mark.parametrize("over, field", [
    ({"mask": torch.full((8, 10), 2)}, "mask"),                        # class id >= num_classes
    ({"mask": torch.zeros(8, 9, dtype=torch.long)}, "mask"),           # size differs from image
    ({"scribble": torch.full((8, 10), -1)}, "scribble"),
    ({"boxes": torch.tensor([[1, 0, 0, 11, 8.0]])}, "boxes"),          # outside the image
    ({"boxes": torch.tensor([[1, 5, 0, 5, 8.0]])}, "boxes"),           # x1 <= x0
    ({"boxes": torch.tensor([[1, 0, 0, math.nan, 8.0]])}, "boxes"),    # NaN
    ({"boxes": torch.tensor([[2, 0, 0, 3, 3.0]])}, "boxes"),           # class id >= num_classes
    ({"boxes": torch.tensor([[1, 0, 0, 3.0]])}, "boxes"),              # wrong width
    ({"points": torch.tensor([[1, 8, 0.0]])}, "points"),              # y == H: outside
    ({"points": torch.tensor([[1, 0, -1.0]])}, "points"),
    ({"image": torch.full((3, 8, 10), math.nan)}, "image"),            # NaN pixels
    ({"image": torch.full((3, 8, 10), math.inf)}, "image"),
    ({"image": torch.rand(1, 8, 10)}, "image"),                        # wrong channel count
    ({"tags": torch.tensor([1.0, 0.5])}, "tags"),
])
def test_bad_input_names_sample_and_field(over, field):
    with pytest.raises(WeakSegDataError) as e:
        validate_sample(good(**over), num_classes=2, in_channels=3)
    assert e.value.field == field and e.value.sample == "img7"
    assert "img7" in str(e.value) and field in str(e.value)


def test_sample_without_any_label_is_an_error():
    with pytest.raises(WeakSegDataError) as e:
        validate_sample({"image": torch.rand(3, 4, 4), "id": "a"}, 2)
    assert e.value.field == "labels"


def test_ignore_index_is_allowed_in_masks():
    validate_sample(good(mask=torch.full((8, 10), 255)), num_classes=2)


def test_collate_variable_lengths_and_flags():
    s1 = good(boxes=torch.tensor([[1, 0, 0, 2, 2.0], [1, 3, 3, 5, 5.0]]), index=0)
    s2 = {"image": torch.rand(3, 8, 10), "points": torch.tensor([[1, 2, 2.0]]), "id": "b", "index": 1}
    b = collate([s1, s2])
    assert b["has_mask"].tolist() == [True, False]
    assert (b["mask"][1] == 255).all() and (b["mask"][0] == 0).all()
    assert [len(x) for x in b["boxes"]] == [2, 0] and b["has_boxes"].tolist() == [True, False]
    assert [len(x) for x in b["points"]] == [0, 1] and b["has_points"].tolist() == [False, True]
    assert b["id"] == ["img7", "b"] and b["index"].tolist() == [0, 1]
    validate_batch(b, 2)


def test_collate_refuses_mixed_sizes():
    with pytest.raises(WeakSegDataError, match="share a shape"):
        collate([good(), {"image": torch.rand(3, 9, 10), "mask": torch.zeros(9, 10, dtype=torch.long)}])


def test_validate_batch_names_bad_mask_value():
    b = collate([good(), good(id="x2", mask=torch.zeros(8, 10, dtype=torch.long))])
    b["mask"][1, 0, 0] = 7
    with pytest.raises(WeakSegDataError) as e:
        validate_batch(b, 2)
    assert e.value.sample == "x2" and e.value.field == "mask"
