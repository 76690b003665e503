"""jem_tf.data.pipelines: seeded tf.data pipelines, semi-supervised batches included."""

import numpy as np
import pytest

from jem_tf import data
from jem_tf.data import make_semi_supervised_dataset
from jem_tf.run.splits import Split


def test_make_dataset_batches_shuffles_and_augments_deterministically():
    x = np.linspace(-1, 1, 10 * 8 * 8 * 3, dtype="float32").reshape(10, 8, 8, 3)
    y = np.arange(10, dtype="int32")
    batches = list(data.make_dataset(x, y, batch_size=4, shuffle=True, seed=1).as_numpy_iterator())
    assert [len(b[1]) for b in batches] == [4, 4, 2]
    assert sorted(np.concatenate([b[1] for b in batches])) == list(range(10))
    again = list(data.make_dataset(x, y, batch_size=4, shuffle=True, seed=1).as_numpy_iterator())
    np.testing.assert_array_equal(batches[0][1], again[0][1])
    augmented = next(data.make_dataset(x, y, batch_size=10, shuffle=False, augment="crop_flip").as_numpy_iterator())
    assert augmented[0].shape == x.shape and not np.array_equal(augmented[0], x)
    assert augmented[0].min() >= -1 and augmented[0].max() <= 1
    with pytest.raises(ValueError, match="rotate"):
        next(data.make_dataset(x, y, batch_size=10, shuffle=False, augment="rotate").as_numpy_iterator())


def test_semi_supervised_batches_mix_labelled_rows_into_every_batch_and_resume_exactly():
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, (50, 4, 4, 1)).astype("float32")
    labelled = Split(x[:6] + 10.0, np.array([0, 1, 2, 0, 1, 2], np.int32))  # recognisable rows
    kwargs = dict(batch_size=16, labelled_batch_size=4, seed=1, num_epochs=2)
    batches = list(make_semi_supervised_dataset(x, labelled.images, labelled.labels, first_epoch=0, **kwargs))
    assert len(batches) == 2 * 4  # ceil(50 / 16) per epoch
    for images, labels, weights in batches:
        images, labels, weights = images.numpy(), labels.numpy(), weights.numpy()
        is_labelled = images.reshape(len(images), -1).max(axis=1) > 5
        assert weights.sum() == 4 and np.array_equal(weights > 0, is_labelled)
        for image, label in zip(images[is_labelled], labels[is_labelled]):
            source = np.flatnonzero(np.all(labelled.images == image, axis=(1, 2, 3)))
            assert label == labelled.labels[source[0]]
    resumed = list(make_semi_supervised_dataset(x, labelled.images, labelled.labels, first_epoch=1, **kwargs))
    for a, b in zip(batches[4:], resumed):
        for u, v in zip(a, b):
            np.testing.assert_array_equal(u.numpy(), v.numpy())
