"""jem_tf.model.refinement: refinement settings, and a seeded descent on the energy kept in the value range."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import tiny_jem

from jem_tf.model.generation import refinement_fn
from jem_tf.model.refinement import RefinementSettings


@pytest.fixture(scope="module")
def trained(refinement_jem):
    """The tiny trained model these tests share: conftest's ``refinement_jem``, trained once per test run."""
    return refinement_jem


def test_refinement_raises_log_px_on_average_and_stays_in_range(trained):
    model, _, (x_test, _) = trained
    settings = RefinementSettings(n_steps=5, step_size=0.01, noise_std=0.0, grad_clamp=1.0)
    refined = model.refine(x_test, settings=settings, seed=0)
    # A descent on E(x) = -log p(x) (up to log Z): the mean log p(x) never goes down.
    assert model.log_px(refined).mean() >= model.log_px(x_test).mean()
    assert not np.array_equal(refined, x_test)
    # With noise and a large step, images still stay in the value range.
    wild = model.refine(x_test, settings=RefinementSettings(n_steps=5, step_size=1.0, noise_std=0.5), seed=0)
    low, high = model.value_range
    assert wild.min() >= low and wild.max() <= high


def test_refinement_is_seeded(trained):
    model, _, (x_test, _) = trained
    settings = RefinementSettings(n_steps=3, step_size=0.01, noise_std=0.05)
    a = model.refine(x_test[:8], settings=settings, seed=4)
    assert np.array_equal(a, model.refine(x_test[:8], settings=settings, seed=4))
    assert not np.array_equal(a, model.refine(x_test[:8], settings=settings, seed=5))
    # The graph version (used inside attacks) is the same function of (images, seed).
    graph = refinement_fn(model, settings)(tf.constant(x_test[:8]), tf.constant([4, 0], tf.int64)).numpy()
    np.testing.assert_allclose(graph, a, atol=1e-6)


def test_model_uses_its_refinement_by_default_and_round_trips_through_keras(trained, tmp_path):
    model, _, (x_test, _) = trained
    chosen = RefinementSettings(n_steps=4, step_size=0.02, noise_std=0.0, grad_clamp=0.5, source="test")
    clone = tiny_jem(refinement=chosen)
    clone.set_weights(model.get_weights())
    assert clone.refinement_settings is chosen
    assert np.array_equal(clone.refine(x_test[:5], seed=1), model.refine(x_test[:5], settings=chosen, seed=1))
    path = str(tmp_path / "refined.keras")
    clone.save(path)
    loaded = keras.saving.load_model(path)
    assert loaded.refinement == chosen and loaded.refinement.source == "test"
    assert np.array_equal(loaded.refine(x_test[:5], seed=1), clone.refine(x_test[:5], seed=1))
    # Without chosen settings the model falls back to the training sampler's, and says so.
    assert model.refinement is None and "training sampler" in model.refinement_settings.source


@pytest.mark.parametrize("kwargs, name", [({"n_steps": -1}, "n_steps"), ({"step_size": 0.0}, "step_size"),
                                          ({"noise_std": -0.1}, "noise_std"), ({"grad_clamp": 0}, "grad_clamp")])
def test_bad_settings_raise_naming_the_value(kwargs, name):
    with pytest.raises(ValueError, match=name):
        RefinementSettings(**kwargs)
