"""jem_tf.seeds: distinct salts per kind, folding and step seeds, no literal salt anywhere else."""

import os
import re

import numpy as np
import pytest
import tensorflow as tf

import jem_tf
from jem_tf import seeds


def _salt_names():
    return sorted(name for name, value in vars(seeds).items()
                  if name.isupper() and isinstance(value, int) and not isinstance(value, bool))


def test_salts_of_a_kind_are_distinct_and_every_salt_has_a_kind():
    for kind, names in seeds.SALT_GROUPS.items():
        values = [getattr(seeds, name) for name in names]
        assert len(set(values)) == len(values), f"{kind}: {dict(zip(names, values))}"
    grouped = [name for names in seeds.SALT_GROUPS.values() for name in names]
    assert sorted(set(grouped)) == _salt_names()
    assert len(grouped) == len(set(grouped))  # each salt has one kind


def test_the_values_that_fix_every_seeded_number():
    # Changing one changes the numbers of every seeded run: a deliberate change updates this test too.
    assert (seeds.STEP_DATA_NOISE, seeds.STEP_DRAW, seeds.STEP_SGLD, seeds.STEP_DRAW_CONDITIONAL,
            seeds.STEP_SGLD_CONDITIONAL, seeds.SAMPLE_SGLD) == (1, 2, 3, 4, 5, 3)
    assert (seeds.DRAW_INDEX, seeds.DRAW_RESTART, seeds.DRAW_NOISE, seeds.DRAW_DEQUANTIZE,
            seeds.FRESH_PICK_UNIFORM, seeds.FRESH_UNIFORM, seeds.FRESH_FLAT, seeds.FRESH_FLAT_SPREAD) == \
        (11, 12, 13, 14, 15, 16, 17, 18)
    assert (seeds.INIT_CLASS, seeds.INIT_LATENT, seeds.INIT_RESIDUAL) == (21, 22, 23)
    assert (seeds.AUGMENT_CROP, seeds.AUGMENT_FLIP, seeds.BATCH_PICK_LABELLED, seeds.BATCH_SHUFFLE_ROWS,
            seeds.BATCH_AUGMENT, seeds.MAKE_DATASET_AUGMENT) == (1, 2, 1, 2, 3, 7)
    assert (seeds.PGD_START_RADIUS, seeds.PGD_FIRST_STEP, seeds.PROBE_IMAGES, seeds.PROBE_LABELS,
            seeds.LABELLED_SUBSET, seeds.BUFFER_RESET_OFFSET, seeds.REFINE_STEPS_STRIDE) == \
        (1, 2, 1, 2, 2, 1000, 100_003)
    assert (seeds.SAMPLES_UNCONDITIONAL, seeds.SAMPLES_CONDITIONAL, seeds.SAMPLES_BUFFER, seeds.SAMPLES_LONG_CHAIN,
            seeds.OOD_SET_OFFSET, seeds.OUTLIER_KIND_OFFSET, seeds.FRECHET_SAMPLES_OFFSET) == (0, 1, 2, 3, 1, 1, 1)


def test_as_stateless_seed():
    np.testing.assert_array_equal(seeds.as_stateless_seed(7).numpy(), [7, 0])
    seed = seeds.as_stateless_seed(tf.constant([3, 4], tf.int32))
    assert seed.dtype == tf.int64
    np.testing.assert_array_equal(seed.numpy(), [3, 4])
    with pytest.raises(ValueError, match="shape-\\[2\\]"):
        seeds.as_stateless_seed(tf.constant([1, 2, 3]))


def test_fold_folds_each_value_in_order():
    seed = tf.constant([5, 6], tf.int64)
    np.testing.assert_array_equal(seeds.fold(seed).numpy(), [5, 6])
    by_hand = tf.random.experimental.stateless_fold_in(tf.random.experimental.stateless_fold_in(seed, 1), 2)
    np.testing.assert_array_equal(seeds.fold(seed, 1, 2).numpy(), by_hand.numpy())
    assert not np.array_equal(seeds.fold(seed, 1, 2).numpy(), seeds.fold(seed, 2, 1).numpy())
    # An int32 seed gives the stream of the same int64 seed.
    np.testing.assert_array_equal(seeds.fold([5, 6], 1).numpy(), seeds.fold(seed, 1).numpy())


def test_step_seed_is_a_function_of_seed_reseeds_step_and_salt():
    reference = seeds.step_seed(0, 0, 10, seeds.STEP_SGLD).numpy()
    np.testing.assert_array_equal(seeds.step_seed(0, 0, 10, seeds.STEP_SGLD).numpy(), reference)
    np.testing.assert_array_equal(
        reference, seeds.fold(tf.constant([0, 0], tf.int64), 0, tf.constant(10, tf.int64), seeds.STEP_SGLD).numpy())
    # A step counter of any integer dtype (the optimizer's iterations variable is int64) gives the same stream.
    np.testing.assert_array_equal(seeds.step_seed(0, 0, tf.constant(10, tf.int32), seeds.STEP_SGLD).numpy(), reference)
    others = [seeds.step_seed(1, 0, 10, seeds.STEP_SGLD), seeds.step_seed(0, 1, 10, seeds.STEP_SGLD),
              seeds.step_seed(0, 0, 11, seeds.STEP_SGLD), seeds.step_seed(0, 0, 10, seeds.STEP_DRAW)]
    streams = {tuple(reference)} | {tuple(seed.numpy()) for seed in others}
    assert len(streams) == 5


def test_buffer_reset_seeds_never_repeat_the_initial_fill():
    assert seeds.buffer_reset_seed(4, 0) == [4, 1000] and seeds.buffer_reset_seed(4, 3) == [4, 1003]
    assert all(seeds.buffer_reset_seed(4, r)[1] != 0 for r in range(10))  # the initial fill is [seed, 0]


def test_seed_state_counts_reseeds_and_is_not_called():
    state = seeds.SeedState()
    assert int(state.reseeds.numpy()) == 0 and not state.reseeds.trainable
    state.reseeds.assign_add(1)
    assert int(state.reseeds.numpy()) == 1
    with pytest.raises(NotImplementedError):
        state(None)


# Literal salts: a number folded into a seed, added to a seed, or the second word of a [seed, N] seed.
LITERAL_SALTS = re.compile(r"fold_in\([^()]*,\s*\d+\)|fold\([^()]*,\s*\d+\)|seed\s*\+\s*\d+(?![\d*])"
                           r"|\[[\w.]*seed,\s*[1-9]\d*\]|\*\s*\d[\d_]{3,}\s*\+")


def test_no_salt_is_written_as_a_literal_outside_seeds():
    package = os.path.dirname(jem_tf.__file__)
    found = []
    for directory, _, names in os.walk(package):
        for name in names:
            path = os.path.join(directory, name)
            if name.endswith(".py") and path != seeds.__file__:
                for number, line in enumerate(open(path), 1):
                    if LITERAL_SALTS.search(line.split("#")[0]) and '"""' not in line and "``" not in line:
                        found.append(f"{os.path.relpath(path, package)}:{number}: {line.strip()}")
    assert not found, "salts belong in jem_tf/seeds.py:\n" + "\n".join(found)
    # The pattern does find them.
    assert LITERAL_SALTS.search("tf.random.experimental.stateless_fold_in(seed, 3)")
    assert LITERAL_SALTS.search("model.sample(n, seed=seed + 2)") and LITERAL_SALTS.search("rng([config.seed, 2])")
    assert not LITERAL_SALTS.search("range(seed, seed + 10**6)")
