"""jem_tf.training.tuning: keras-tuner searches over JEM settings on a digits subset."""

import json
import os
import re

import pytest

from jem_tf.data import ImageDataset, load_digits
from jem_tf.run.config import TrainConfig, load_recipe
from jem_tf.run.splits import select_labelled, split_train_validation
from jem_tf.training import tuning
from jem_tf.training.factories import build_datasets
from jem_tf.training.pipeline import train_and_evaluate
from jem_tf.training.tuning import build_hypermodel, make_tuner, run_search, search_space

FIXED = ["sgld_step_size", "sgld_noise_std", "sgld_steps", "restart_prob", "px_weight", "energy_l2_weight",
         "warmup_steps"]


@pytest.fixture(scope="module")
def small_digits():
    d = load_digits(seed=0)
    return ImageDataset("digits", d.x_train[:400], d.y_train[:400], d.x_test[:100], d.y_test[:100], 10)


def _config(**overrides):
    values = dict(epochs=2, width=4, sgld_steps=2, buffer_size=200, batch_size=64, warmup_steps=10,
                  max_rollbacks=0, num_sample_images=4)
    values.update(overrides)
    return TrainConfig(**values)


@pytest.mark.slow
def test_diverging_trial_is_recorded_as_failed_and_the_search_goes_on(small_digits, tmp_path):
    # Grid over two learning rates: 1e3 diverges at once (no rollbacks allowed), 3e-3 trains.
    space = search_space({"learning_rate": {"type": "choice", "values": [1e3, 3e-3]}}, fixed=FIXED)
    directory = str(tmp_path / "search")
    summary = run_search(_config(), small_digits, directory=directory, kind="grid", max_trials=4, space=space)
    assert summary["num_trials"] == 2 and summary["num_failed"] == 1
    failed = next(t for t in summary["trials"] if t["status"] == "FAILED")
    assert failed["hyperparameters"] == {"learning_rate": 1000.0} and "training diverged" in failed["message"]
    assert summary["best"]["hyperparameters"] == {"learning_rate": 0.003}
    assert 0.0 <= summary["best"]["score"] <= 1.0
    saved = json.load(open(os.path.join(directory, "summary.json")))
    assert saved["num_failed"] == 1 and len(saved["trials"]) == 2

    # The best recipe is a train recipe: it loads and trains.
    recipe = load_recipe(os.path.join(directory, "best_recipe.json"))
    assert recipe.learning_rate == 0.003 and recipe.width == 4
    metrics = train_and_evaluate(recipe.replace(epochs=1), str(tmp_path / "train"), verbose=0, data=small_digits)
    assert 0.0 <= metrics["test_accuracy"] <= 1.0

    # Resumable: rerunning with overwrite=False finds the finished trials and runs none again.
    again = run_search(_config(), small_digits, directory=directory, kind="grid", max_trials=4, space=space)
    assert again["num_trials"] == 2 and again["wall_seconds"] < 30


@pytest.mark.integration
def test_random_search_checkpoints_without_buffers_and_reloads_best_model(small_digits, tmp_path):
    hypermodel = build_hypermodel(_config(epochs=1, buffer_size=2000), small_digits,
                                  space=search_space(fixed=["warmup_steps", "sgld_steps"]))
    tuner = make_tuner(hypermodel, kind="random", max_trials=2, directory=str(tmp_path), seed=1)
    tuner.search()
    best_trial = tuner.oracle.get_best_trials(1)[0]
    trial_dir = os.path.join(tmp_path, "jem", f"trial_{best_trial.trial_id}")
    checkpoint = os.path.join(trial_dir, "best_epoch.weights.h5")
    assert tuner.best_epoch_file(best_trial.trial_id) == checkpoint
    assert not os.path.exists(os.path.join(trial_dir, "checkpoint.weights.h5"))  # keras-tuner's whole-model one
    model = tuner.get_best_models(1)[0]
    buffer_bytes = model.replay_buffer.samples.numpy().nbytes
    assert os.path.getsize(checkpoint) < buffer_bytes  # no 2,000 x 8 x 8 replay buffer (512 KB) inside
    validation = hypermodel.validation
    accuracy = model.evaluate(validation.images, validation.labels, return_dict=True, verbose=0)["accuracy"]
    assert accuracy == pytest.approx(best_trial.score, abs=1e-6)
    values = best_trial.hyperparameters.values
    assert set(values) == {"sgld_step_size", "sgld_noise_std", "restart_prob", "learning_rate", "px_weight",
                           "energy_l2_weight"}
    assert model.sampler.step_size == pytest.approx(values["sgld_step_size"])


@pytest.mark.integration
def test_hyperband_continues_trials_from_their_buffer_less_checkpoints(small_digits, tmp_path):
    space = search_space(fixed=FIXED)
    hypermodel = build_hypermodel(_config(epochs=3), small_digits, space=space)
    tuner = make_tuner(hypermodel, kind="hyperband", directory=str(tmp_path), seed=0)
    tuner.search()
    trials = list(tuner.oracle.trials.values())
    continued = [t for t in trials if t.hyperparameters.values.get("tuner/trial_id")]
    assert continued and all(t.status == "COMPLETED" for t in trials)
    # A continued trial started from its parent's best epoch: the epochs it ran are only the bracket's new ones.
    for trial in continued:
        assert trial.hyperparameters.values["tuner/initial_epoch"] > 0
        assert os.path.exists(tuner.best_epoch_file(trial.trial_id))
    assert tuner.get_best_models(1)[0].evaluate(hypermodel.validation.images, hypermodel.validation.labels,
                                                verbose=0, return_dict=True)["accuracy"] == pytest.approx(
        tuner.oracle.get_best_trials(1)[0].score, abs=1e-6)


@pytest.mark.integration
def test_combined_objective_adds_ood_auroc(small_digits, tmp_path):
    space = search_space(fixed=FIXED + ["learning_rate"])
    space["energy_l2_weight"] = {"type": "choice", "values": [0.0]}
    summary = run_search(_config(epochs=1), small_digits, directory=str(tmp_path), kind="grid", max_trials=1,
                         objective="combined", space=space)
    best = summary["best"]
    assert summary["objective"] == "score"
    assert best["score"] == pytest.approx(best["metrics"]["val_accuracy"] + best["metrics"]["val_ood_auroc"])
    assert 0.0 <= best["metrics"]["val_ood_auroc"] <= 1.0


@pytest.mark.integration
def test_search_under_mirrored_strategy(small_digits, tmp_path):
    space = search_space(fixed=FIXED)
    space["learning_rate"] = {"type": "choice", "values": [3e-3]}
    summary = run_search(_config(epochs=1, strategy="mirrored"), small_digits, directory=str(tmp_path),
                         kind="grid", max_trials=1, space=space)
    assert summary["num_trials"] == 1 and summary["num_failed"] == 0
    best = summary["best"]  # the one trial, its score its validation accuracy, its recipe the searched value
    assert best["hyperparameters"] == {"learning_rate": 3e-3} and best["status"] == "COMPLETED"
    assert best["score"] == pytest.approx(best["metrics"]["val_accuracy"]) and 0.0 <= best["score"] <= 1.0
    recipe = load_recipe(os.path.join(str(tmp_path), "best_recipe.json"))
    assert recipe.learning_rate == 3e-3 and recipe.strategy == "mirrored" and recipe.epochs == 1


def test_search_space_validation():
    with pytest.raises(ValueError, match="not a config field"):
        search_space({"momentum": {"type": "float", "min": 0, "max": 1}})
    with pytest.raises(ValueError, match="type float, int or choice"):
        search_space({"learning_rate": {"type": "uniform"}})
    assert "learning_rate" not in search_space({"learning_rate": None})
    # What keras-tuner cannot sample is refused up front, naming the entry (not a traceback in the first trial).
    for spec, message in [({"type": "float", "min": 1e-2, "max": 1e-4}, r"min \(0.01\) is more than max"),
                          ({"type": "float", "min": -1.0, "max": 1.0, "sampling": "log"}, "log sampling needs min > 0"),
                          ({"type": "choice", "values": []}, "a choice needs a non-empty list of values"),
                          ({"type": "choice", "values": [1e-3, 1e-3]}, "a choice lists a value more than once"),
                          ({"type": "int", "min": 1.5, "max": 3}, "min must be a finite integer"),
                          ({"type": "float", "min": 0, "max": float("nan")}, "max must be a finite number"),
                          ({"type": "int", "min": 1, "max": 3, "step": 0}, "step must be a number > 0")]:
        with pytest.raises(ValueError, match=f"Search space entry 'learning_rate': {message}"):
            search_space({"learning_rate": spec})


@pytest.mark.integration
def test_a_semi_supervised_recipe_tunes_on_its_labelled_rows(small_digits, tmp_path, monkeypatch):
    """Every trial trains as `python -m jem_tf.train` would: the labelled rows of its batches are the run's labelled
    selection (select_labelled), next to rows of the whole training split that train p(x) only."""
    config = _config(epochs=1, labels_per_class=3, labelled_batch_size=8)
    train, _ = split_train_validation(config, small_digits.x_train, small_digits.y_train)
    labelled = select_labelled(config, train)
    assert len(labelled.images) == 30
    fitted = []

    def spy(config, splits, **kwargs):  # the datasets each trial fits on
        datasets = build_datasets(config, splits, **kwargs)
        fitted.append(datasets[0])
        return datasets

    monkeypatch.setattr(tuning, "build_datasets", spy)
    space = search_space(fixed=FIXED + ["learning_rate"])
    space["energy_l2_weight"] = {"type": "choice", "values": [0.0]}
    summary = run_search(config, small_digits, directory=str(tmp_path), kind="grid", max_trials=1, space=space)
    assert summary["num_trials"] == 1 and summary["num_failed"] == 0 and summary["best"] is not None
    assert len(fitted) == 1
    labelled_rows = {(row.tobytes(), int(label)) for row, label in zip(labelled.images, labelled.labels)}
    batches = 0
    for images, labels, weights in fitted[0]:
        chosen = weights.numpy() > 0
        assert chosen.sum() == 8  # labelled_batch_size labelled rows in every batch
        assert {(row.tobytes(), int(label)) for row, label in zip(images.numpy()[chosen], labels.numpy()[chosen])} \
            <= labelled_rows
        batches += 1
    assert batches == 6  # ceil(360 / 64): one epoch over every training image


def test_search_refuses_data_it_would_ignore(small_digits, tmp_path):
    """Every trial trains on the hypermodel's own splits: data given to search() is refused, not ignored."""
    hypermodel = build_hypermodel(_config(epochs=1), small_digits)
    tuner = make_tuner(hypermodel, kind="random", max_trials=1, directory=str(tmp_path), seed=1)
    for args, kwargs, named in [((small_digits.x_train, small_digits.y_train), {}, "2 positional argument(s)"),
                                ((), {"x": small_digits.x_train}, "x"),
                                ((), {"validation_data": (small_digits.x_test, small_digits.y_test)},
                                 "validation_data")]:
        with pytest.raises(ValueError, match=rf"search\(\) trains every trial on the data of its hypermodel .*"
                                             rf"received {re.escape(named)}"):
            tuner.search(*args, **kwargs)
    assert tuner.oracle.trials == {}  # nothing ran


@pytest.mark.integration
def test_a_stop_check_ends_the_search_even_when_a_trial_fails_on_the_way(small_digits, tmp_path, monkeypatch):
    """`stop_check` (the tune command's Ctrl-C flag) runs after every batch, and when a trial fails: a stop request
    that surfaced as an Exception (a Ctrl-C swallowed while TensorFlow traced the step) ends the search instead of
    being recorded, and printed, as a failed trial."""
    space = search_space({"learning_rate": {"type": "choice", "values": [1e-3, 3e-3]}}, fixed=FIXED)
    calls = []

    def stop_after_three_batches():
        calls.append(1)
        if len(calls) >= 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_search(_config(), small_digits, directory=str(tmp_path / "batches"), kind="grid", max_trials=2,
                   space=space, stop_check=stop_after_three_batches)
    assert len(calls) == 3

    stop = {"requested": False}

    def swallowed_interrupt(*args, **kwargs):
        stop["requested"] = True
        raise ValueError("None values not supported.")

    def check():
        if stop["requested"]:
            raise KeyboardInterrupt

    monkeypatch.setattr(tuning.JEMHyperModel, "fit", swallowed_interrupt)
    with pytest.raises(KeyboardInterrupt):
        run_search(_config(), small_digits, directory=str(tmp_path / "failed"), kind="grid", max_trials=2,
                   space=space, stop_check=check)
    # Without a stop check the same failure is a failed trial, and the search goes on to the next one.
    stop["requested"] = False
    summary = run_search(_config(), small_digits, directory=str(tmp_path / "plain"), kind="grid", max_trials=3,
                         space=space)
    assert summary["num_failed"] == 2 and summary["best"] is None
