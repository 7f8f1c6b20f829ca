import numpy as np
import pytest

from segmentation.samples import DATA_DIR, Samples, UnknownSample, write_samples


def test_committed_samples_are_listed_with_masks():
    s = Samples()
    assert len(s.ids()) >= 5
    for i in s.ids():
        assert s.has_mask(i)
        img, lab = s.image(i), s.label_ids(i)
        assert img.shape[:2] == lab.shape and img.dtype == np.uint8 and lab.max() <= 33


def test_committed_samples_are_what_the_generator_makes(tmp_path):
    ids = write_samples(tmp_path)
    fresh, committed = Samples(tmp_path), Samples(DATA_DIR)
    assert ids == committed.ids()
    for i in ids:
        assert np.array_equal(fresh.image(i), committed.image(i))
        assert np.array_equal(fresh.label_ids(i), committed.label_ids(i))


@pytest.mark.parametrize(
    "image_id",
    ["../README", "..", "/etc/passwd", "scene_900/../../service", "..%2Fservice", "%252e%252e%252f", "a\\b",
     "scene_900.png", "", " scene_900", "scene_900\x00", "x" * 65],
)
def test_ids_that_try_to_leave_data_are_unknown(image_id):
    with pytest.raises(UnknownSample):
        Samples().image_path(image_id)


def test_unknown_id_lists_the_known_ones():
    with pytest.raises(UnknownSample, match="scene_900"):
        Samples().image("nope")


def test_a_symlink_planted_in_data_is_not_served(tmp_path):
    write_samples(tmp_path, seeds=[1], size=(32, 64))
    (tmp_path / "images" / "evil.png").symlink_to("/etc/hostname")
    assert Samples(tmp_path).ids() == ["scene_1"]
