"""jem_tf.evaluation.refinement_choice: settings chosen by the rule on validation data, never test data."""

import numpy as np
import pytest

from jem_tf import evaluation as ev
from jem_tf.evaluation import refinement_choice as refinement_lib
from jem_tf.evaluation.attacks import PGD
from jem_tf.evaluation.refinement_choice import choose_refinement


@pytest.fixture(scope="module")
def trained(refinement_jem):
    """The tiny trained model these tests share: conftest's ``refinement_jem``, trained once per test run."""
    return refinement_jem


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


def test_bad_choice_arguments_raise(trained):
    model, (x_val, y_val), _ = trained
    with pytest.raises(ValueError, match="n_steps"):
        choose_refinement(model, x_val, y_val, n_steps=(0,))
    with pytest.raises(ValueError, match="val_labels"):
        choose_refinement(model, x_val, y_val[:3])
    with pytest.raises(ValueError, match="sampler"):
        model.refine(x_val[:2], settings="sgld")
