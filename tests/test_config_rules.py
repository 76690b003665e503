"""jem_tf.run.config_rules: the rule that needs the data, the fields fixed on resume, the choices."""

import pytest

from jem_tf.errors import UsageError
from jem_tf.run import config as config_lib
from jem_tf.run.config import TrainConfig
from jem_tf.run.config_rules import RESUME_FIXED_FIELDS, check_labels_per_class, choices


def test_labels_per_class_against_the_training_split_names_the_smallest_class():
    config = TrainConfig(labels_per_class=5)
    check_labels_per_class(config, {0: 9, 1: 5, 2: 7})
    with pytest.raises(UsageError, match=r"labels_per_class \(5\) is more than the 4 training images of class 2 "
                                         r"\(after the validation split\); use at most 4\."):
        check_labels_per_class(config, {0: 9, 1: 6, 2: 4, 3: 4})
    with pytest.raises(UsageError, match="labels_per_class must be an integer >= 1; received None"):
        check_labels_per_class(TrainConfig(), {0: 9})


def test_resume_fixed_fields_and_choices_name_config_fields():
    assert set(RESUME_FIXED_FIELDS) <= set(config_lib.field_names())
    allowed = choices()
    assert allowed["strategy"] == ("default", "mirrored", "multi_worker", "tpu")
    assert allowed["precision"][-1] == "auto" and allowed["optimizer"] == ("adam", "sgd")
    for field, values in allowed.items():
        assert TrainConfig().replace(**{field: values[0]}).validate() is not None
        with pytest.raises(UsageError, match=f"{field} must be one of {', '.join(values)}; received 'nope'"):
            TrainConfig().replace(**{field: "nope"}).validate()
