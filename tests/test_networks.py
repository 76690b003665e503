"""jem_tf.networks: Wide-ResNet, the small and fast CNNs, frozen layers, mixed precision."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from jem_tf import build_backbone, small_cnn, wide_resnet
from jem_tf.networks import with_precision


@pytest.mark.parametrize("depth, width, params", [(10, 1, 77_706), (28, 2, 1_466_026)])
def test_wide_resnet_matches_the_papers_parameter_counts(depth, width, params):
    # WRN-10-1 78k and WRN-28-2 1.47M parameters, as the JEM reference's network.
    net = wide_resnet(depth=depth, width=width, num_classes=10, input_shape=(32, 32, 3))
    assert net.count_params() == params
    assert net(np.zeros((2, 32, 32, 3), "float32")).shape == (2, 10)


def test_wide_resnet_is_pre_activation_leaky_relu_without_normalisation():
    net = wide_resnet(depth=10, width=1, input_shape=(16, 16, 3))
    layers = net.layers
    assert not any(isinstance(layer, (keras.layers.BatchNormalization, keras.layers.LayerNormalization))
                   for layer in layers)
    slopes = {layer.negative_slope for layer in layers if isinstance(layer, keras.layers.LeakyReLU)}
    assert slopes == {0.2}
    assert all(layer.use_bias for layer in layers if isinstance(layer, keras.layers.Conv2D))


@pytest.mark.parametrize("normalization, layer_type", [("batch", keras.layers.BatchNormalization),
                                                       ("layer", keras.layers.LayerNormalization)])
def test_wide_resnet_normalisation_options(normalization, layer_type):
    net = wide_resnet(depth=10, width=1, input_shape=(8, 8, 3), normalization=normalization, dropout=0.1)
    assert sum(isinstance(layer, layer_type) for layer in net.layers) == 7  # 2 per block + head
    assert any(isinstance(layer, keras.layers.Dropout) for layer in net.layers)


def test_seeded_init_is_reproducible():
    a = small_cnn(num_classes=10, input_shape=(8, 8, 1), seed=3).get_weights()
    b = small_cnn(num_classes=10, input_shape=(8, 8, 1), seed=3).get_weights()
    for wa, wb in zip(a, b):
        np.testing.assert_array_equal(wa, wb)


def test_build_backbone_by_name():
    assert build_backbone("wrn-10-1", input_shape=(8, 8, 3)).count_params() == 77_706
    assert build_backbone("small_cnn", input_shape=(8, 8, 1), width=4)(np.zeros((1, 8, 8, 1))).shape == (1, 10)
    with pytest.raises(ValueError, match="wrn-28"):
        build_backbone("resnet50")


@pytest.mark.parametrize("kwargs, match", [({"depth": 11}, "depth"), ({"width": 0}, "width"),
                                           ({"normalization": "group"}, "normalization"),
                                           ({"input_shape": (32, 32)}, "input_shape"),
                                           ({"num_classes": 1}, "num_classes")])
def test_bad_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        wide_resnet(**kwargs)


@pytest.mark.integration  # 1.7-1.9 s of CPU: near the default tier's 2 s limit
def test_fast_cnn_and_frozen_batch_norm_through_a_jem_step():
    import keras
    import numpy as np

    from jem_tf import JEM, SGLDSampler
    from jem_tf.networks import fast_cnn, freeze_batch_norm, with_precision

    backbone = fast_cnn(num_classes=3, input_shape=(16, 16, 3), width=4, seed=0)
    assert backbone(np.zeros((2, 16, 16, 3), "float32")).shape == (2, 3)
    with pytest.raises(ValueError, match="at least 16x16"):
        fast_cnn(num_classes=3, input_shape=(8, 8, 3))
    assert freeze_batch_norm(backbone) == 6
    assert all(not layer.trainable for layer in with_precision(backbone, "mixed_bfloat16").layers
               if isinstance(layer, keras.layers.BatchNormalization))  # kept by the precision copy
    model = JEM(backbone, sampler=SGLDSampler(n_steps=1), buffer_size=16, seed=0)
    assert not model._chains.has_batch_norm  # one function for data and chains: a single forward pass
    model.compile(optimizer=keras.optimizers.Adam(1e-3))
    before = [v.numpy().copy() for v in backbone.non_trainable_variables]
    rng = np.random.default_rng(0)
    model.fit(rng.uniform(-1, 1, (8, 16, 16, 3)).astype("float32"), rng.integers(0, 3, 8), batch_size=8, verbose=0)
    for old, new in zip(before, backbone.non_trainable_variables):
        np.testing.assert_array_equal(old, new.numpy())  # moving statistics, scale and offset unchanged


def test_frozen_layers_by_name_or_prefix_stay_fixed_and_survive_the_precision_copy():
    from jem_tf.errors import UsageError
    from jem_tf.networks import fast_cnn, freeze_layers, with_precision

    backbone = fast_cnn(num_classes=3, input_shape=(16, 16, 3), width=4, seed=0)
    assert freeze_layers(backbone, ["stem", "block0"]) == 9  # stem conv/act; block0's conv, pool, norm, act x2
    frozen = {layer.name for layer in backbone.layers if not layer.trainable}
    assert frozen == {name for name in (layer.name for layer in backbone.layers)
                      if name.startswith(("stem_", "block0_"))}
    copy = with_precision(backbone, "mixed_bfloat16")
    assert {layer.name for layer in copy.layers if not layer.trainable} == frozen
    assert freeze_layers(backbone, ["logits"]) == 1 and not backbone.get_layer("logits").trainable
    with pytest.raises(UsageError, match=r"no layer of 'fast_cnn' is named 'block' or block_\.\.\.; its layers: "):
        freeze_layers(backbone, ["block"])


def test_whitened_stem_decorrelates_the_patches_of_the_images_it_is_given():
    from jem_tf.networks import fast_cnn, whiten_stem

    rng = np.random.default_rng(0)
    images = rng.normal(size=(60, 16, 16, 3)).astype("float32")
    images = images + 0.9 * np.roll(images, 1, axis=2) + 0.5 * images[..., :1]  # correlated pixels and channels
    backbone = fast_cnn(num_classes=3, input_shape=(16, 16, 3), width=4, seed=0)
    eigenvalues = whiten_stem(backbone, images, eps=1e-9)
    assert eigenvalues.shape == (12,) and np.all(np.diff(eigenvalues) <= 0)
    kernel = backbone.get_layer("stem_conv").kernel.numpy().reshape(12, 24)
    np.testing.assert_allclose(kernel[:, 12:], -kernel[:, :12])  # both signs of each direction
    patches = np.stack([images[:, i:i + 15, j:j + 15] for i in range(2) for j in range(2)], axis=3).reshape(-1, 12)
    responses = patches @ kernel[:, :12]
    np.testing.assert_allclose(responses.T @ responses / len(responses), np.eye(12), atol=1e-3)
    # eps bounds the gain of the faintest direction (relative to the mean eigenvalue); the first max_images only.
    damped = whiten_stem(backbone, images, eps=1.0)
    np.testing.assert_allclose(damped, eigenvalues, rtol=1e-5)
    assert np.linalg.norm(backbone.get_layer("stem_conv").kernel.numpy().reshape(12, 24)[:, 11]) < 1 / np.sqrt(
        eigenvalues.mean())
    assert not np.allclose(whiten_stem(backbone, images, max_images=2), eigenvalues)
    with pytest.raises(ValueError, match=r"shape \(n, H >= 2, W >= 2, 3\); received \(4, 16, 16, 1\)"):
        whiten_stem(backbone, images[..., :1][:4])
    with pytest.raises(ValueError, match="no Conv2D layer named 'conv0'"):
        whiten_stem(backbone, images, layer="conv0")


@pytest.mark.parametrize("precision", ["mixed_bfloat16", "mixed_float16"])
def test_with_precision_keeps_weights_float32_head_and_float32_input_gradients(precision, tmp_path):
    net = wide_resnet(depth=10, width=1, input_shape=(8, 8, 3), seed=0)
    mixed = with_precision(net, precision)
    assert mixed.layers[-1].dtype_policy.name == "float32"  # the logits head
    assert {layer.dtype_policy.name for layer in mixed.layers[1:-1]} == {precision}
    assert all(w.dtype == "float32" for w in mixed.weights)
    for a, b in zip(net.get_weights(), mixed.get_weights()):
        np.testing.assert_array_equal(a, b)
    x = tf.constant(np.random.default_rng(0).uniform(-1, 1, (4, 8, 8, 3)).astype("float32"))
    np.testing.assert_allclose(mixed(x).numpy(), net(x).numpy(), atol=0.05)
    with tf.GradientTape() as tape:
        tape.watch(x)
        energy = -tf.reduce_sum(tf.reduce_logsumexp(mixed(x), axis=1))
    assert mixed(x).dtype == tf.float32 and tape.gradient(energy, x).dtype == tf.float32
    mixed.save(tmp_path / "mixed.keras")
    restored = keras.models.load_model(tmp_path / "mixed.keras")
    assert restored.layers[1].dtype_policy.name == precision
    assert with_precision(net, "float32") is net
    with pytest.raises(ValueError, match="precision"):
        with_precision(net, "float8")
