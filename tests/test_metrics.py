import numpy as np
import pytest

from segmentation.metrics import class_fractions, confusion_matrix, scores


def test_confusion_matrix_counts_truth_rows_against_prediction_columns():
    truth = np.array([[0, 0, 1, 1]])
    pred = np.array([[0, 1, 1, 1]])
    cm = confusion_matrix(truth, pred, 3)
    assert cm.tolist() == [[1, 1, 0], [0, 2, 0], [0, 0, 0]]


def test_scores_by_hand():
    truth = np.array([[0, 0, 1, 1]])
    pred = np.array([[0, 1, 1, 1]])
    s = scores(confusion_matrix(truth, pred, 3))
    # class 0: tp 1, fn 1 -> IoU 1/2, Dice 2/3; class 1: tp 2, fp 1 -> IoU 2/3, Dice 4/5; class 2 absent
    assert s["iou"][:2] == pytest.approx([1 / 2, 2 / 3])
    assert s["dice"][:2] == pytest.approx([2 / 3, 4 / 5])
    assert np.isnan(s["iou"][2])
    assert s["mean_iou"] == pytest.approx((1 / 2 + 2 / 3) / 2)
    assert s["pixel_accuracy"] == pytest.approx(3 / 4)


def test_confusion_matrix_refuses_out_of_range_ids():
    with pytest.raises(ValueError, match="0..1"):
        confusion_matrix(np.array([2]), np.array([0]), 2)


def test_class_fractions_sum_to_one():
    labels = np.array([[0, 1], [1, 7]], np.uint8)
    f = class_fractions(labels, 8)
    assert f.tolist() == [0.25, 0.5, 0, 0, 0, 0, 0, 0.25]
