"""jem_tf.ood.outliers: the outliers and shifts made from validation images."""

import numpy as np
import pytest

from jem_tf import choices as names
from jem_tf.ood import outliers


@pytest.mark.parametrize("kind", sorted(outliers.KINDS))
def test_made_images_keep_shape_and_range_are_seeded_and_change_the_images(kind):
    images = np.random.default_rng(0).uniform(-1, 1, (6, 8, 8, 1)).astype(np.float32)
    out = outliers.make(kind, images, seed=3)
    assert out.shape == images.shape and out.dtype == np.float32
    assert out.min() >= -1 - 1e-6 and out.max() <= 1 + 1e-6 and not np.allclose(out, images)
    np.testing.assert_array_equal(out, outliers.make(kind, images, seed=3))
    assert kind in names.OUTLIER_KINDS + names.ACCEPTED_SHIFTS


def test_made_images_do_what_they_say():
    rng = np.random.default_rng(0)
    images = -np.ones((4, 16, 16, 1), np.float32)
    images[:, 4:12, 4:12] = 1.0  # a bright square on a dark background
    outlined = outliers.make("outlined", images)
    assert outlined[:, 8, 8].max() == -1.0 and outlined[:, 4, 8].min() > 0.0  # flat inside, bright on edges
    moved = outliers.make("translated", images, seed=1)
    assert np.all(np.sort(moved.reshape(4, -1), axis=1) == np.sort(images.reshape(4, -1), axis=1))
    assert not np.array_equal(moved, images)
    mosaic = outliers.make("mosaic", images)
    np.testing.assert_allclose(mosaic[:, :8, :8, 0], images[:, ::2, ::2, 0])  # the image at half scale, top left
    coarse = outliers.make("coarse", images, seed=2)  # the image's own colours (-1 or 1), blended smoothly
    assert coarse.min() >= -1.0 and coarse.max() <= 1.0
    for axis in (1, 2):  # no detail: neighbours differ by at most the range over the image's width
        assert np.abs(np.diff(coarse, axis=axis)).max() <= 2.0 / 15 + 1e-6
    corners = coarse[:, [0, 0, -1, -1], [0, -1, 0, -1], 0]
    assert np.all(np.isin(corners[:, 0], [-1.0, 1.0]))  # the first corner keeps a pixel's colour
    low = outliers.make("low_contrast", rng.uniform(-1, 1, (3, 8, 8, 1)))
    assert np.abs(low).max() <= 0.3 + 1e-6
    with pytest.raises(ValueError, match="Unknown outlier or shift kind 'nope'"):
        outliers.make("nope", images)
    with pytest.raises(ValueError, match="must return finite images of shape"):
        outliers.make("mine", images, function=lambda x, value_range, seed: x[:1])
    with pytest.raises(ValueError, match="Unknown outlier kind 'nope'"):
        outliers.resolve(["inverted", "nope"], role="outlier")
    with pytest.raises(ValueError, match="given twice"):
        outliers.resolve(["inverted", "inverted"], role="outlier")
