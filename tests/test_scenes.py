import numpy as np

from segmentation.classes import CLASS_NAMES, label_ids_to_superclasses
from segmentation.scenes import generate_scene


def test_same_seed_same_scene_other_seed_other_scene():
    a, ma = generate_scene(3, 64, 128)
    b, mb = generate_scene(3, 64, 128)
    c, _ = generate_scene(4, 64, 128)
    assert np.array_equal(a, b) and np.array_equal(ma, mb)
    assert not np.array_equal(a, c)


def test_scene_shapes_and_label_ids():
    image, labels = generate_scene(0, 96, 200)
    assert image.shape == (96, 200, 3) and image.dtype == np.uint8
    assert labels.shape == (96, 200) and labels.dtype == np.uint8
    assert labels.max() <= 33


def test_scenes_show_the_street_classes_where_a_street_has_them():
    present = set()
    for seed in range(10):
        _, labels = generate_scene(seed, 128, 256)
        sup = label_ids_to_superclasses(labels)
        present |= {CLASS_NAMES[i] for i in np.unique(sup)}
        # sky on top, flat ground at the bottom centre
        assert sup[0, 128] == CLASS_NAMES.index("sky")
    assert present >= {"flat", "construction", "object", "nature", "sky", "human", "vehicle"}
