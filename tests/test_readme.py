"""The README's bring-your-own example runs as written (with one epoch each instead of the real numbers)."""

import os
import re
import warnings

import numpy as np
import pytest

README = os.path.join(os.path.dirname(__file__), os.pardir, "README.md")
MARKER = "<!-- bring-your-own-example"


def readme_example() -> str:
    text = open(README).read()
    block = re.search(r"```python\n(.*?)```", text[text.index(MARKER):], re.S).group(1)
    # Tiny form: the only change is the number of epochs.
    tiny, count = re.subn(r"^CLASSIFIER_EPOCHS, CONVERSION_EPOCHS = .*$", "CLASSIFIER_EPOCHS, CONVERSION_EPOCHS = 1, 1",
                          block, flags=re.M)
    assert count == 1, "the example's epochs line moved"
    return tiny


@pytest.mark.integration
def test_the_readme_converts_a_keras_classifier_with_a_softmax_head(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    scope = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        exec(compile(readme_example(), "README.md", "exec"), scope)
    assert any("took the logits of the softmax head" in str(w.message) for w in caught)
    jem, classifier, data = scope["jem"], scope["classifier"], scope["data"]
    assert classifier.layers[-1].activation.__name__ == "softmax"  # the user's model is unchanged
    assert scope["logits"].shape == (len(data.x_test), 10) and scope["samples"].shape == (16, 8, 8, 1)
    assert np.isfinite(scope["energies"]).all() and jem.optimizer.iterations.numpy() > 0
    assert os.path.isfile(tmp_path / "digits_jem.keras")
