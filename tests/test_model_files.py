"""jem_tf.run.model_files: trained models and classifiers read back from runs and .keras files."""

import json
import os

import keras
import numpy as np
import pytest
from conftest import sha256 as _sha256
from conftest import users_cnn

from jem_tf.run.config import TrainConfig
from jem_tf.run.model_files import load_classifier, load_trained_model
from jem_tf.run.workdir import RunLayout, load_run_config


def test_load_trained_model_reads_the_layout_and_names_what_is_wrong(tmp_path):
    from conftest import tiny_jem

    layout = RunLayout(str(tmp_path / "run"))
    os.makedirs(layout.workdir)
    with pytest.raises(ValueError, match="No model at"):
        load_trained_model(layout.workdir)
    tiny_jem().save(layout.model)
    with open(layout.config, "w") as f:
        json.dump(TrainConfig(epochs=3).to_dict(), f)
    model, config = load_trained_model(layout.workdir)
    assert config == TrainConfig(epochs=3) == load_run_config(layout.workdir)
    assert model.num_classes == 3
    model, config = load_trained_model(layout.model)
    assert config is None
    plain = tmp_path / "plain.keras"
    keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)]).save(plain)
    with pytest.raises(ValueError, match="not a jem_tf.JEM"):
        load_trained_model(str(plain))


@pytest.mark.integration
def test_load_classifier_copies_a_runs_weights_exactly(classifier_run):
    source = load_classifier(classifier_run, image_shape=(8, 8, 1), num_classes=10)
    saved = keras.models.load_model(RunLayout(classifier_run).model)
    assert source.kind == "jem-tf model" and source.changes == ()
    assert source.sha256 == _sha256(RunLayout(classifier_run).model)
    for a, b in zip(source.network.get_weights(), saved.backbone.get_weights()):
        np.testing.assert_array_equal(a, b)


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


@pytest.mark.integration
def test_source_classifier_network_reloads_the_classifier_as_it_was(classifier_run, tmp_path):
    from jem_tf.run.model_files import source_classifier_network

    assert source_classifier_network(None, image_shape=(8, 8, 1), num_classes=10) is None
    assert source_classifier_network(TrainConfig(), image_shape=(8, 8, 1), num_classes=10) is None
    digest = _sha256(RunLayout(classifier_run).model)
    config = TrainConfig(init_from=classifier_run, init_from_sha256=digest)
    network = source_classifier_network(config, image_shape=(8, 8, 1), num_classes=10)
    saved = keras.models.load_model(RunLayout(classifier_run).model)
    for a, b in zip(network.get_weights(), saved.backbone.get_weights()):
        np.testing.assert_array_equal(a, b)
    lines = []
    changed = config.replace(init_from_sha256="0" * 64)
    assert source_classifier_network(changed, image_shape=(8, 8, 1), num_classes=10, log=lines.append) is None
    gone = config.replace(init_from=str(tmp_path / "gone"))
    assert source_classifier_network(gone, image_shape=(8, 8, 1), num_classes=10, log=lines.append) is None
    assert len(lines) == 2 and all("source classifier's candidates are left out" in line for line in lines)
    assert "SHA-256" in lines[0] and "gone" in lines[1]
