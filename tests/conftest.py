"""What several test files share: the session's set-up, the time limit of the default tier, the fixtures of a
tiny trained model, run or export (each trained once per test run) and the helpers more than one file uses.
jem_tf, Keras and TensorFlow are imported inside the functions: this file is imported before the logical CPU
devices are split."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import gc  # noqa: E402
import hashlib  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

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
    config._jem_test_seconds = default_tier_seconds(os.environ)


# ------------------------------------------------------------------ the default tier's time limit
# A test of the default tier (neither `integration` nor `slow`) fails when its call took more than the limit in
# wall time *and* in this process's CPU time: a test that only waited for a busy machine keeps passing. Time the
# garbage collector spent during the call is left out of both: it collects what earlier tests left behind (up
# to 0.65 s in one call of a full run), so it is not the test's own cost.
TEST_SECONDS_VARIABLE = "JEM_TF_TEST_SECONDS"
DEFAULT_TEST_SECONDS = 2.0


def default_tier_seconds(environ):
    """The limit in seconds: ``$JEM_TF_TEST_SECONDS`` (0 turns the check off), else 2."""
    text = environ.get(TEST_SECONDS_VARIABLE, "").strip()
    if not text:
        return DEFAULT_TEST_SECONDS
    try:
        seconds = float(text)
    except ValueError:
        seconds = -1.0
    if not seconds >= 0 or seconds == float("inf"):
        raise pytest.UsageError(f"{TEST_SECONDS_VARIABLE} must be a number of seconds >= 0 (0: no limit); "
                                f"received {text!r}")
    return seconds


def too_slow_message(nodeid, marks, wall_seconds, cpu_seconds, limit, gc_seconds=0.0):
    """Why a test of the default tier fails for its time, or None (marked, within the limit, or no limit).

    ``gc_seconds``: the garbage collector's time during the call, taken out of both times first."""
    if not limit or {"integration", "slow"} & set(marks):
        return None
    wall_seconds, cpu_seconds = wall_seconds - gc_seconds, cpu_seconds - gc_seconds
    if wall_seconds <= limit or cpu_seconds <= limit:
        return None
    return (f"{nodeid} took {wall_seconds:.2f} s of wall time and {cpu_seconds:.2f} s of CPU time (garbage "
            f"collection left out), more than the default tier's {limit:g} s ({TEST_SECONDS_VARIABLE}): make it "
            "faster or mark it @pytest.mark.integration")


class CollectionClock:
    """A ``gc.callbacks`` entry: ``seconds`` is the garbage collector's run time while it is registered."""

    def __init__(self):
        self.seconds = 0.0
        self._began = None

    def __call__(self, phase, info):
        if phase == "start":
            self._began = time.perf_counter()
        elif self._began is not None:
            self.seconds += time.perf_counter() - self._began
            self._began = None


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    clock = CollectionClock()
    gc.callbacks.append(clock)
    wall, cpu = time.perf_counter(), time.process_time()
    try:
        result = yield  # a failing test raises here and keeps its own failure
    finally:
        gc.callbacks.remove(clock)
    message = too_slow_message(item.nodeid, [mark.name for mark in item.iter_markers()],
                               time.perf_counter() - wall, time.process_time() - cpu,
                               item.config._jem_test_seconds, gc_seconds=clock.seconds)
    if message:
        pytest.fail(message, pytrace=False)
    return result


# ------------------------------------------------------------------ tiny data and models
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


@pytest.fixture(scope="session")
def data():
    """96 separable 8x8x1 images of 3 classes and their labels (the XLA tests' data)."""
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 96).astype("int32")
    x = np.clip(rng.uniform(-1, 1, (96, 8, 8, 1)) * 0.3 + (y[:, None, None, None] - 1) * 0.6, -1, 1)
    return x.astype("float32"), y


# SGLD chains from the same images and weights, with XLA and without (tests/test_jem.py, tests/test_sgld.py).
CHAIN_TOLERANCE = dict(rtol=0.0, atol=1e-3)


def tiny_jem(num_classes=3, seed=0, **kwargs):
    import keras

    from jem_tf import JEM, SGLDSampler, small_cnn

    backbone = small_cnn(num_classes=num_classes, input_shape=(8, 8, 1), width=4, stages=1, seed=seed)
    kwargs.setdefault("sampler", SGLDSampler(n_steps=3))
    kwargs.setdefault("buffer_size", 64)
    model = JEM(backbone, seed=seed, **kwargs)
    model.compile(optimizer=keras.optimizers.Adam(1e-3))
    return model


@pytest.fixture(scope="session")
def evaluation_jem(tmp_path_factory):
    """A tiny JEM trained on separable 8x8 data, its held-out data, and its .keras file."""
    x, y = separable_data(240)
    import keras

    model = tiny_jem()
    keras.utils.set_random_seed(0)  # Keras's shuffle: the same model whichever tests ran before
    model.fit(x[:160], y[:160], batch_size=32, epochs=3, verbose=0)
    path = str(tmp_path_factory.mktemp("model") / "tiny.keras")
    model.save(path)
    return model, (x[:160], y[:160]), (x[160:200], y[160:200]), (x[200:], y[200:]), path


@pytest.fixture(scope="session")
def refinement_jem():
    """A tiny JEM trained on separable 8x8 data, with validation and test splits."""
    x, y = separable_data(200)
    import keras

    model = tiny_jem()
    # Keras shuffles with the global generator: seeded, the same model whichever tests ran before.
    keras.utils.set_random_seed(0)
    model.fit(x[:120], y[:120], batch_size=32, epochs=3, verbose=0)
    return model, (x[120:160], y[120:160]), (x[160:], y[160:])


def users_classifier(activation=None, input_shape=(8, 8, 1)):
    """A plain Sequential CNN as a user would write it."""
    import keras

    return keras.Sequential([
        keras.Input(input_shape),
        keras.layers.Conv2D(8, 3, padding="same", activation="relu"),
        keras.layers.GlobalAveragePooling2D(),
        keras.layers.Dense(3, activation=activation),
    ])


def two_small_cnns():
    """Two different tiny logits networks for 8x8x1 images of 3 classes: a JEM's and its source classifier's."""
    from jem_tf import small_cnn

    return tuple(small_cnn(num_classes=3, input_shape=(8, 8, 1), width=4, stages=1, seed=seed) for seed in (0, 1))


def functional_cnn(head="softmax"):
    """A small Functional classifier on 8x8x1 images, 3 classes, fixed random weights; ``head``: its last Dense
    layer's activation."""
    import keras

    inputs = keras.Input((8, 8, 1))
    x = keras.layers.Flatten()(inputs)
    x = keras.layers.Dense(6, activation="relu")(x)
    outputs = keras.layers.Dense(3, activation=head)(x)
    model = keras.Model(inputs, outputs)
    rng = np.random.default_rng(1)
    model.set_weights([rng.normal(0, 0.5, w.shape).astype("float32") for w in model.get_weights()])
    return model


def images_8x8(n=16, seed=2):
    """``n`` uniform [-1, 1] images of 8x8x1 (float32)."""
    return np.random.default_rng(seed).uniform(-1, 1, (n, 8, 8, 1)).astype("float32")


def users_cnn(head=None, input_shape=(8, 8, 1), num_classes=3, name=None):
    """A Sequential CNN as users write it; ``head``: None (logits), "softmax" (Dense activation), "layer"
    (a Softmax layer), "activation" (an Activation layer) or "log_softmax"."""
    import keras

    layers = [keras.Input(input_shape), keras.layers.Conv2D(4, 3, padding="same", activation="relu"),
              keras.layers.GlobalAveragePooling2D(),
              keras.layers.Dense(num_classes, activation=head if head in ("softmax", "log_softmax") else None)]
    if head == "layer":
        layers.append(keras.layers.Softmax())
    if head == "activation":
        layers.append(keras.layers.Activation("softmax"))
    model = keras.Sequential(layers, name=name)
    # Not the initial weights: a "trained" classifier with non-zero biases.
    rng = np.random.default_rng(0)
    model.set_weights([rng.normal(0, 0.5, w.shape).astype("float32") for w in model.get_weights()])
    return model


def _segmenter():
    """A network whose output is an image, not class scores (its name is part of a test's id)."""
    import keras

    inputs = keras.Input((8, 8, 1))
    return keras.Model(inputs, keras.layers.Conv2D(3, 1)(inputs))


def gaussian_backbone(dim=16):
    """One class whose logit is -|x|^2 / 2: log p(x) is the standard Gaussian log-density up to a constant,
    and the penultimate features are the pixels themselves."""
    import keras

    inputs = keras.Input((4, 4, 1))
    flat = keras.layers.Flatten()(inputs)
    logit = keras.layers.Lambda(lambda t: -0.5 * keras.ops.sum(keras.ops.square(t), axis=1, keepdims=True))(flat)
    return keras.Model(inputs, logit)


@pytest.fixture(scope="session")
def scorer():
    """An OOD scorer of :func:`gaussian_backbone` with temperature 2."""
    from jem_tf.ood import OODScorer

    return OODScorer(gaussian_backbone(), value_range=(-4.0, 4.0), temperature=2.0)


# ------------------------------------------------------------------ the training CLI on tiny runs
# A one-epoch digits run of a tiny network: what the work-directory and reliability tests train.
TINY_TRAIN_ARGS = ["--epochs", "1", "--buffer-size", "100", "--sgld-steps", "1", "--width", "4", "--batch-size",
                   "256", "--precision", "float32", "--verbose", "0"]
CLI_ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
COMMANDS = ("train", "evaluate", "export", "tune")


def run_command(*argv, timeout=600, cwd=None):
    """``python -m jem_tf.COMMAND ARGV...`` as a subprocess, its output captured: COMMAND is the first argument when
    it names a command (train, evaluate, export, tune), else train."""
    command = "train"
    if argv and argv[0] in COMMANDS:
        command, argv = argv[0], argv[1:]
    return subprocess.run([sys.executable, "-m", f"jem_tf.{command}", *argv], capture_output=True, text=True,
                          timeout=timeout, env=CLI_ENV, cwd=cwd)


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


def sha256(path):
    """The SHA-256 hex digest of the file at ``path``."""
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


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


CLASSIFIER = ["--epochs", "2", "--buffer-size", "100", "--width", "4", "--batch-size", "256", "--precision", "float32",
              "--px-weight", "0", "--pxy-weight", "0", "--energy-l2-weight", "0", "--verbose", "0"]


@pytest.fixture(scope="session")
def classifier_run(tmp_path_factory):
    """A tiny digits classifier trained with the CLI (energy terms off), as the conversion issue describes."""
    from jem_tf import train

    workdir = str(tmp_path_factory.mktemp("classifier") / "run")
    assert train.main(CLASSIFIER + ["--workdir", workdir]) == 0
    return workdir


# ------------------------------------------------------------------ a full disk
def mount_tmpfs(path, size):
    os.makedirs(path, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip("needs to mount a tmpfs (root in a machine that allows it)")


def fill(path):
    """Writes ``path`` until its file system is full (unbuffered: nothing is left to flush on close)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT)
    try:
        for size in (1 << 20, 4096, 1):
            try:
                while True:
                    os.write(fd, bytes(size))
            except OSError:
                pass
    finally:
        os.close(fd)


def umount(path):
    subprocess.run(["umount", "-l", str(path)], capture_output=True)


# ------------------------------------------------------------------ image folders
CLASSES = ("cat", "ant", "Bee")  # sorted: Bee, ant, cat (Keras sorts the folder names as strings)


def write_image(path, array, fmt=None):
    from PIL import Image

    os.makedirs(os.path.dirname(path), exist_ok=True)
    mode = {1: "L", 3: "RGB", 4: "RGBA"}[array.shape[-1]] if array.ndim == 3 else "L"
    Image.fromarray(array.squeeze(-1) if array.ndim == 3 and array.shape[-1] == 1 else array, mode=mode).save(
        path, format=fmt)


def make_folder(root, *, per_class=(4, 2), size=(8, 8), channels=3, classes=CLASSES, ext=".png", seed=0):
    """A generated image folder: ``per_class`` = (train, test) images of each class, a per-class colour plus noise."""
    rng = np.random.default_rng(seed)
    for split, count in zip(("train", "test"), per_class):
        for c, name in enumerate(classes):
            for i in range(count):
                base = np.full((*size, channels), 40 + 80 * c, np.uint8)
                array = np.clip(base + rng.integers(0, 30, base.shape), 0, 255).astype(np.uint8)
                write_image(os.path.join(root, split, name, f"{i:03d}{ext}"), array)
    return str(root)


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    path = tmp_path / "cache"
    monkeypatch.setenv("XDG_CACHE_HOME", str(path))
    return path


def cache_files(cache_dir):
    return [f for _, _, files in os.walk(cache_dir) for f in files]


def hostile_folder(tmp_path, kind):
    """An image folder with one problem of ``kind`` (one of :data:`HOSTILE`), and the message it gets."""
    root = make_folder(tmp_path / kind)
    if kind == "no_train":
        os.rename(os.path.join(root, "train"), os.path.join(root, "training"))
        return root, r"/train' does not exist: an image folder holds train/<class>/"
    if kind == "no_test":
        os.rename(os.path.join(root, "test"), os.path.join(root, "tests"))
        return root, r"/test' does not exist"
    if kind == "empty_class":
        os.makedirs(os.path.join(root, "train", "dog"))
        return root, r"train/dog' holds no image files"
    if kind == "unknown_test_class":
        write_image(os.path.join(root, "test", "dog", "0.png"), np.zeros((8, 8, 3), np.uint8))
        return root, r"test/dog' is a class that train/ does not have"
    if kind == "not_an_image":
        open(os.path.join(root, "train", "ant", "fake.jpg"), "w").write("hello, not a JPEG")
        return root, r"fake.jpg' is not a readable image"
    if kind == "truncated_jpeg":
        path = os.path.join(root, "train", "ant", "cut.jpg")
        write_image(path, np.random.default_rng(0).integers(0, 255, (8, 8, 3)).astype(np.uint8), "JPEG")
        data = open(path, "rb").read()
        open(path, "wb").write(data[: len(data) // 2])
        return root, r"cut.jpg' is (truncated or corrupt|not a readable image)"
    if kind == "symlink_loop":
        os.symlink(os.path.join(root, "train"), os.path.join(root, "train", "ant", "loop"))
        return root, r"loop' is a symbolic link loop"
    if kind == "self_link":
        path = os.path.join(root, "train", "ant", "self.png")
        os.symlink(path, path)
        return root, r"self.png' is a symbolic link loop"
    if kind == "single_class":
        for name in ("ant", "cat"):
            for split in ("train", "test"):
                for f in os.listdir(os.path.join(root, split, name)):
                    os.remove(os.path.join(root, split, name, f))
                os.rmdir(os.path.join(root, split, name))
        return root, r"train' holds 1 class folder\(s\) \(Bee\); a classifier needs at least 2"
    raise AssertionError(kind)


HOSTILE = ("no_train", "no_test", "empty_class", "unknown_test_class", "not_an_image", "truncated_jpeg",
           "symlink_loop", "self_link", "single_class")


# ------------------------------------------------------------------ exports and serving
SAMPLE_REQUEST = {"num_samples": np.int32(6), "n_steps": np.int32(30), "seed": np.int64(11),
                  "class_label": np.int32(-1), "step_size": np.float32(0.0), "noise_std": np.float32(-1.0)}


@pytest.fixture(scope="session")
def tiny_export(tmp_path_factory):
    """A tiny JEM trained a few steps, its calibration images, and its export (version 1)."""
    from jem_tf.serving import export_saved_model

    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, (96, 8, 8, 1)).astype("float32")
    y = rng.integers(0, 3, 96).astype("int32")
    model = tiny_jem()
    model.fit(x, y, batch_size=32, epochs=2, verbose=0)
    base = str(tmp_path_factory.mktemp("export") / "jem")
    path = export_saved_model(model, base, calibration_images=x, preprocessing="test", dataset="random",
                              max_num_samples=32, max_n_steps=250)
    return model, x, base, path


@pytest.fixture(scope="session")
def loaded(tiny_export):
    """The test export loaded with ``tf.saved_model.load`` (the object API)."""
    import tensorflow as tf

    return tf.saved_model.load(tiny_export[3])


def serving_jem():
    """A tiny untrained JEM to export (3 classes of 8x8x1 images)."""
    import keras

    from jem_tf import JEM, SGLDSampler, small_cnn

    model = JEM(small_cnn(num_classes=3, input_shape=(8, 8, 1), width=4, stages=1), sampler=SGLDSampler(n_steps=1),
                buffer_size=16)
    model.compile(optimizer=keras.optimizers.Adam(1e-3))
    return model


@pytest.fixture(scope="session")
def export(tmp_path_factory):
    """One export (max_batch_size 4) into a directory that holds the temporaries of killed exports."""
    from jem_tf.serving import export_saved_model

    export_dir = tmp_path_factory.mktemp("served")
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # a process that no longer runs
    host = os.uname().nodename
    stale = [f".tmp-3-{gone.pid}", f".tmp-export-{host}-{gone.pid}", f".3.tmp-{host}-{gone.pid}"]  # old names, ours
    kept = [f".3.tmp-{host}-{os.getppid()}", f".tmp-export-{host}-{os.getppid()}",  # live processes'
            f".3.tmp-elsewhere.example-{gone.pid}", f".tmp-export-elsewhere.example-{gone.pid}"]  # another host's
    for name in stale + kept:
        os.makedirs(export_dir / name / "variables")
    path = export_saved_model(serving_jem(), str(export_dir), ood_threshold=0.0, max_batch_size=4)
    return export_dir, path, kept


def ood_scores(model, metadata, images, scorer=None):
    """The exported detector's score recomputed in this process from the metadata (jem_tf.ood)."""
    from jem_tf.ood import OODDetector, OODScorer

    detector = OODDetector.from_dict(metadata["ood"]["detector"])
    scorer = scorer or OODScorer(model.backbone, value_range=model.value_range,
                                 temperature=metadata["ood"]["parameters"]["temperature"])
    return detector.combine(scorer.arrays(images, detector.components))


def signature_defs(path):
    from tensorflow.core.protobuf import saved_model_pb2

    proto = saved_model_pb2.SavedModel()
    proto.ParseFromString(open(os.path.join(path, "saved_model.pb"), "rb").read())
    return proto.meta_graphs[0].signature_def


def run_session(path, signature, feeds):
    """Runs `signature` on numpy `feeds` through the TF1 session loader (TF Serving's C++ path)."""
    import tensorflow as tf

    with tf.Graph().as_default(), tf.compat.v1.Session() as sess:
        meta_graph = tf.compat.v1.saved_model.loader.load(sess, ["serve"], path)
        signature_def = meta_graph.signature_def[signature]
        fetches = {k: t.name for k, t in signature_def.outputs.items()}
        return sess.run(fetches, {signature_def.inputs[k].name: v for k, v in feeds.items()})


def check_against_signature(signature_def, arrays):
    import tensorflow as tf

    assert set(arrays) == set(signature_def.inputs), (set(arrays), set(signature_def.inputs))
    for name, array in arrays.items():
        spec = signature_def.inputs[name]
        assert tf.as_dtype(spec.dtype) == tf.as_dtype(array.dtype), name
        dims = [d.size for d in spec.tensor_shape.dim]
        assert len(dims) == array.ndim and all(d in (-1, a) for d, a in zip(dims, array.shape)), name


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
