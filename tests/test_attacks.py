"""jem_tf.evaluation.attacks: PGD in its ball and box, and BPDA through a refinement."""

import numpy as np
import pytest
import tensorflow as tf

from jem_tf.evaluation.attacks import PGD
from jem_tf.model.generation import refinement_fn
from jem_tf.model.refinement import RefinementSettings


@pytest.fixture(scope="module")
def trained(refinement_jem):
    """The tiny trained model these tests share: conftest's ``refinement_jem``, trained once per test run."""
    return refinement_jem


def test_pgd_stays_in_the_ball_and_the_box_and_fools_a_linear_classifier():
    rng = np.random.default_rng(0)
    w = tf.constant(rng.normal(size=(16, 2)), tf.float32)

    def logits_fn(x):
        return tf.reshape(x, [-1, 16]) @ w

    x = rng.uniform(-1, 1, (64, 4, 4, 1)).astype("float32")
    y = logits_fn(x).numpy().argmax(1).astype("int32")  # clean accuracy 1
    for norm, eps in (("linf", 0.3), ("l2", 1.5)):
        attack = PGD(logits_fn, image_shape=(4, 4, 1), norm=norm, steps=10)
        x_adv = attack(x, y, eps=eps, seed=3, batch_size=24)
        delta = (x_adv - x).reshape(64, -1)
        size = np.abs(delta).max(1) if norm == "linf" else np.linalg.norm(delta, axis=1)
        assert size.max() <= eps + 1e-5 and x_adv.min() >= -1 and x_adv.max() <= 1
        assert (logits_fn(x_adv).numpy().argmax(1) == y).mean() < 0.5
        assert np.array_equal(x_adv, attack(x, y, eps=eps, seed=3, batch_size=24))
        assert np.array_equal(attack(x, y, eps=0.0), x)
    with pytest.raises(ValueError, match="norm"):
        PGD(logits_fn, image_shape=(4, 4, 1), norm="l1")
    with pytest.raises(ValueError, match="eps"):
        PGD(logits_fn, image_shape=(4, 4, 1), norm="l2")(x, y, eps=-1.0)


def test_bpda_attacks_the_gradient_at_the_refined_input_inside_every_step(trained):
    """The defence is inside the attacked forward pass: every step (and every EOT draw) runs it, and the step
    follows the gradient at its output (identity backward), not at the attacked image."""
    model, _, (x_test, y_test) = trained

    def logits_fn(x):
        return model.logits(x, training=False)

    calls = tf.Variable(0)
    anchor = tf.constant(x_test[:1])

    def to_anchor(x, seed):  # a "refinement" that maps every input to one image
        calls.assign_add(1)
        return tf.repeat(anchor, tf.shape(x)[0], axis=0)

    steps, eps, step_size = 3, 0.1, 0.02
    attack = PGD(logits_fn, image_shape=model.image_shape, norm="linf", steps=steps, random_start=False,
                 preprocess=to_anchor, eot_samples=2)
    x, y = x_test[:6], y_test[:6]
    adversarial = attack(x, y, eps=eps, step_size=step_size, seed=1)
    assert int(calls.numpy()) == steps * 2  # one batch: each step ran the defence for each of its 2 draws
    # Each image moved along the sign of the loss gradient at the anchor (for its own label), every step.
    with tf.GradientTape() as tape:
        point = tf.repeat(anchor, len(x), axis=0)
        tape.watch(point)
        loss = tf.reduce_sum(tf.nn.sparse_softmax_cross_entropy_with_logits(tf.constant(y, tf.int32),
                                                                             logits_fn(point)))
    direction = np.sign(tape.gradient(loss, point).numpy())
    expected = x
    for _ in range(steps):
        expected = np.clip(x + np.clip(expected + step_size * direction - x, -eps, eps), -1, 1)
    np.testing.assert_allclose(adversarial, expected, atol=1e-6)


@pytest.mark.integration
def test_bpda_through_identity_refinement_is_the_plain_attack(trained):
    model, _, (x_test, y_test) = trained

    def logits_fn(x):
        return model.logits(x, training=False)

    identity = refinement_fn(model, RefinementSettings(n_steps=0))
    for norm, eps in (("linf", 0.1), ("l2", 0.5)):
        plain = PGD(logits_fn, image_shape=model.image_shape, norm=norm, steps=3)(x_test, y_test, eps=eps, seed=2)
        bpda = PGD(logits_fn, image_shape=model.image_shape, norm=norm, steps=3, preprocess=identity,
                   eot_samples=2)(x_test, y_test, eps=eps, seed=2)
        np.testing.assert_array_equal(bpda, plain)
    # Through a noisy refinement the attack differs, stays in its budget and is seeded.
    noisy = refinement_fn(model, RefinementSettings(n_steps=2, step_size=0.01, noise_std=0.05))
    attack = PGD(logits_fn, image_shape=model.image_shape, norm="linf", steps=3, preprocess=noisy, eot_samples=2)
    a = attack(x_test[:10], y_test[:10], eps=0.1, seed=2)
    assert np.array_equal(a, attack(x_test[:10], y_test[:10], eps=0.1, seed=2))
    assert np.abs(a - x_test[:10]).max() <= 0.1 + 1e-6
