import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import hashlib  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

# Distributed tests mirror over 2 logical CPU devices; the split must precede TensorFlow's device
# initialisation, so it happens once for the whole session. Single-device tests use /cpu:0 as usual.
NUM_LOGICAL_CPUS = 2


def pytest_configure(config):
    import tempfile

    from jem_tf.sampling.distribution import split_cpu

    split_cpu(NUM_LOGICAL_CPUS)
    # jem-tf's caches (precision decisions, decoded image folders) go to a directory of this test session, never
    # the user's (subprocesses inherit it).
    config._jem_cache = tempfile.TemporaryDirectory(prefix="jem-tf-test-cache-")
    os.environ["XDG_CACHE_HOME"] = config._jem_cache.name


@pytest.fixture
def tiny_data():
    """96 random 8x8x1 images in [-1, 1] with labels from 3 classes, seeded."""
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, size=(96, 8, 8, 1)).astype("float32")
    y = rng.integers(0, 3, size=96).astype("int32")
    # Make the classes separable: shift the mean brightness per class.
    x = np.clip(x * 0.3 + (y[:, None, None, None] - 1) * 0.6, -1, 1).astype("float32")
    return x, y


def separable_data(n):
    """``n`` 8x8x1 images in [-1, 1] of 3 classes separated by mean brightness, with their labels (seed 0)."""
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, n).astype("int32")
    x = np.clip(rng.uniform(-1, 1, (n, 8, 8, 1)) * 0.3 + (y[:, None, None, None] - 1) * 0.6, -1, 1)
    return x.astype("float32"), y


def tiny_jem(num_classes=3, seed=0, **kwargs):
    import keras

    from jem_tf import JEM, SGLDSampler, small_cnn

    backbone = small_cnn(num_classes=num_classes, input_shape=(8, 8, 1), width=4, stages=1, seed=seed)
    kwargs.setdefault("sampler", SGLDSampler(n_steps=3))
    kwargs.setdefault("buffer_size", 64)
    model = JEM(backbone, seed=seed, **kwargs)
    model.compile(optimizer=keras.optimizers.Adam(1e-3))
    return model


# ------------------------------------------------------------------ the training CLI on tiny runs
# A one-epoch digits run of a tiny network: what the work-directory and reliability tests train.
TINY_TRAIN_ARGS = ["--epochs", "1", "--buffer-size", "100", "--sgld-steps", "1", "--width", "4", "--batch-size",
                   "256", "--precision", "float32", "--verbose", "0"]
CLI_ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}


def cli_error_line(result):
    """The one error line a failing command prints (TensorFlow's start-up chatter is filtered out)."""
    lines = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(lines) == 1, result.stderr[-2000:]
    return lines[0]


def leftovers(directory):
    """Temporary files and directories anywhere below ``directory`` (of an interrupted write or --overwrite)."""
    return [os.path.join(root, name) for root, dirs, files in os.walk(directory) for name in files + dirs
            if ".tmp" in name or name.startswith(".overwrite")]


def file_snapshot(directory):
    """{relative path: sha256} of every file below ``directory`` (links: their target's name)."""
    out = {}
    for root, dirs, files in os.walk(directory):
        for name in files + [d for d in dirs if os.path.islink(os.path.join(root, d))]:
            path = os.path.join(root, name)
            out[os.path.relpath(path, directory)] = (
                "link:" + os.readlink(path) if os.path.islink(path)
                else hashlib.sha256(open(path, "rb").read()).hexdigest())
    return out


@pytest.fixture(scope="session")
def finished_run(tmp_path_factory):
    """A finished tiny training run; tests copy it before touching it."""
    from jem_tf import train

    workdir = str(tmp_path_factory.mktemp("finished") / "run")
    assert train.main(TINY_TRAIN_ARGS + ["--workdir", workdir]) == 0
    return workdir


@pytest.fixture
def run_copy(finished_run, tmp_path):
    """A copy of :func:`finished_run` that a test may change."""
    import shutil

    copy = str(tmp_path / "run")
    shutil.copytree(finished_run, copy)
    return copy

