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


def test_label_sets_are_recognised_by_names_then_by_count():
    from segmentation.classes import LABEL_SETS, TRAIN_ID_NAMES, recognise_label_set

    hf_style = [n.replace(" ", "_").title() for n in TRAIN_ID_NAMES]  # case and separators do not matter
    assert recognise_label_set(19, hf_style).name == "trainid"
    assert recognise_label_set(34).name == "labelid"
    assert recognise_label_set(8, [f"LABEL_{i}" for i in range(8)]).name == "superclass"
    assert recognise_label_set(19, ["x"] * 19, named="trainid").name == "trainid"
    for table in (LABEL_SETS["trainid"], LABEL_SETS["labelid"]):
        assert len(table.to_superclass) == len(table.classes) and max(table.to_superclass) < 8
    assert LABEL_SETS["trainid"].to_superclass[TRAIN_ID_NAMES.index("rider")] == 6  # human
    with pytest.raises(ValueError, match="predicts 21 classes"):
        recognise_label_set(21)
    with pytest.raises(ValueError, match="not the trainid classes in their order"):
        recognise_label_set(19, list(reversed(TRAIN_ID_NAMES)))
    with pytest.raises(ValueError, match="unknown label set 'ade20k'"):
        recognise_label_set(150, named="ade20k")
