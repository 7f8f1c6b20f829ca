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


def test_void_ground_truth_is_left_out_as_cityscapes_scores():
    from segmentation.metrics import excluded_classes, truth_confusion

    truth = np.array([[0, 0, 1, 1, 2, 2]])  # 0 is void
    pred = np.array([[3, 1, 1, 1, 2, 0]])  # whatever is predicted on void does not count
    cm = truth_confusion(truth, pred, 4)
    assert cm.sum() == 4 and cm[:, 3].sum() == 0
    s = scores(cm, excluded=excluded_classes(binary=False))
    assert np.isnan(s["iou"][0])  # void is not a class to score, even where predicted
    assert s["iou"][1:3] == pytest.approx([1.0, 1 / 2])
    assert s["mean_iou"] == pytest.approx(3 / 4) and s["pixel_accuracy"] == pytest.approx(3 / 4)


def test_a_binary_model_is_scored_on_its_foreground_superclass():
    from segmentation.metrics import excluded_classes, truth_confusion

    truth = np.array([[0, 7, 7, 1, 5]])  # void, vehicle, vehicle, flat, sky
    pred = np.array([[1, 1, 0, 0, 1]])
    s = scores(truth_confusion(truth, pred, 2, foreground=7), excluded=excluded_classes(binary=True))
    # background: tp 1 (flat), fn 1 (sky predicted fg), fp 1 -> 1/3; vehicle: tp 1, fn 1, fp 1 -> 1/3
    assert s["iou"].tolist() == pytest.approx([1 / 3, 1 / 3])


def test_truth_and_prediction_of_different_sizes_are_refused():
    from segmentation.metrics import truth_confusion

    with pytest.raises(ValueError, match=r"\(3, 2\).*\(2, 2\)"):
        truth_confusion(np.zeros((2, 3), np.uint8), np.zeros((2, 2), np.uint8), 8)
