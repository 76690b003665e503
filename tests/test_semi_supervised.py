"""Semi-supervised JEM: rows of sample weight 0 are unlabelled (they train p(x) only); --labels-per-class N
keeps N labels per class of the training split."""

import json
import os

import numpy as np
import pytest
import tensorflow as tf
from conftest import tiny_jem

from jem_tf import SGLDSampler
from jem_tf.data import load_digits, make_semi_supervised_dataset
from jem_tf.run.config import TrainConfig
from jem_tf.run.splits import Split, select_labelled, split_train_validation


@pytest.mark.integration
@pytest.mark.parametrize("pxy_weight", [0.0, 1.0])
def test_unlabelled_rows_never_reach_the_label_terms(tiny_data, pxy_weight):
    x, y = tiny_data
    x, y = x[:32], y[:32]
    weights = (np.arange(32) % 4 == 0).astype("float32")  # 8 labelled rows, 24 unlabelled
    wrong = np.where(weights > 0, y, (y + 1) % 3).astype("int32")  # deliberately wrong labels where unlabelled
    results = []
    for labels in (y, wrong):
        model = tiny_jem(data_noise_std=0.0, restart_prob=0.0, pxy_weight=pxy_weight,
                         sampler=SGLDSampler(n_steps=2, noise_std=0.0))
        logs = model.train_on_batch(x, labels, sample_weight=weights, return_dict=True)
        results.append((logs, [v.numpy() for v in model.trainable_variables]))
    (logs_a, weights_a), (logs_b, weights_b) = results
    for a, b in zip(weights_a, weights_b):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    assert logs_a["ce"] == pytest.approx(logs_b["ce"], rel=1e-6)
    # And the labels of the labelled rows do matter (the test would notice if nothing were used).
    flipped = np.where(weights > 0, (y + 1) % 3, y).astype("int32")
    model = tiny_jem(data_noise_std=0.0, restart_prob=0.0, pxy_weight=pxy_weight,
                     sampler=SGLDSampler(n_steps=2, noise_std=0.0))
    assert model.train_on_batch(x, flipped, sample_weight=weights, return_dict=True)["ce"] != \
        pytest.approx(logs_a["ce"], rel=1e-3)


@pytest.mark.integration
def test_p_x_chains_run_for_the_unlabelled_rows_only(tiny_data):
    """A semi-supervised batch runs one p(x) chain per unlabelled row (the labelled rows feed the cross-entropy
    and are among the unlabelled images of an epoch); a batch without weight-0 rows runs one per row."""
    x, y = tiny_data
    x, y = x[:32], y[:32]

    def rewritten_slots(weights):
        model = tiny_jem(buffer_size=100_000, restart_prob=0.0, sampler=SGLDSampler(n_steps=1, noise_std=0.0))
        model.build((None, 8, 8, 1))
        before = model.replay_buffer.samples.numpy()
        model.train_on_batch(x, y, sample_weight=weights)
        changed = np.any(model.replay_buffer.samples.numpy() != before, axis=(1, 2, 3))
        return int(changed.sum())

    labelled = (np.arange(32) % 4 == 0).astype("float32")  # 8 labelled rows, 24 unlabelled
    # Chains are drawn with replacement from 100,000 slots, so (almost surely) one slot per chain.
    assert rewritten_slots(labelled) == 24
    assert rewritten_slots(np.ones(32, "float32")) == 32
    assert rewritten_slots(None) == 32


def test_labelled_selection_is_balanced_seeded_and_disjoint_from_validation():
    data = load_digits(seed=0)
    config = TrainConfig(labels_per_class=10, seed=3)
    train, validation = split_train_validation(config, data.x_train, data.y_train)
    labelled = select_labelled(config, train)
    assert np.bincount(labelled.labels).tolist() == [10] * 10
    np.testing.assert_array_equal(labelled.images, select_labelled(config, train).images)
    assert not np.array_equal(labelled.images, select_labelled(config.replace(seed=4), train).images)
    validation_rows = {row.tobytes() for row in validation.images}
    assert not any(row.tobytes() in validation_rows for row in labelled.images)
    with pytest.raises(ValueError, match="is more than the .* training images of class"):
        select_labelled(config.replace(labels_per_class=1000), train)
    with pytest.raises(ValueError, match="labels_per_class must be"):
        TrainConfig(labels_per_class=0).validate()


def test_semi_supervised_batches_mix_labelled_rows_into_every_batch_and_resume_exactly():
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, (50, 4, 4, 1)).astype("float32")
    labelled = Split(x[:6] + 10.0, np.array([0, 1, 2, 0, 1, 2], np.int32))  # recognisable rows
    kwargs = dict(batch_size=16, labelled_batch_size=4, seed=1, num_epochs=2)
    batches = list(make_semi_supervised_dataset(x, labelled.images, labelled.labels, first_epoch=0, **kwargs))
    assert len(batches) == 2 * 4  # ceil(50 / 16) per epoch
    for images, labels, weights in batches:
        images, labels, weights = images.numpy(), labels.numpy(), weights.numpy()
        is_labelled = images.reshape(len(images), -1).max(axis=1) > 5
        assert weights.sum() == 4 and np.array_equal(weights > 0, is_labelled)
        for image, label in zip(images[is_labelled], labels[is_labelled]):
            source = np.flatnonzero(np.all(labelled.images == image, axis=(1, 2, 3)))
            assert label == labelled.labels[source[0]]
    resumed = list(make_semi_supervised_dataset(x, labelled.images, labelled.labels, first_epoch=1, **kwargs))
    for a, b in zip(batches[4:], resumed):
        for u, v in zip(a, b):
            np.testing.assert_array_equal(u.numpy(), v.numpy())


@pytest.mark.integration
def test_semi_supervised_cli_end_to_end_and_bad_values(tmp_path, capsys):
    from jem_tf import train

    workdir = str(tmp_path / "run")
    argv = ["--epochs", "1", "--buffer-size", "100", "--sgld-steps", "1", "--width", "4", "--batch-size", "64",
            "--precision", "float32", "--verbose", "0", "--workdir", workdir]
    assert train.main(argv + ["--labels-per-class", "5", "--labelled-batch-size", "16"]) == 0
    metrics = json.load(open(os.path.join(workdir, "metrics.json")))
    config = json.load(open(os.path.join(workdir, "config.json")))
    assert metrics["labels_per_class"] == 5 == config["labels_per_class"] and metrics["num_labelled"] == 50
    assert metrics["steps"] == 21  # one epoch over all 1,293 training images (p(x)) in batches of 64
    for bad, message in ((["--labels-per-class", "0"], "labels_per_class must be an integer >= 1"),
                         (["--labels-per-class", "1000"], "is more than the"),
                         (["--labelled-batch-size", "8"], "labelled_batch_size must be none unless"),
                         (["--labels-per-class", "5", "--labelled-batch-size", "2147483647"],
                          "labelled_batch_size (2147483647) is more than the 50 labelled images")):
        capsys.readouterr()
        assert _exit_code(train.main, argv[:-1] + [str(tmp_path / "bad")] + bad) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
        assert not os.path.exists(tmp_path / "bad")


def _exit_code(main, argv):
    """The exit code of a CLI ``main``: returned, or raised as SystemExit by argparse."""
    try:
        return main(argv)
    except SystemExit as exit_:
        return exit_.code


@pytest.mark.integration
def test_semi_supervised_training_under_mirrored_strategy():
    """Two replicas, semi-supervised batches: the replay-buffer copies stay identical, the loss is finite, and the
    labels of unlabelled rows still never matter."""
    import keras

    from jem_tf import JEM, small_cnn
    from jem_tf.sampling.distribution import make_strategy

    data = load_digits(seed=0)
    labelled = Split(data.x_train[:30], data.y_train[:30])
    strategy = make_strategy("mirrored")
    assert strategy.num_replicas_in_sync == 2
    results = []
    for scramble in (False, True):
        x = data.x_train[:64]
        dataset = make_semi_supervised_dataset(x, labelled.images, labelled.labels, batch_size=16,
                                               labelled_batch_size=16, seed=0, first_epoch=0, num_epochs=1)
        if scramble:  # wrong labels on every unlabelled row (weight 0)
            dataset = dataset.map(lambda images, labels, weights: (
                images, tf.where(weights > 0, labels, (labels + 3) % 10), weights))
        with strategy.scope():
            model = JEM(small_cnn(num_classes=10, input_shape=(8, 8, 1), width=4, seed=0), buffer_size=100, seed=0,
                        data_noise_std=0.0, restart_prob=0.0, sampler=SGLDSampler(n_steps=2, noise_std=0.0))
            model.compile(optimizer=keras.optimizers.Adam(1e-3))
        history = model.fit(dataset, epochs=1, steps_per_epoch=4, verbose=0)
        assert np.isfinite(history.history["loss"][-1])
        copies = [v.numpy() for v in model.replay_buffer.samples.value.values]
        np.testing.assert_array_equal(copies[0], copies[1])
        results.append([v.numpy() for v in model.trainable_variables])
    for a, b in zip(*results):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
