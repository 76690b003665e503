"""jem_tf.model.generation: the SGLD energy, the start distribution and the Generator behind sample and refine."""

import numpy as np
import pytest
import tensorflow as tf
from conftest import tiny_jem

from jem_tf import SGLDSampler
from jem_tf.model import generation
from jem_tf.model.refinement import RefinementSettings
from jem_tf.sampling.chain_init import start_chains

SEED = tf.constant([3, 0], tf.int64)


def _logsumexp(logits):
    top = logits.max(axis=1, keepdims=True)
    return (top + np.log(np.exp(logits - top).sum(axis=1, keepdims=True)))[:, 0]


def test_sgld_energy_is_the_unconditional_or_the_joint_energy():
    logits = np.array([[1.0, 2.0, -1.0], [0.5, 0.0, 3.0]], np.float32)
    energy = generation.sgld_energy(lambda x: tf.constant(logits))
    x = tf.zeros([2, 4])
    # E(x) = -logsumexp_y f(x)[y];  E(x, y) = -f(x)[y].
    np.testing.assert_allclose(energy(x).numpy(), -_logsumexp(logits), rtol=1e-6)
    np.testing.assert_allclose(energy(x, tf.constant([1, 0])).numpy(), [-2.0, -0.5])


def test_per_row_energy_takes_label_minus_one_as_unconditional():
    logits = np.array([[1.0, 2.0, -1.0], [0.5, 0.0, 3.0], [0.0, 1.0, 0.0]], np.float32)
    per_row = generation.sgld_energy_per_row(lambda x: tf.constant(logits))
    energy = generation.sgld_energy(lambda x: tf.constant(logits))
    x = tf.zeros([3, 4])
    labels = tf.constant([-1, 2, 0])
    expected = [energy(x).numpy()[0], -3.0, -0.0]
    np.testing.assert_allclose(per_row(x, labels).numpy(), expected, rtol=1e-6)


class _GaussianTarget:
    """A model whose energy is ``0.5 * ||x||^2`` (one class, logit ``-0.5 * ||x||^2``): SGLD samples a standard
    normal."""

    image_shape, num_classes, value_range = (2,), 1, (-1.0, 1.0)
    chain_init, class_conditional_buffer, replay_buffer = None, False, None

    def __init__(self, sampler):
        self.sampler = sampler
        self.refinement_settings = RefinementSettings(n_steps=0)

    def logits(self, x, training=False):
        assert training is False  # the sampler sees the network in inference mode
        return -0.5 * tf.reduce_sum(tf.square(x), axis=1, keepdims=True)


def test_generator_samples_a_known_target():
    # Textbook Langevin dynamics (step eps/2, noise sqrt(eps)) on E(x) = |x|^2 / 2 from uniform noise.
    generator = generation.Generator(_GaussianTarget(SGLDSampler(step_size=0.005, noise_std=0.1, n_steps=1500)))
    x = generator.sample(4000, seed=0, init="uniform")
    np.testing.assert_allclose(x.mean(axis=0), [0.0, 0.0], atol=0.06)
    np.testing.assert_allclose(x.std(axis=0), [1.0, 1.0], atol=0.06)
    np.testing.assert_array_equal(x, generator.sample(4000, seed=0, init="uniform"))


def test_refine_runs_from_the_images_with_the_settings():
    generator = generation.Generator(_GaussianTarget(SGLDSampler(n_steps=3)))
    images = np.full((4, 2), 0.8, np.float32)
    np.testing.assert_array_equal(generator.refine(images), images)  # the model's settings: 0 steps
    # Noiseless steps of 0.1 on E = |x|^2 / 2: x <- x - 0.1 x = 0.9 x per step.
    refined = generator.refine(images, settings=RefinementSettings(n_steps=2, step_size=0.1, grad_clamp=None))
    np.testing.assert_allclose(refined, 0.8 * 0.9 ** 2, rtol=1e-6)
    np.testing.assert_allclose(generator.refine(images, n_steps=1, step_size=0.5, noise_std=0.0, settings="sampler"),
                               0.4, rtol=1e-6)


def test_one_compiled_function_per_arity_and_sampler_structure(tiny_data):
    model = tiny_jem(pxy_weight=0.5, buffer_size=30)
    functions = model._generator._sgld_functions
    model.sample(4, seed=0, n_steps=2)
    model.sample(4, seed=1, n_steps=3, step_size=0.5, noise_std=0.0)  # steps, step size, noise: arguments
    assert len(functions) == 1
    model.sample(3, seed=0, n_steps=2, labels=[0, 1, 2])
    assert len(functions) == 2
    model.refine(tiny_data[0][:4], n_steps=2, settings=RefinementSettings(n_steps=2, grad_clamp=None))
    assert len(functions) == 3  # another sampler structure (its clamps)


def test_tensorflow_still_needs_one_function_per_arity():
    # generation.Generator keeps one tf.function per number of context tensors because one *context varargs
    # function called with and without labels fails in TensorFlow's retracing relaxation (IndexError, TF 2.21).
    varargs = tf.function(lambda x, *context: x + sum(tf.reduce_sum(c) for c in context), reduce_retracing=True)
    varargs(tf.ones([2]))
    try:
        varargs(tf.ones([2]), tf.ones([2]))
    except IndexError:
        return
    pytest.fail("TensorFlow now retraces a *context varargs tf.function called with and without extra tensors: "
                "Generator._run_sgld may key its compiled functions on the sampler structure alone (drop the arity "
                "workaround there).")


def test_model_sample_starts_where_generation_says(tiny_data):
    model = tiny_jem()
    start = model.sample(5, seed=7, n_steps=0)
    expected = start_chains(5, tf.constant([7, 0], tf.int64), image_shape=(8, 8, 1), value_range=(-1, 1))
    np.testing.assert_array_equal(start, expected.numpy())


@pytest.mark.parametrize("call, match", [
    (lambda m: m.sample(0), "num_samples.*received 0"),
    (lambda m: m.sample(2, init="noise"), "init.*received 'noise'"),
    (lambda m: m.sample(2, init="class_gaussian"), "chain_init"),
    (lambda m: m.sample(2, n_steps=-1), "n_steps.*received -1"),
    (lambda m: m.sample(2, labels=[0, 5]), r"labels.*\[0, 3\).*5"),
    (lambda m: m.refine(np.zeros((2, 4, 4, 1))), r"images.*received shape \(2, 4, 4, 1\)"),
    (lambda m: m.refine(np.zeros((2, 8, 8, 1)), settings="fast"), "settings.*received 'fast'"),
])
def test_bad_sampling_arguments_name_the_value(call, match):
    with pytest.raises(ValueError, match=match):
        call(tiny_jem())


@pytest.fixture(scope="module")
def trained(evaluation_jem):
    """The tiny trained model these tests share: conftest's ``evaluation_jem``, trained once per test run."""
    return evaluation_jem


def test_refine_is_seeded_and_mixes_with_conditional_sampling(trained):
    model, _, _, (x_test, _), _ = trained
    a = model.refine(x_test[:6], n_steps=4, seed=5)
    assert np.array_equal(a, model.refine(x_test[:6], n_steps=4, seed=5))
    assert not np.array_equal(a, x_test[:6])
    assert np.array_equal(model.refine(x_test[:6], n_steps=0), x_test[:6])
    # Unconditional and class-conditional SGLD on one model (they compile separately).
    model.sample(4, n_steps=2)
    assert model.sample(3, n_steps=2, labels=[0, 1, 2]).shape == (3, 8, 8, 1)
    model.refine(x_test[:3], n_steps=2, labels=[0, 1, 2])
    with pytest.raises(ValueError, match="images"):
        model.refine(np.zeros((2, 4, 4, 1)), n_steps=1)
    with pytest.raises(ValueError, match="labels"):
        model.refine(x_test[:2], n_steps=1, labels=[0, 7])
