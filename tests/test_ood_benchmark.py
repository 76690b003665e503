"""jem_tf.evaluation.ood_benchmark: the synthetic OOD sets."""

import numpy as np
import pytest

from jem_tf import evaluation as ev


def test_synthetic_ood_sets():
    rng = np.random.default_rng(0)
    like = rng.uniform(-1, 1, (5, 4, 4, 2)).astype("float32")
    uniform = ev.synthetic_ood_images("uniform", like, seed=0)
    assert uniform.shape == like.shape and uniform.min() >= -1 and uniform.max() <= 1
    constant = ev.synthetic_ood_images("constant", like, seed=0)
    assert np.all(constant == constant[:, :1, :1, :1])
    permuted = ev.synthetic_ood_images("permuted", like, seed=0)
    for original, shuffled in zip(like, permuted):  # the same pixels (with channels together), moved
        assert not np.array_equal(original, shuffled)
        assert sorted(map(tuple, original.reshape(-1, 2))) == sorted(map(tuple, shuffled.reshape(-1, 2)))
    assert np.array_equal(permuted, ev.synthetic_ood_images("permuted", like, seed=0))
    with pytest.raises(ValueError, match="noise"):
        ev.synthetic_ood_images("noise", like)
