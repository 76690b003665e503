"""jem_tf.errors' rule for the library: bad input to a public API is a ValueError naming the value."""

import numpy as np
import pytest
from conftest import tiny_jem

from jem_tf import JEM, SGLDSampler, small_cnn
from jem_tf.training.callbacks import ChiefBackupAndRestore
from jem_tf.training.stability import StabilityGuard


def _api_cases():
    from jem_tf import ReplayBuffer
    from jem_tf.data import load_dataset
    from jem_tf.run.config import TrainConfig
    from jem_tf.sampling.distribution import make_strategy
    from jem_tf.serving import export_saved_model

    backbone = small_cnn(num_classes=3, input_shape=(8, 8, 1), width=4)
    images = np.zeros((4, 8, 8, 1), "float32")
    return [
        ("JEM(px_weight=nan)", lambda: JEM(backbone, px_weight=float("nan")), "px_weight must be a finite number"),
        ("JEM(seed='0')", lambda: JEM(backbone, seed="0"), "seed must be an int; received seed='0'"),
        ("SGLDSampler(n_steps=2.5)", lambda: SGLDSampler(n_steps=2.5),
         "n_steps must be an int >= 1; received n_steps=2.5"),
        ("ReplayBuffer(size=-5)", lambda: ReplayBuffer(image_shape=(2,), size=-5),
         "size must be an int >= 1; received size=-5"),
        ("fit(labels=[0,1,2,7])", lambda: tiny_jem().fit(images, np.array([0, 1, 2, 7]), verbose=0),
         "integer class ids in [0, 3); received label 7"),
        ("fit(images*300)", lambda: tiny_jem().fit(images + 300, np.zeros(4), verbose=0),
         "received values in [300, 300]"),
        ("fit(NaN images)", lambda: tiny_jem().fit(images * np.nan, np.zeros(4), verbose=0), "NaN"),
        ("fit(rank 3)", lambda: tiny_jem().fit(images[..., 0], np.zeros(4), verbose=0), "received (4, 8, 8)"),
        ("sample(init='noise')", lambda: tiny_jem().sample(2, init="noise"),
         "init must be one of ('default', 'uniform', 'class_gaussian', 'buffer'); received 'noise'"),
        ("load_dataset(missing data_dir)", lambda: load_dataset("mnist", data_dir="/no/such/dir"),
         "--data-dir '/no/such/dir' does not exist"),
        ("load_dataset('imagenet')", lambda: load_dataset("imagenet"), "Unknown dataset 'imagenet'"),
        ("make_strategy('gpu')", lambda: make_strategy("gpu"), "Unknown strategy 'gpu'"),
        ("TrainConfig.replace(lr=1)", lambda: TrainConfig().replace(lr=1), "Unknown config field(s) ['lr']"),
        ("TrainConfig(epochs=0).validate()", lambda: TrainConfig(epochs=0).validate(),
         "epochs must be an integer >= 1; received 0"),
        ("export(version=-1)", lambda: export_saved_model(tiny_jem(), "/tmp/x", version=-1, ood_threshold=0.0),
         "version must be an int >= 0; received -1"),
        ("export(no calibration)", lambda: export_saved_model(tiny_jem(), "/tmp/x"), "exactly one of"),
        ("StabilityGuard(max_rollbacks=-1)", lambda: StabilityGuard(max_rollbacks=-1),
         "max_rollbacks must be an int >= 0"),
        ("ChiefBackupAndRestore(keep=0)", lambda: ChiefBackupAndRestore("/tmp/b", keep=0), "keep must be >= 1"),
    ]


@pytest.mark.parametrize("index", range(18))
def test_api_bad_inputs_raise_value_errors_naming_the_value(index):
    name, call, message = _api_cases()[index]
    with pytest.raises(ValueError) as error:
        call()
    assert message.replace("`", "") in str(error.value).replace("`", ""), (name, str(error.value))
