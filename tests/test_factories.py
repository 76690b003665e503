"""jem_tf.training.factories: what a TrainConfig builds (JEM, optimizer, guard, input pipelines)."""

import keras
import numpy as np
import pytest

from jem_tf.errors import UsageError
from jem_tf.run.config import TrainConfig
from jem_tf.run.splits import RunSplits, Split
from jem_tf.training.factories import (
    build_datasets,
    build_jem,
    build_optimizer,
    build_stability_guard,
    compile_jem,
    resolve_config_precision,
    steps_per_epoch,
)
from jem_tf.training.schedules import WarmupPiecewiseSchedule

TINY = dict(width=4, sgld_steps=3, buffer_size=40, precision="float32", num_sample_images=4)


def _images(n, num_classes=3, seed=0):
    rng = np.random.default_rng(seed)
    return Split(rng.uniform(-1, 1, (n, 8, 8, 1)).astype("float32"), (np.arange(n) % num_classes).astype("int32"))


def test_build_jem_takes_every_setting_from_the_config():
    config = TrainConfig(sgld_step_size=0.5, sgld_noise_std=0.02, restart_prob=0.1, px_weight=0.25, pxy_weight=0.5,
                         **TINY)
    model = build_jem(config, image_shape=(8, 8, 1), num_classes=3)
    assert (model.num_classes, tuple(model.image_shape), model.buffer_size) == (3, (8, 8, 1), 40)
    assert (model.sampler.n_steps, model.sampler.step_size, model.sampler.noise_std) == (3, 0.5, 0.02)
    assert (model.px_weight, model.pxy_weight, model.chain_init) == (0.25, 0.5, None)
    assert model.backbone(np.zeros((2, 8, 8, 1), "float32")).shape == (2, 3)


def test_class_gaussian_starts_are_fitted_to_the_labelled_images_given():
    labelled = _images(12)
    config = TrainConfig(chain_init="class_gaussian", **TINY)
    model = build_jem(config, image_shape=(8, 8, 1), num_classes=3, train_data=labelled)
    means = model.chain_init.means.numpy().reshape(3, -1)
    for c in range(3):
        np.testing.assert_allclose(means[c], labelled.images[labelled.labels == c].reshape(4, -1).mean(0), atol=1e-5)
    # One image of a class gives no Gaussian: the run's data is at fault, a usage error (exit code 2 in the CLI).
    one_of_class_2 = Split(labelled.images[:7], np.array([0, 1, 0, 1, 0, 1, 2], "int32"))
    with pytest.raises(UsageError, match="Every class needs at least 2 images to fit its Gaussian"):
        build_jem(config, image_shape=(8, 8, 1), num_classes=3, train_data=one_of_class_2)


def test_a_whitened_stem_is_fitted_to_the_training_images_given_and_frozen_on_request():
    from jem_tf.networks import fast_cnn, whiten_stem

    rng = np.random.default_rng(0)
    images = rng.uniform(-1, 1, (12, 16, 16, 3)).astype("float32")
    config = TrainConfig(**{**TINY, "backbone": "fast_cnn", "width": 4, "normalization": "batch",
                            "stem_init": "whitened", "frozen_layers": ["stem"]})
    model = build_jem(config, image_shape=(16, 16, 3), num_classes=3, train_data=Split(images, np.arange(12) % 3))
    expected = fast_cnn(num_classes=3, input_shape=(16, 16, 3), width=4, seed=config.seed)
    whiten_stem(expected, images)
    stem = model.backbone.get_layer("stem_conv")
    np.testing.assert_allclose(stem.kernel.numpy(), expected.get_layer("stem_conv").kernel.numpy(), rtol=1e-6)
    assert not stem.trainable


def test_a_density_head_is_added_to_a_converted_classifier_and_refused_without_a_linear_head():
    from jem_tf.networks import small_cnn

    config = TrainConfig(**{**TINY, "density_head": 5, "init_from": "classifier.keras"})
    classifier = small_cnn(num_classes=3, input_shape=(8, 8, 1), width=4, seed=0)
    model = build_jem(config, image_shape=(8, 8, 1), num_classes=3, backbone=classifier)
    assert [layer.name for layer in model.backbone.layers if layer.trainable_weights] == [
        "density_hidden", "density_offset"]
    images = _images(4).images
    np.testing.assert_allclose(model.backbone(images), classifier(images), atol=1e-6)
    inputs = keras.Input((8, 8, 1))
    pooled = keras.Model(inputs, keras.layers.GlobalAveragePooling2D()(keras.layers.Conv2D(3, 3)(inputs)))
    with pytest.raises(UsageError, match="density_head 5: a density head needs a network that ends in a linear Dense"):
        build_jem(config, image_shape=(8, 8, 1), num_classes=3, backbone=pooled)
    tapped = build_jem(config.replace(density_head_layers=["stem_act"]), image_shape=(8, 8, 1), num_classes=3,
                       backbone=small_cnn(num_classes=3, input_shape=(8, 8, 1), width=4, seed=0))
    assert tapped.backbone.get_layer("density_hidden").kernel.shape[0] == 2 * 4 + 16  # stem stats + pooled features
    bounded = build_jem(config.replace(density_head_offset="nonpositive"), image_shape=(8, 8, 1), num_classes=3,
                        backbone=small_cnn(num_classes=3, input_shape=(8, 8, 1), width=4, seed=0))
    np.testing.assert_allclose(bounded.backbone(images), classifier(images) - np.log(2.0), atol=1e-5)  # -softplus(0)
    with pytest.raises(UsageError, match=r"density_head 5 with density_head_layers \['stem'\]: no layer of .* named"):
        build_jem(config.replace(density_head_layers=["stem"]), image_shape=(8, 8, 1), num_classes=3,
                  backbone=small_cnn(num_classes=3, input_shape=(8, 8, 1), width=4, seed=0))


@pytest.mark.parametrize("overrides, kwargs, message", [
    ({"precision": "auto"}, {}, "build_jem needs a resolved precision"),
    ({"classifier_epochs": 1, "epochs": 2}, {}, "classifier_epochs > 0 needs `steps_per_epoch`"),
    ({"chain_init": "class_gaussian"}, {}, "chain_init 'class_gaussian' needs the training data"),
    ({"backbone": "fast_cnn", "stem_init": "whitened"}, {}, "stem_init 'whitened' needs the training data"),
])
def test_build_jem_refuses_what_it_cannot_build(overrides, kwargs, message):
    config = TrainConfig(**{**TINY, **overrides})
    with pytest.raises(ValueError, match=message) as error:
        build_jem(config, image_shape=(8, 8, 1), num_classes=3, **kwargs)
    assert not isinstance(error.value, UsageError)  # a caller's bug, not the user's input


def test_steps_per_epoch_and_steps_per_execution_that_must_divide_it():
    config = TrainConfig(batch_size=64, **TINY)
    assert steps_per_epoch(config, 1293) == 21 and steps_per_epoch(config, 64) == 1
    model = build_jem(config, image_shape=(8, 8, 1), num_classes=3)
    compile_jem(model, config.replace(steps_per_execution=7), steps_per_epoch=21)
    with pytest.raises(UsageError, match=r"steps_per_execution \(4\) must divide the 21 training steps per epoch "
                                         r"\(e.g. 1, 3, 7, 21\)"):
        compile_jem(model, config.replace(steps_per_execution=4), steps_per_epoch=21)


def test_optimizer_schedule_and_loss_scaling():
    config = TrainConfig(learning_rate=2e-3, warmup_steps=10, decay_epochs=[2, 5], decay_rate=0.5, **TINY)
    adam = build_optimizer(config, steps_per_epoch=7)
    assert isinstance(adam, keras.optimizers.Adam)
    # Decay at the epochs' first steps (2 x 7 and 5 x 7); warm-up from step 0.
    assert adam.get_config()["learning_rate"]["config"] == {"learning_rate": 2e-3, "warmup_steps": 10,
                                                            "decay_boundaries": [14, 35], "decay_rate": 0.5}
    schedule = WarmupPiecewiseSchedule(2e-3, warmup_steps=10, decay_boundaries=[14, 35], decay_rate=0.5)
    np.testing.assert_allclose(float(adam.learning_rate), float(schedule(0)), rtol=1e-6)
    sgd = build_optimizer(config.replace(optimizer="sgd", weight_decay=1e-4), steps_per_epoch=7)
    assert isinstance(sgd, keras.optimizers.SGD) and sgd.momentum == 0.9 and sgd.weight_decay == 1e-4
    scaled = build_optimizer(config.replace(precision="mixed_float16"), steps_per_epoch=7)
    assert isinstance(scaled, keras.optimizers.LossScaleOptimizer)


def test_stability_guard_and_explicit_precision_come_from_the_config():
    config = TrainConfig(max_abs_energy=50.0, max_energy_gap=5.0, max_rollbacks=2, rollback_lr_factor=0.25,
                         rollback_extra_sgld_steps=3, rollback_reset_buffer=True, **TINY)
    guard = build_stability_guard(config, log=None)
    assert (guard.max_abs_energy, guard.max_energy_gap, guard.max_rollbacks, guard.lr_factor,
            guard.extra_sgld_steps, guard.reset_buffer) == (50.0, 5.0, 2, 0.25, 3, True)
    resolved, report = resolve_config_precision(config, image_shape=(8, 8, 1), num_classes=3)
    assert resolved is config and report == {"precision": "float32", "reason": "set explicitly"}


def test_datasets_of_supervised_and_semi_supervised_splits():
    train, validation, test = _images(50), _images(9, seed=1), _images(6, seed=2)
    config = TrainConfig(batch_size=16, epochs=2, **TINY)
    supervised = RunSplits(train, validation, train, test)
    train_ds, validation_ds, epoch_steps = build_datasets(config, supervised)
    assert epoch_steps == 4 and sum(1 for _ in train_ds) == 2 * 4  # ceil(50 / 16) per epoch, both epochs
    assert [len(x) for x, _ in validation_ds] == [9]  # one batch of max(batch_size, 256)
    _, none, _ = build_datasets(config, RunSplits(train, None, train, test), first_epoch=1)
    assert none is None

    labelled = Split(train.images[:6], train.labels[:6])
    semi = RunSplits(train, validation, labelled, test, semi_supervised=True)
    semi_config = config.replace(labels_per_class=2, labelled_batch_size=4)
    train_ds, _, epoch_steps = build_datasets(semi_config, semi, num_epochs=1)
    labelled_rows = {row.tobytes() for row in labelled.images}
    for images, _, weights in train_ds:
        chosen = images.numpy()[weights.numpy() > 0]
        assert len(chosen) == 4 and all(row.tobytes() in labelled_rows for row in chosen)
    assert epoch_steps == 4
    # A config and splits that disagree about being semi-supervised are a caller's bug.
    with pytest.raises(ValueError, match="semi-supervised config .* needs semi-supervised splits, and only it"):
        build_datasets(semi_config, supervised)
    with pytest.raises(ValueError, match="semi-supervised config .* needs semi-supervised splits, and only it"):
        build_datasets(config, semi)
