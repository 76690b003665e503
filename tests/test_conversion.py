"""A trained classifier becomes a JEM: weights copied exactly, softmax heads give their logits, and what is
not an image classifier of the data's shape and classes is refused with a message naming the problem."""

import warnings

import keras
import numpy as np
import pytest

from jem_tf import JEM, SGLDSampler
from jem_tf.model.conversion import check_classifier, check_logits, logits_network, mean_energy, softmax_head


def users_cnn(head=None, input_shape=(8, 8, 1), num_classes=3, name=None):
    """A Sequential CNN as users write it; ``head``: None (logits), "softmax" (Dense activation), "layer"
    (a Softmax layer), "activation" (an Activation layer) or "log_softmax"."""
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


def functional_cnn(head="softmax"):
    inputs = keras.Input((8, 8, 1))
    x = keras.layers.Flatten()(inputs)
    x = keras.layers.Dense(6, activation="relu")(x)
    outputs = keras.layers.Dense(3, activation=head)(x)
    model = keras.Model(inputs, outputs)
    rng = np.random.default_rng(1)
    model.set_weights([rng.normal(0, 0.5, w.shape).astype("float32") for w in model.get_weights()])
    return model


IMAGES = np.random.default_rng(2).uniform(-1, 1, (16, 8, 8, 1)).astype("float32")


def test_mean_energy_is_the_mean_negative_logsumexp_in_inference_mode():
    network, _ = logits_network(users_cnn())
    logits = network.predict(IMAGES, verbose=0).astype(np.float64)
    expected = float(np.mean(-np.log(np.exp(logits).sum(axis=1))))
    assert mean_energy(network, IMAGES, batch_size=5) == pytest.approx(expected, rel=1e-5)
    assert mean_energy(network, IMAGES, max_images=4) == pytest.approx(
        float(np.mean(-np.log(np.exp(logits[:4]).sum(axis=1)))), rel=1e-5)
    with pytest.raises(ValueError, match="max_images"):
        mean_energy(network, IMAGES, max_images=0)
    with pytest.raises(ValueError, match="empty"):
        mean_energy(network, IMAGES[:0])


@pytest.mark.integration
def test_weights_are_copied_exactly_and_nothing_is_shared():
    classifier = users_cnn()
    before = [w.copy() for w in classifier.get_weights()]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a logits classifier needs no change: no warning
        jem = JEM.from_classifier(classifier, buffer_size=16, sampler=SGLDSampler(n_steps=1))
    for a, b in zip(jem.backbone.get_weights(), before):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(jem.predict(IMAGES, verbose=0), classifier.predict(IMAGES, verbose=0))
    jem.compile(optimizer=keras.optimizers.Adam(1e-2))
    jem.fit(IMAGES, np.arange(16) % 3, batch_size=8, epochs=1, verbose=0)
    assert any(not np.array_equal(a, b) for a, b in zip(jem.backbone.get_weights(), before))
    for a, b in zip(classifier.get_weights(), before):  # the user's classifier is untouched
        np.testing.assert_array_equal(a, b)


@pytest.mark.integration
@pytest.mark.parametrize("head", ["softmax", "layer", "activation", "log_softmax", "functional"])
def test_a_softmax_head_gives_logits_equal_to_log_probabilities_up_to_a_row_constant(head):
    classifier = functional_cnn() if head == "functional" else users_cnn(head)
    with pytest.warns(UserWarning, match="took the logits"):
        jem = JEM.from_classifier(classifier, buffer_size=16)
    assert softmax_head(jem.backbone) is None
    logits = jem.predict(IMAGES, verbose=0).astype("float64")
    outputs = classifier.predict(IMAGES, verbose=0).astype("float64")
    log_probs = outputs if head == "log_softmax" else np.log(outputs)
    offset = logits - log_probs
    np.testing.assert_allclose(offset, offset[:, :1] * np.ones_like(offset), atol=1e-4)  # a constant per row
    np.testing.assert_array_equal(logits.argmax(1), outputs.argmax(1))
    probs = np.exp(logits - logits.max(1, keepdims=True))
    np.testing.assert_allclose(probs / probs.sum(1, keepdims=True), np.exp(log_probs), atol=1e-5)
    # log p(x) is no longer the same for every input (it was 0 on log-probabilities).
    assert np.std(jem.log_px(IMAGES)) > 1e-3
    assert len(jem.backbone.layers) == len(classifier.layers) - (head in ("layer", "activation"))


def _hostile_head(kind):
    """Classifiers whose output is not plainly a last layer's logits (each seen passing as logits before)."""
    inputs = keras.Input((8, 8, 1), dtype="uint8" if kind == "uint8_input" else "float32")
    x = keras.layers.Flatten()(keras.layers.Rescaling(1 / 255)(inputs) if kind == "uint8_input" else inputs)
    h = keras.layers.Dense(6, activation="relu")(x)
    if kind == "residual_logits":
        return keras.Model(inputs, keras.layers.Dense(3)(h + keras.layers.Dense(6)(h)))
    if kind == "ops_softmax":
        return keras.Model(inputs, keras.ops.softmax(keras.layers.Dense(3)(h + keras.layers.Dense(6)(h))))
    if kind == "nested_softmax":
        nested = keras.Sequential([keras.Input((6,)), keras.layers.Dense(3, activation="softmax")])
        return keras.Model(inputs, nested(h))
    if kind == "dict_output":
        return keras.Model(inputs, {"class": keras.layers.Dense(3)(h)})
    tails = {"softmax_dropout": [keras.layers.Dense(3, activation="softmax"), keras.layers.Dropout(0.2)],
             "softmax_rescaling": [keras.layers.Dense(3, activation="softmax"), keras.layers.Rescaling(1.0)],
             "softmax_reshape": [keras.layers.Dense(3, activation="softmax"), keras.layers.Reshape((3,))],
             "softmax_layer_dropout": [keras.layers.Dense(3), keras.layers.Softmax(), keras.layers.Dropout(0.1)],
             "relu_layer": [keras.layers.Dense(3), keras.layers.ReLU()],
             "scaled_softmax": [keras.layers.Dense(3, activation="softmax"), keras.layers.Rescaling(2.0)],
             "uint8_input": [keras.layers.Dense(3)]}[kind]
    return keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Flatten(), keras.layers.Dense(6, activation="relu"),
                             *tails]) if kind != "uint8_input" else keras.Model(inputs, tails[0](h))


@pytest.mark.integration
@pytest.mark.parametrize("kind", ["softmax_dropout", "softmax_rescaling", "softmax_reshape", "softmax_layer_dropout",
                                  "ops_softmax", "residual_logits"])
def test_heads_behind_pass_through_layers_and_raw_ops_give_their_logits(kind):
    classifier = _hostile_head(kind)
    network, changes = logits_network(classifier)
    assert softmax_head(network) is None
    logits = network.predict(IMAGES, verbose=0).astype("float64")
    outputs = classifier.predict(IMAGES, verbose=0).astype("float64")
    if kind == "residual_logits":
        assert changes == []
        np.testing.assert_allclose(logits, outputs, rtol=1e-5)
        return
    assert any("softmax" in change for change in changes), changes
    offset = logits - np.log(outputs)
    np.testing.assert_allclose(offset, offset[:, :1] * np.ones_like(offset), atol=1e-4)  # logits up to a row constant
    assert np.std(-np.log(np.exp(logits).sum(1))) > 1e-3  # energies that vary: not probabilities
    for a, b in zip(network.get_weights(), classifier.get_weights()):
        np.testing.assert_array_equal(a, b)


def test_a_softmax_inside_a_nested_model_is_found_and_refused():
    with pytest.raises(ValueError, match="inside the nested model"):
        logits_network(_hostile_head("nested_softmax"))
    with pytest.raises(ValueError, match="ends in a softmax"):
        JEM(_hostile_head("softmax_dropout"), buffer_size=16)


def test_outputs_that_are_probabilities_are_refused_whatever_the_layers_say():
    hidden = SubclassedLogits(softmax=True)
    hidden(IMAGES[:1])
    with pytest.raises(ValueError, match="are probabilities"):
        check_logits(hidden, IMAGES)
    log_probs = keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Flatten(), keras.layers.Dense(3),
                                  keras.layers.Lambda(lambda z: keras.ops.log_softmax(z))])
    with pytest.raises(ValueError, match="are log-probabilities"):
        check_logits(log_probs, IMAGES)
    check_logits(logits_network(users_cnn("softmax"))[0], IMAGES)  # logits pass


def test_a_mixed_precision_classifier_becomes_float32_with_the_same_weights():
    classifier = users_cnn()
    policy = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_bfloat16")
    try:
        mixed = keras.models.clone_model(classifier)
    finally:
        keras.config.set_dtype_policy(policy)
    mixed.set_weights(classifier.get_weights())
    network, _ = logits_network(mixed)
    assert {layer.dtype_policy.name for layer in network.layers} == {"float32"}
    for a, b in zip(network.get_weights(), classifier.get_weights()):
        np.testing.assert_array_equal(a, b)


class SubclassedLogits(keras.Model):
    def __init__(self, softmax=False):
        super().__init__()
        self.dense = keras.layers.Dense(3, activation="softmax" if softmax else None)

    def call(self, x):
        return self.dense(keras.ops.reshape(x, (-1, 64)))


def test_subclassed_classifiers_are_used_as_they_are_or_refused_with_a_softmax():
    model = SubclassedLogits()
    with pytest.warns(UserWarning, match="trains this model object itself"):
        jem = JEM.from_classifier(model, image_shape=(8, 8, 1), num_classes=3, buffer_size=16)
    assert jem.backbone is model
    with pytest.raises(ValueError, match="subclassed model whose head cannot be edited"):
        JEM.from_classifier(SubclassedLogits(softmax=True), image_shape=(8, 8, 1), num_classes=3)
    with pytest.raises(ValueError, match="no static input shape"):
        JEM.from_classifier(SubclassedLogits())


def _two_outputs():
    inputs = keras.Input((8, 8, 1))
    x = keras.layers.Flatten()(inputs)
    return keras.Model(inputs, [keras.layers.Dense(3)(x), keras.layers.Dense(2)(x)])


def _segmenter():
    inputs = keras.Input((8, 8, 1))
    return keras.Model(inputs, keras.layers.Conv2D(3, 1)(inputs))


@pytest.mark.parametrize("make, kwargs, message", [
    (lambda: users_cnn(), {"image_shape": (28, 28, 1)},
     r"takes images of shape \(8, 8, 1\), but the data's images have shape \(28, 28, 1\)"),
    (lambda: users_cnn(), {"num_classes": 10}, "has 3 classes, but the data has 10"),
    (lambda: users_cnn(num_classes=1), {}, r"is not a classifier: its output has shape \(None, 1\)"),
    (_segmenter, {}, r"is not a classifier: its output has shape \(None, 8, 8, 3\)"),
    (_two_outputs, {}, "is not a classifier: it has 2 outputs"),
    (lambda: functional_cnn("sigmoid"), {}, "has activation='sigmoid'"),
    (lambda: _hostile_head("relu_layer"), {}, "is a ReLU: a JEM needs logits"),
    (lambda: _hostile_head("scaled_softmax"), {}, "a Rescaling that changes its values"),
    (lambda: _hostile_head("dict_output"), {}, "its output is a dict"),
    (lambda: _hostile_head("uint8_input"), {}, "takes uint8 images"),
    (lambda: users_cnn(input_shape=(None, None, 1)), {}, "not an image classifier with a static input shape"),
    (lambda: "model.keras", {}, "must be a keras.Model; received str"),
])
def test_what_is_not_a_classifier_of_the_data_is_refused(make, kwargs, message):
    with pytest.raises(ValueError, match=message):
        check_classifier(make(), **kwargs)
    with pytest.raises(ValueError, match=message):
        JEM.from_classifier(make(), buffer_size=16, **kwargs)


# ------------------------------------------------------------------------------------- the CLI: --init-from
import hashlib  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

from conftest import file_snapshot  # noqa: E402

from jem_tf import train  # noqa: E402
from jem_tf.run.model_files import load_classifier  # noqa: E402
from jem_tf.run.splits import load_run_dataset, run_splits  # noqa: E402
from jem_tf.run.workdir import RunLayout, load_run_config  # noqa: E402

CLASSIFIER = ["--epochs", "2", "--buffer-size", "100", "--width", "4", "--batch-size", "256", "--precision", "float32",
              "--px-weight", "0", "--pxy-weight", "0", "--energy-l2-weight", "0", "--verbose", "0"]
CONVERT = ["--recipe", "digits_finetune", "--epochs", "2", "--buffer-size", "100", "--sgld-steps", "1",
           "--batch-size", "256", "--precision", "float32", "--num-sample-images", "4", "--verbose", "0"]
ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}


@pytest.fixture(scope="module")
def classifier_run(tmp_path_factory):
    """A tiny digits classifier trained with the CLI (energy terms off), as the conversion issue describes."""
    workdir = str(tmp_path_factory.mktemp("classifier") / "run")
    assert train.main(CLASSIFIER + ["--workdir", workdir]) == 0
    return workdir


def _sha256(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


@pytest.mark.integration
def test_load_classifier_copies_a_runs_weights_exactly(classifier_run):
    source = load_classifier(classifier_run, image_shape=(8, 8, 1), num_classes=10)
    saved = keras.models.load_model(RunLayout(classifier_run).model)
    assert source.kind == "jem-tf model" and source.changes == ()
    assert source.sha256 == _sha256(RunLayout(classifier_run).model)
    for a, b in zip(source.network.get_weights(), saved.backbone.get_weights()):
        np.testing.assert_array_equal(a, b)


@pytest.mark.integration
def test_cli_converts_a_trained_run(classifier_run, tmp_path, capsys):
    workdir = str(tmp_path / "converted")
    assert train.main(CONVERT + ["--init-from", classifier_run, "--workdir", workdir,
                                 "--energy-l2-weight", "0.01"]) == 0
    assert "test_accuracy=" in capsys.readouterr().out
    digest = _sha256(RunLayout(classifier_run).model)
    config = json.load(open(RunLayout(workdir).config))
    assert config["init_from"] == classifier_run and config["init_from_sha256"] == digest and config["finetune"]
    # The energy L2 term is centred on the classifier's mean energy on the run's training images (recorded).
    run_config = load_run_config(workdir)
    splits = run_splits(run_config, load_run_dataset(config=run_config))
    source = load_classifier(classifier_run, image_shape=(8, 8, 1), num_classes=10)
    assert config["energy_l2_center"] == pytest.approx(mean_energy(source.network, splits.train.images), rel=1e-5)
    metrics = json.load(open(RunLayout(workdir).metrics))
    assert metrics["init_from"] == {"path": os.path.abspath(RunLayout(classifier_run).model), "sha256": digest,
                                    "kind": "jem-tf model", "changes": []}
    assert metrics["steps"] == 2 * 6 and np.isfinite(metrics["buffer_energy_mean"])  # 1,293 images / 256
    model = keras.models.load_model(RunLayout(workdir).model)
    assert isinstance(model, JEM) and model.chain_init is not None and model.samples_contrastive
    assert model.energy_l2_center == config["energy_l2_center"]


@pytest.mark.integration
def test_cli_converts_a_users_keras_classifier_with_a_softmax_head(tmp_path):
    path = str(tmp_path / "mine.keras")
    users_cnn("softmax", num_classes=10).save(path)
    workdir = str(tmp_path / "converted")
    assert train.main(CONVERT + ["--init-from", path, "--workdir", workdir, "--epochs", "1"]) == 0
    record = json.load(open(RunLayout(workdir).metrics))["init_from"]
    assert record["kind"] == "keras classifier" and record["sha256"] == _sha256(path)
    assert "took the logits of the softmax head: layer 'dense" in record["changes"][0]


def _bad_sources(tmp_path, classifier_run):
    garbage = tmp_path / "garbage.keras"
    garbage.write_bytes(b"not a zip archive")
    empty = tmp_path / "empty_dir"
    empty.mkdir()
    shapes = {}
    for name, model in [("fashion", users_cnn(input_shape=(28, 28, 1), num_classes=10)),
                        ("five", users_cnn(num_classes=5)), ("segmenter", _segmenter())]:
        shapes[name] = str(tmp_path / f"{name}.keras")
        model.save(shapes[name])
    loop = tmp_path / "loop.keras"
    os.symlink(loop, loop)
    return [
        ([], "init_from must be the trained classifier this fine-tuning recipe converts"),
        (["--init-from", str(loop)], "is a symbolic link that leads nowhere (a loop, or a missing target)"),
        (["--init-from", str(tmp_path / "nope")], f"--init-from {str(tmp_path / 'nope')!r} does not exist"),
        (["--init-from", str(empty)], "is a directory without a trained model"),
        (["--init-from", str(garbage)], "is not a .keras archive (truncated or corrupt: not a zip file)"),
        (["--init-from", shapes["fashion"]], r"takes images of shape (28, 28, 1), but the data's images have shape "
                                             "(8, 8, 1)"),
        (["--init-from", shapes["five"]], "has 5 classes, but the data has 10"),
        (["--init-from", shapes["segmenter"]], "is not a classifier: its output has shape (None, 8, 8, 3)"),
        (["--init-from", classifier_run, "--init-from-sha256", "0" * 64],
         "not the 0000000000000000000000000000000000000000000000000000000000000000 of init_from_sha256"),
        (["--init-from", classifier_run, "--init-from-sha256", "abc"], "init_from_sha256 must be none, or the 64"),
    ]


@pytest.mark.parametrize("index", range(10))
def test_bad_sources_are_one_line_errors_before_anything_is_written(index, classifier_run, tmp_path, capsys):
    argv, message = _bad_sources(tmp_path, classifier_run)[index]
    workdir = tmp_path / "converted"
    try:
        code = train.main(CONVERT + argv + ["--workdir", str(workdir)])
    except SystemExit as exit_:  # argparse-level errors
        code = exit_.code
    assert code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(errors) == 1 and message in errors[0], errors
    assert not workdir.exists()


def test_a_source_among_the_run_files_that_overwrite_clears_is_refused(classifier_run, tmp_path, capsys):
    run = str(tmp_path / "run")
    shutil.copytree(classifier_run, run)
    checkpoint = sorted(os.listdir(RunLayout(run).checkpoints))[-1]
    linked = tmp_path / "linked"
    os.symlink(run, linked)
    before = file_snapshot(run)
    for source in [run, RunLayout(run).model, os.path.join(RunLayout(run).checkpoints, checkpoint),
                   str(linked / "model.keras")]:
        assert train.main(CONVERT + ["--init-from", source, "--workdir", run, "--overwrite"]) == 2
        errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
        assert len(errors) == 1 and "lies inside the run files of --workdir" in errors[0], errors
        assert file_snapshot(run) == before  # the source and everything else untouched


def test_archives_that_inflate_beyond_their_bounds_are_refused_before_loading(tmp_path, monkeypatch):
    import zipfile

    from jem_tf.errors import UsageError
    from jem_tf.run import model_files

    def archive(name, members):
        path = str(tmp_path / name)
        with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as z:
            for member, size in members.items():
                z.writestr(member, b" " * size)
        return path

    monkeypatch.setattr(model_files, "ARCHIVE_JSON_MAX_BYTES", 1 << 20)
    config_bomb = archive("config_bomb.keras", {"metadata.json": 10, "config.json": 3 << 20})
    with pytest.raises(UsageError, match="member 'config.json' inflates to 3,145,728 bytes"):
        model_files.load_classifier(config_bomb, image_shape=(8, 8, 1), num_classes=10)
    with pytest.raises(UsageError, match="config_bomb.keras"):
        model_files.load_trained_model(config_bomb)
    monkeypatch.setattr(model_files, "ARCHIVE_MIN_TOTAL_BYTES", 1 << 20)
    weights_bomb = archive("weights_bomb.keras", {"config.json": 10, "model.weights.h5": 8 << 20})
    with pytest.raises(UsageError, match="inflates to 8,388,618 bytes from a file of"):
        model_files.load_classifier(weights_bomb, image_shape=(8, 8, 1), num_classes=10)
    # A real model's archive is within the bounds.
    path = str(tmp_path / "real.keras")
    users_cnn(num_classes=10).save(path)
    model_files.check_keras_archive(path)


KILL_DURING_FINAL_SAVE = """
import os, signal, sys
import jem_tf.training.pipeline as training

def save_then_die(model, path):
    os.kill(os.getpid(), signal.SIGKILL)

training.save_model_atomically = save_then_die
from jem_tf.train import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_an_interrupted_conversion_resumes_and_refuses_a_changed_source(classifier_run, tmp_path):
    source = str(tmp_path / "source")
    import shutil

    shutil.copytree(classifier_run, source)
    workdir = str(tmp_path / "converted")
    argv = CONVERT + ["--init-from", source, "--workdir", workdir]
    killed = subprocess.run([sys.executable, "-c", KILL_DURING_FINAL_SAVE, *argv], capture_output=True, text=True,
                            timeout=600, env=ENV)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert os.path.isdir(RunLayout(workdir).backup) and not os.path.exists(RunLayout(workdir).model)

    # The source changed since the run started: its backup is not resumed with another classifier.
    original = open(RunLayout(source).model, "rb").read()
    users_cnn(num_classes=10).save(RunLayout(source).model)
    changed = subprocess.run([sys.executable, "-m", "jem_tf.train", *argv], capture_output=True, text=True,
                             timeout=600, env=ENV)
    assert changed.returncode == 2 and "init_from_sha256: '" in changed.stderr, changed.stderr[-2000:]

    open(RunLayout(source).model, "wb").write(original)
    resumed = subprocess.run([sys.executable, "-m", "jem_tf.train", *argv], capture_output=True, text=True,
                             timeout=600, env=ENV)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "Resuming from the backup" in resumed.stdout and "2 epoch(s) done" in resumed.stdout
    metrics = json.load(open(RunLayout(workdir).metrics))
    assert metrics["resumed_from_epoch"] == 2 and metrics["init_from"]["sha256"] == _sha256(RunLayout(source).model)
