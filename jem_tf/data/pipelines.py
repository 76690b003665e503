"""Seeded ``tf.data`` input pipelines: epochs that resume exactly, semi-supervised batches, augmentation."""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from jem_tf import seeds
from jem_tf.choices import AUGMENTATIONS


def augment_images(images: tf.Tensor, *, kind: str, seed: tf.Tensor, pad: int = 4) -> tf.Tensor:
    """Seeded, stateless train-time augmentation of a batch: reflect-pad + random crop and/or
    horizontal flip (the JEM reference's CIFAR augmentation is ``crop_flip``)."""
    if kind not in AUGMENTATIONS:
        raise ValueError(f"Unknown augmentation {kind!r}; expected one of {AUGMENTATIONS}.")
    if kind == "none":
        return images
    crop_seed, flip_seed = (tf.random.experimental.stateless_fold_in(seed, s)
                             for s in (seeds.AUGMENT_CROP, seeds.AUGMENT_FLIP))
    if "crop" in kind:
        shape = tf.shape(images)
        padded = tf.pad(images, [[0, 0], [pad, pad], [pad, pad], [0, 0]], mode="REFLECT")
        offsets = tf.random.stateless_uniform([shape[0], 2], seed=crop_seed, minval=0, maxval=2 * pad + 1,
                                              dtype=tf.int32)
        height, width = images.shape[1], images.shape[2]
        images = tf.map_fn(
            lambda args: tf.slice(args[0], [args[1][0], args[1][1], 0], [height, width, -1]),
            (padded, offsets), fn_output_signature=images.dtype,
        )
    if "flip" in kind:
        flip = tf.random.stateless_uniform([tf.shape(images)[0], 1, 1, 1], seed=flip_seed) < 0.5
        images = tf.where(flip, tf.reverse(images, axis=[2]), images)
    return images


def make_epochs_dataset(x: np.ndarray, y: np.ndarray, *, batch_size: int, seed: int, first_epoch: int,
                        num_epochs: int, augment: str = "none") -> tf.data.Dataset:
    """The batches of epochs ``first_epoch .. num_epochs - 1`` in one dataset (use with ``fit(...,
    initial_epoch=first_epoch, steps_per_epoch=ceil(len(x) / batch_size))``).

    Epoch ``e``'s order is a stateless permutation seeded by ``(seed, e)`` and its augmentation is
    seeded by ``(seed, e, batch)``, so a run resumed at any epoch sees exactly the data an
    uninterrupted run sees.
    """
    if not (isinstance(batch_size, int) and batch_size >= 1):
        raise ValueError(f"`batch_size` must be an int >= 1; received {batch_size!r}")
    if not 0 <= first_epoch <= num_epochs:
        raise ValueError(f"`first_epoch` must be in [0, num_epochs={num_epochs}]; received {first_epoch!r}")
    images, labels, count = tf.constant(x), tf.constant(y), len(x)
    base = tf.constant(seed, tf.int64)

    def one_epoch(epoch):
        order = tf.argsort(tf.random.stateless_uniform([count], seed=tf.stack([base, epoch])))
        batches = tf.data.Dataset.from_tensor_slices(order).batch(batch_size).enumerate()

        def gather(index, batch):
            batch_images = tf.gather(images, batch)
            if augment != "none":
                augment_seed = tf.random.experimental.stateless_fold_in(tf.stack([base, epoch]), index)
                batch_images = augment_images(batch_images, kind=augment, seed=augment_seed)
            return batch_images, tf.gather(labels, batch)

        return batches.map(gather, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)

    dataset = tf.data.Dataset.range(first_epoch, num_epochs).flat_map(one_epoch)
    return dataset.prefetch(tf.data.AUTOTUNE)


def make_semi_supervised_dataset(x: np.ndarray, labelled_x: np.ndarray, labelled_y: np.ndarray, *, batch_size: int,
                                 labelled_batch_size: int, seed: int, first_epoch: int, num_epochs: int,
                                 augment: str = "none") -> tf.data.Dataset:
    """Semi-supervised batches ``(images, labels, sample_weight)`` for epochs ``first_epoch .. num_epochs - 1``.

    An epoch is one pass over ``x`` (every training image, labelled or not) in batches of ``batch_size``
    rows of weight 0 (unlabelled: they train ``p(x)`` only; their label is a placeholder 0), each joined by
    ``labelled_batch_size`` rows drawn with replacement from ``(labelled_x, labelled_y)`` with weight 1 (the
    cross-entropy sees only these). The joined rows are shuffled, so that under a distribution strategy every
    replica gets labelled rows. Everything is seeded by ``(seed, epoch, batch)``, so a resumed run sees the
    batches an uninterrupted one sees (use ``steps_per_epoch = ceil(len(x) / batch_size)``).
    """
    for name, value in (("batch_size", batch_size), ("labelled_batch_size", labelled_batch_size)):
        if not (isinstance(value, int) and value >= 1):
            raise ValueError(f"`{name}` must be an int >= 1; received {value!r}")
    if len(labelled_x) == 0 or len(labelled_x) != len(labelled_y):
        raise ValueError(f"`labelled_x` and `labelled_y` must be non-empty and of equal length; received "
                         f"{len(labelled_x)} and {len(labelled_y)}.")
    if not 0 <= first_epoch <= num_epochs:
        raise ValueError(f"`first_epoch` must be in [0, num_epochs={num_epochs}]; received {first_epoch!r}")
    images, count = tf.constant(x), len(x)
    labelled_images, labelled_labels = tf.constant(labelled_x), tf.constant(labelled_y, tf.int32)
    num_labelled = len(labelled_x)
    base = tf.constant(seed, tf.int64)

    def one_epoch(epoch):
        epoch_seed = tf.stack([base, epoch])
        order = tf.argsort(tf.random.stateless_uniform([count], seed=epoch_seed))
        batches = tf.data.Dataset.from_tensor_slices(order).batch(batch_size).enumerate()

        def gather(index, batch):
            batch_seed = tf.random.experimental.stateless_fold_in(epoch_seed, index)
            pick = tf.random.stateless_uniform([labelled_batch_size], seed=tf.random.experimental.stateless_fold_in(
                batch_seed, seeds.BATCH_PICK_LABELLED), minval=0, maxval=num_labelled, dtype=tf.int32)
            unlabelled = tf.gather(images, batch)
            batch_images = tf.concat([unlabelled, tf.gather(labelled_images, pick)], axis=0)
            labels = tf.concat([tf.zeros([tf.shape(unlabelled)[0]], tf.int32), tf.gather(labelled_labels, pick)], 0)
            weights = tf.concat([tf.zeros([tf.shape(unlabelled)[0]]), tf.ones([labelled_batch_size])], 0)
            rows = tf.argsort(tf.random.stateless_uniform([tf.shape(labels)[0]], seed=tf.random.experimental.
                                                          stateless_fold_in(batch_seed, seeds.BATCH_SHUFFLE_ROWS)))
            batch_images = tf.gather(batch_images, rows)
            if augment != "none":
                augment_seed = tf.random.experimental.stateless_fold_in(batch_seed, seeds.BATCH_AUGMENT)
                batch_images = augment_images(batch_images, kind=augment, seed=augment_seed)
            return batch_images, tf.gather(labels, rows), tf.gather(weights, rows)

        return batches.map(gather, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)

    return tf.data.Dataset.range(first_epoch, num_epochs).flat_map(one_epoch).prefetch(tf.data.AUTOTUNE)


def make_dataset(x: np.ndarray, y: np.ndarray, *, batch_size: int, shuffle: bool, seed: int = 0,
                 augment: str = "none", drop_remainder: bool = False) -> tf.data.Dataset:
    """A batched, prefetched ``tf.data.Dataset`` of ``(images, labels)``.

    Shuffling is seeded and reshuffled every epoch (deterministically per seed); augmentation
    is stateless and seeded by the batch's position.
    """
    if not (isinstance(batch_size, int) and batch_size >= 1):
        raise ValueError(f"`batch_size` must be an int >= 1; received {batch_size!r}")
    dataset = tf.data.Dataset.from_tensor_slices((x, y))
    if shuffle:
        dataset = dataset.shuffle(len(x), seed=seed, reshuffle_each_iteration=True)
    dataset = dataset.batch(batch_size, drop_remainder=drop_remainder)
    if augment != "none":
        base = tf.constant([seed, seeds.MAKE_DATASET_AUGMENT], tf.int64)
        dataset = dataset.enumerate().map(
            lambda i, batch: (augment_images(batch[0], kind=augment,
                                             seed=tf.random.experimental.stateless_fold_in(base, i)), batch[1]),
            num_parallel_calls=tf.data.AUTOTUNE, deterministic=True,
        )
    # In-memory data has no files to shard: multi-worker training shards by element.
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return dataset.with_options(options).prefetch(tf.data.AUTOTUNE)
