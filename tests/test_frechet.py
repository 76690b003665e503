"""jem_tf.evaluation.frechet: the feature network of the Frechet distance."""

import keras
import numpy as np

from jem_tf import evaluation as ev


def test_a_plain_keras_classifier_can_be_the_feature_network(tmp_path):
    net = keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Flatten(), keras.layers.Dense(5, name="hidden"),
                            keras.layers.Dense(3)])
    net.save(tmp_path / "clf.keras")
    network = ev.load_feature_network(str(tmp_path / "clf.keras"), image_shape=(8, 8, 1))
    assert network.features(np.zeros((7, 8, 8, 1), np.float32)).shape == (7, 5)
    assert "input of its last layer" in network.description
