import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

# Distributed tests mirror over 2 logical CPU devices; the split must precede TensorFlow's device
# initialisation, so it happens once for the whole session. Single-device tests use /cpu:0 as usual.
NUM_LOGICAL_CPUS = 2


def pytest_configure(config):
    from jem_tf.distribution import split_cpu

    split_cpu(NUM_LOGICAL_CPUS)


@pytest.fixture
def tiny_data():
    """96 random 8x8x1 images in [-1, 1] with labels from 3 classes, seeded."""
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, size=(96, 8, 8, 1)).astype("float32")
    y = rng.integers(0, 3, size=96).astype("int32")
    # Make the classes separable: shift the mean brightness per class.
    x = np.clip(x * 0.3 + (y[:, None, None, None] - 1) * 0.6, -1, 1).astype("float32")
    return x, y


def tiny_jem(num_classes=3, seed=0, **kwargs):
    import keras

    from jem_tf import JEM, SGLDSampler, small_cnn

    backbone = small_cnn(num_classes=num_classes, input_shape=(8, 8, 1), width=4, stages=1, seed=seed)
    kwargs.setdefault("sampler", SGLDSampler(n_steps=3))
    kwargs.setdefault("buffer_size", 64)
    model = JEM(backbone, seed=seed, **kwargs)
    model.compile(optimizer=keras.optimizers.Adam(1e-3))
    return model
