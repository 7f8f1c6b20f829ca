import numpy as np
import pytest

from segmentation.classes import (
    CLASS_NAMES,
    LABEL_ID_TO_SUPERCLASS,
    PALETTE,
    TRAIN_ID_TO_SUPERCLASS,
    label_ids_to_superclasses,
    train_ids_to_superclasses,
)

# The table from the issue, written out independently of the ranges in classes.py.
LABEL_IDS = {
    "void": [0, 1, 2, 3, 4, 5, 6], "flat": [7, 8, 9, 10], "construction": [11, 12, 13, 14, 15, 16],
    "object": [17, 18, 19, 20], "nature": [21, 22], "sky": [23], "human": [24, 25],
    "vehicle": [26, 27, 28, 29, 30, 31, 32, 33],
}
TRAIN_IDS = {
    "flat": [0, 1], "construction": [2, 3, 4], "object": [5, 6, 7], "nature": [8, 9], "sky": [10],
    "human": [11, 12], "vehicle": [13, 14, 15, 16, 17, 18],
}


def test_every_label_id_maps_to_its_superclass():
    for name, ids in LABEL_IDS.items():
        assert LABEL_ID_TO_SUPERCLASS[ids].tolist() == [CLASS_NAMES.index(name)] * len(ids), name


def test_license_plate_minus_one_is_a_vehicle():
    mask = np.array([[-1, 7], [23, 0]], dtype=np.int32)
    out = label_ids_to_superclasses(mask)
    assert out.tolist() == [[CLASS_NAMES.index("vehicle"), 1], [5, 0]]
    assert out.dtype == np.uint8


def test_every_train_id_maps_and_ignore_is_void():
    for name, ids in TRAIN_IDS.items():
        assert TRAIN_ID_TO_SUPERCLASS[ids].tolist() == [CLASS_NAMES.index(name)] * len(ids), name
    assert train_ids_to_superclasses(np.array([[255, 10]], np.uint8)).tolist() == [[0, 5]]


def test_out_of_range_label_ids_are_refused():
    with pytest.raises(ValueError, match="-1..33"):
        label_ids_to_superclasses(np.array([[40]], dtype=np.int32))


def test_palette_is_the_dashboards_palette():
    assert PALETTE.dtype == np.uint8 and PALETTE.shape == (8, 3)
    assert PALETTE[CLASS_NAMES.index("flat")].tolist() == [128, 64, 128]
    assert PALETTE[CLASS_NAMES.index("object")].tolist() == [255, 165, 0]
    assert PALETTE[CLASS_NAMES.index("vehicle")].tolist() == [0, 0, 142]
