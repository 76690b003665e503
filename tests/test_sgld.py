"""jem_tf.sampling.sgld: SGLD on any energy, XLA-compiled too."""

import numpy as np
import pytest
import tensorflow as tf
from conftest import CHAIN_TOLERANCE, tiny_jem

from jem_tf import SGLDSampler, small_cnn
from jem_tf.model import energy


def quadratic_energy(x):
    # E(x) = |x|^2 / 2: exp(-E) is a standard normal.
    return 0.5 * tf.reduce_sum(tf.square(x), axis=-1)


@pytest.mark.integration
def test_textbook_langevin_samples_a_standard_normal():
    eps = 0.02  # gradient step eps/2, noise std sqrt(eps)
    sampler = SGLDSampler(step_size=eps / 2, noise_std=np.sqrt(eps), n_steps=800)
    x0 = tf.fill([4000, 2], 3.0)
    samples, diag = sampler.sample(quadratic_energy, x0, seed=0)
    samples = samples.numpy()
    # Stationary law of the discretised chain: N(0, 1 / (1 - eps/4)); std ~ 1.005.
    assert np.all(np.abs(samples.mean(axis=0)) < 0.06)
    np.testing.assert_allclose(samples.std(axis=0), 1.0, atol=0.05)
    # Energy starts at 9 (|x|^2 / 2 for x = (3, 3)) and falls to ~1 (its mean under N(0, I)).
    np.testing.assert_allclose(diag.initial_energy.numpy(), 9.0)
    assert abs(float(diag.energy_trace[-1]) - 1.0) < 0.1
    assert diag.energy_trace.shape == (800,) and diag.grad_norm_trace.shape == (800,)


def test_deterministic_per_seed_and_different_across_seeds():
    sampler = SGLDSampler(step_size=0.1, noise_std=0.5, n_steps=5)
    x0 = tf.zeros([8, 3])
    a, _ = sampler.sample(quadratic_energy, x0, seed=7)
    b, _ = sampler.sample(quadratic_energy, x0, seed=7)
    c, _ = sampler.sample(quadratic_energy, x0, seed=8)
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)


def test_lowers_network_energy_on_average():
    net = small_cnn(num_classes=10, input_shape=(8, 8, 1), width=8, seed=1)
    # An untrained net's logits are nearly flat; scale them so the energy has a landscape.
    energy_fn = lambda x: energy.energy(50.0 * net(x, training=False))  # noqa: E731
    x0 = tf.random.stateless_uniform([64, 8, 8, 1], seed=[1, 1], minval=-1, maxval=1)
    samples, diag = SGLDSampler(n_steps=20).sample(energy_fn, x0, seed=3)
    before, after = energy_fn(x0).numpy(), energy_fn(samples).numpy()
    assert after.mean() < before.mean()
    assert (after < before).mean() > 0.9
    np.testing.assert_allclose(diag.initial_energy, before, rtol=1e-4, atol=1e-4)


def test_clamp_and_grad_clip():
    sampler = SGLDSampler(step_size=10.0, noise_std=0.0, n_steps=1, clamp_range=(-1, 1))
    out, _ = sampler.sample(quadratic_energy, tf.fill([2, 2], 0.9), seed=0)
    np.testing.assert_allclose(out, -1.0)  # 0.9 - 10 * 0.9 = -8.1, clamped
    clipped = SGLDSampler(step_size=1.0, noise_std=0.0, n_steps=1, grad_clip=0.5)
    out, diag = clipped.sample(quadratic_energy, tf.constant([[3.0, 4.0]]), seed=0)
    np.testing.assert_allclose(out, [[3.0 - 0.3, 4.0 - 0.4]], rtol=1e-6)  # gradient (3,4) -> norm 0.5
    np.testing.assert_allclose(diag.grad_norm_trace, [5.0])  # unclipped norm is reported


def test_per_call_overrides_and_tensor_steps_inside_tf_function():
    sampler = SGLDSampler(n_steps=50)

    @tf.function
    def run(n):
        return sampler.sample(quadratic_energy, tf.ones([4, 2]), seed=1, n_steps=n, step_size=0.5,
                              noise_std=0.0)

    out, diag = run(tf.constant(2))
    np.testing.assert_allclose(out, 0.25)  # x <- x - 0.5 x twice
    assert diag.energy_trace.shape == (2,)


def test_jit_compiled_sampler_matches_eager_dynamics_and_is_deterministic():
    x0 = tf.random.stateless_normal([16, 3], seed=[0, 1])
    # Without noise both follow the same gradient path.
    plain, _ = SGLDSampler(step_size=0.1, noise_std=0.0, n_steps=4).sample(quadratic_energy, x0, seed=2)
    jit_sampler = SGLDSampler(step_size=0.1, noise_std=0.1, n_steps=4, jit_compile=True)
    jitted, _ = jit_sampler.sample(quadratic_energy, x0, seed=2, noise_std=0.0)
    np.testing.assert_allclose(plain, jitted, rtol=1e-5, atol=1e-6)
    # XLA's random kernels differ from TF's, but a jit-compiled run is still deterministic per seed.
    a, _ = jit_sampler.sample(quadratic_energy, x0, seed=5)
    b, _ = jit_sampler.sample(quadratic_energy, x0, seed=5)
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize(
    "kwargs, match",
    [({"step_size": 0}, "step_size"), ({"noise_std": -1}, "noise_std"), ({"n_steps": 0}, "n_steps"),
     ({"grad_clip": -1}, "grad_clip"), ({"clamp_range": (1, -1)}, "clamp_range")],
)
def test_bad_settings_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SGLDSampler(**kwargs)


def test_config_round_trip():
    sampler = SGLDSampler(step_size=0.5, noise_std=0.02, n_steps=7, grad_clip=1.0, clamp_range=(-1, 1))
    again = SGLDSampler.from_config(sampler.get_config())
    assert again.get_config() == sampler.get_config()


def test_grad_clamp_bounds_every_pixel_move_and_still_descends():
    # A steep energy (gradients up to 400 per coordinate): the proximal step moves no coordinate by more
    # than step_size * grad_clamp, and with the clamp to the data range it never leaves [-1, 1].
    def steep(x):
        return 100.0 * tf.reduce_sum(tf.square(x - 0.3), axis=[1, 2, 3])

    x0 = tf.random.stateless_uniform([32, 4, 4, 1], seed=[0, 1], minval=-1.0, maxval=1.0)
    sampler = SGLDSampler(step_size=0.05, noise_std=0.0, n_steps=1, grad_clamp=1.0, clamp_range=(-1.0, 1.0))
    x = x0
    energies = [float(tf.reduce_mean(steep(x)))]
    for i in range(30):
        new_x, _ = sampler.sample(steep, x, seed=i)
        assert float(tf.reduce_max(tf.abs(new_x - x))) <= 0.05 + 1e-6
        assert float(tf.reduce_min(new_x)) >= -1.0 and float(tf.reduce_max(new_x)) <= 1.0
        x = new_x
        energies.append(float(tf.reduce_mean(steep(x))))
    # Bounded steps still go downhill (until they oscillate within one step of the minimum).
    assert all(b < a for a, b in zip(energies[:10], energies[1:11]))
    assert energies[-1] < 0.01 * energies[0]
    # Without the clamp the same step overshoots: the bound is the clamp's doing.
    free, _ = SGLDSampler(step_size=0.05, noise_std=0.0, n_steps=1).sample(steep, x0, seed=0)
    assert float(tf.reduce_max(tf.abs(free - x0))) > 0.5
    assert SGLDSampler.from_config(sampler.get_config()).grad_clamp == 1.0
    with pytest.raises(ValueError, match="grad_clamp"):
        SGLDSampler(grad_clamp=0.0)


@pytest.mark.integration
def test_the_sampler_and_sampling_under_xla(data):
    x, _ = data
    model = tiny_jem(sampler=SGLDSampler(n_steps=5, noise_std=0.0, jit_compile=True))
    plain = tiny_jem(sampler=SGLDSampler(n_steps=5, noise_std=0.0))
    # settings="sampler": the training sampler itself (refinement settings build their own, uncompiled one).
    np.testing.assert_allclose(model.refine(x[:8], n_steps=5, seed=1, settings="sampler"),
                               plain.refine(x[:8], n_steps=5, seed=1, settings="sampler"), **CHAIN_TOLERANCE)
    samples = model.sample(8, seed=3, n_steps=5)
    np.testing.assert_array_equal(samples, model.sample(8, seed=3, n_steps=5))  # deterministic per seed
    assert model.energy(samples).mean() < model.energy(model.sample(8, seed=3, n_steps=0)).mean()
