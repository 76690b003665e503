"""Test-time refinement: a descent on the energy that stays in the value range and is seeded; the settings
are chosen on validation data by the documented rule and saved with the model; BPDA through an identity
refinement is the plain attack."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import separable_data, tiny_jem

from jem_tf import evaluation as ev
from jem_tf.evaluation import refinement_choice as refinement_lib
from jem_tf.evaluation.attacks import PGD
from jem_tf.evaluation.refinement_choice import choose_refinement
from jem_tf.model.generation import refinement_fn
from jem_tf.model.refinement import RefinementSettings


@pytest.fixture(scope="module")
def trained():
    """A tiny JEM trained on separable 8x8 data, with validation and test splits."""
    x, y = separable_data(200)
    model = tiny_jem()
    model.fit(x[:120], y[:120], batch_size=32, epochs=3, verbose=0)
    return model, (x[120:160], y[120:160]), (x[160:], y[160:])


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


def test_choice_follows_the_rule_on_validation_data(trained):
    model, (x_val, y_val), _ = trained
    eps = {"linf": (0.05, 0.2)}
    choice = choose_refinement(model, x_val, y_val, step_sizes=(0.005, 0.05, 0.5), n_steps=(1, 4), tolerance=0.01,
                               attack_eps=eps, attack_steps=3)
    assert len(choice.candidates) == 6 and choice.plain["num_images"] == len(x_val)
    # The attacked validation images are those of PGD on the plain classifier, and it hurt.
    attack = PGD(lambda x: model.logits(x, training=False), image_shape=model.image_shape, norm="linf", steps=3)
    for budget in (0.05, 0.2):
        adversarial = attack(x_val, y_val, eps=budget * 2, seed=0)
        assert choice.plain["attacked_accuracy"][f"linf_eps_{budget:g}"] == pytest.approx(
            float((model.logits(adversarial, training=False).numpy().argmax(1) == y_val).mean()))
    assert choice.plain["attacked_accuracy"]["linf_eps_0.2"] < choice.plain["accuracy"]
    for c in choice.candidates:
        gains = [c["attacked_accuracy"][name] - plain for name, plain in choice.plain["attacked_accuracy"].items()]
        assert c["gain"] == pytest.approx(np.mean(gains))
        assert c["qualifies"] == (c["accuracy"] >= choice.plain["accuracy"] - 0.01 and min(gains) >= 0)
    helpful = [c for c in choice.candidates if c["qualifies"] and c["gain"] > 0]
    if helpful:
        best = max(helpful, key=lambda c: (c["gain"], -c["n_steps"] * c["step_size"]))
        assert (choice.settings.n_steps, choice.settings.step_size) == (best["n_steps"], best["step_size"])
    else:
        assert choice.settings.n_steps == 0
    assert "validation" in choice.settings.source and "rule v2" in choice.settings.source
    # Without attacked images no candidate can show a gain: refinement is not used.
    assert choose_refinement(model, x_val, y_val, step_sizes=(0.05,), n_steps=(1,), attack_eps={}).settings.n_steps == 0


def test_evaluation_chooses_refinement_on_validation_never_test(trained, tmp_path, monkeypatch):
    model, (x_val, y_val), (x_test, y_test) = trained
    seen = []
    real = refinement_lib.choose_refinement

    def spy(model, images, labels, **kwargs):
        seen.append(np.array(images))
        return real(model, images, labels, step_sizes=(0.01,), n_steps=(2,), **kwargs)

    monkeypatch.setattr(refinement_lib, "choose_refinement", spy)
    report = ev.evaluate(model, test_images=x_test, test_labels=y_test, out_dir=str(tmp_path),
                         modes=("accuracy", "robustness"), val_images=x_val, val_labels=y_val,
                         pgd_eps={"linf": (0.05,)}, pgd_steps=2, robustness_examples=8, batch_size=32)
    assert len(seen) == 1 and np.array_equal(seen[0], x_val)
    used = report["settings"]["refinement"]
    assert report["robustness"]["settings"]["refinement"] == used == report["accuracy"]["settings"]["refinement"]
    assert "validation" in used["source"]
    assert set(report["robustness"]["linf_eps_0.05"]) >= {"accuracy", "accuracy_refined", "accuracy_refined_bpda"}
    # No validation split: nothing is chosen (the test split is never used for it).
    ev.evaluate(model, test_images=x_test, test_labels=y_test, out_dir=str(tmp_path / "b"), modes=("accuracy",),
                batch_size=32)
    assert len(seen) == 1
    with pytest.raises(ValueError, match="validation"):
        ev.evaluate(model, test_images=x_test, test_labels=y_test, out_dir=str(tmp_path / "c"), modes=("accuracy",),
                    refinement="choose")


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


@pytest.mark.parametrize("kwargs, name", [({"n_steps": -1}, "n_steps"), ({"step_size": 0.0}, "step_size"),
                                          ({"noise_std": -0.1}, "noise_std"), ({"grad_clamp": 0}, "grad_clamp")])
def test_bad_settings_raise_naming_the_value(kwargs, name):
    with pytest.raises(ValueError, match=name):
        RefinementSettings(**kwargs)


def test_bad_choice_arguments_raise(trained):
    model, (x_val, y_val), _ = trained
    with pytest.raises(ValueError, match="n_steps"):
        choose_refinement(model, x_val, y_val, n_steps=(0,))
    with pytest.raises(ValueError, match="val_labels"):
        choose_refinement(model, x_val, y_val[:3])
    with pytest.raises(ValueError, match="sampler"):
        model.refine(x_val[:2], settings="sgld")


@pytest.mark.integration
def test_training_saves_settings_chosen_by_the_rule_unless_told_not_to(finished_run, tmp_path):
    import json

    from conftest import TINY_TRAIN_ARGS

    from jem_tf import train
    from jem_tf.run.model_files import load_trained_model

    metrics = json.load(open(f"{finished_run}/metrics.json"))
    chosen = metrics["refinement"]["settings"]
    assert "rule v2" in chosen["source"] and "validation" in chosen["source"]
    assert set(metrics["refinement"]["validation_plain"]["attacked_accuracy"]) == {
        "linf_eps_0.01", "linf_eps_0.02", "linf_eps_0.05", "l2_eps_0.5", "l2_eps_1"}
    model, _ = load_trained_model(finished_run)
    assert model.refinement.describe() == chosen
    workdir = str(tmp_path / "skip")
    assert train.main(TINY_TRAIN_ARGS + ["--workdir", workdir, "--choose-refinement", "false"]) == 0
    assert "refinement" not in json.load(open(f"{workdir}/metrics.json"))
    assert load_trained_model(workdir)[0].refinement is None
