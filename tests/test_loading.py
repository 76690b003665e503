"""jem_tf.data.loading: load_dataset by name, and the names it does not know."""

import pytest

from jem_tf import data


def test_unknown_dataset_raises():
    with pytest.raises(ValueError, match="imagenet"):
        data.load_dataset("imagenet")


def test_unknown_names_list_the_options(tmp_path):
    for name in ("imagenet", "no_such_set", str(tmp_path / "data.npy"), "../x"):
        with pytest.raises(ValueError, match="Unknown dataset .*expected one of digits, mnist, .*mnist_5k, another "
                                             r"TensorFlow Datasets image classification name .*\.npz file") as error:
            data.load_dataset(name)
        assert "\n" not in str(error.value)
    assert data.dataset_problem("mnist_5k") is None and "for evaluation only" in data.dataset_problem(
        "mnist_5k", training=True)
    assert data.preprocessing_of("no_such_set") == ""
