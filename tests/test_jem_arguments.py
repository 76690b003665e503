"""jem_tf.model.jem_arguments: the checks of JEM(...)'s and JEM.compile's arguments."""


import keras
import pytest
from conftest import tiny_jem, users_classifier

from jem_tf import JEM, SGLDSampler, small_cnn
from jem_tf.model.jem_arguments import check_compile_arguments, check_jem_arguments

WEIGHTS = dict(pyx_weight=1.0, px_weight=1.0, pxy_weight=0.0, energy_l2_weight=0.0, data_noise_std=0.03,
               value_range=(-1, 1), seed=0, energy_start_step=0)


def _backbone():
    return small_cnn(num_classes=3, input_shape=(8, 8, 1), width=4, stages=1)


def test_fills_in_the_defaults_and_what_the_backbone_tells():
    args = check_jem_arguments(_backbone(), **WEIGHTS)
    assert args.image_shape == (8, 8, 1) and args.num_classes == 3
    assert isinstance(args.sampler, SGLDSampler) and args.refinement is None
    assert args.value_range == (-1.0, 1.0) and args.class_conditional_buffer is False
    assert check_jem_arguments(_backbone(), **{**WEIGHTS, "pxy_weight": 0.5}).class_conditional_buffer is True
    serialised = keras.saving.serialize_keras_object(SGLDSampler(n_steps=4))  # as in a saved config
    assert check_jem_arguments(_backbone(), sampler=serialised, **WEIGHTS).sampler.n_steps == 4


@pytest.mark.parametrize("change, match", [
    ({"px_weight": -1.0}, "`px_weight` must be a finite number >= 0; received px_weight=-1.0"),
    ({"data_noise_std": float("inf")}, "`data_noise_std` must be a finite number"),
    ({"sampler": "sgld"}, "`sampler` must be an SGLDSampler; received 'sgld'"),
    ({"value_range": (1, 0)}, r"`value_range` must be \(low, high\) with low < high; received \(1.0, 0.0\)"),
    ({"seed": 1.5}, "`seed` must be an int; received seed=1.5"),
    ({"energy_start_step": -1}, "`energy_start_step` must be an int >= 0; received -1"),
    ({"pxy_weight": 1.0, "class_conditional_buffer": False}, "needs `class_conditional_buffer=True`"),
    ({"refinement": "best"}, "`refinement` must be None or RefinementSettings; received 'best'"),
    ({"px_weight": -1.0, "seed": 1.5}, "px_weight"),  # the first bad argument, in the signature's order
])
def test_bad_arguments_raise_naming_the_value(change, match):
    with pytest.raises(ValueError, match=match):
        check_jem_arguments(_backbone(), **{**WEIGHTS, **change})


def test_a_backbone_without_a_static_shape_needs_image_shape():
    dynamic = keras.Sequential([keras.layers.Flatten(), keras.layers.Dense(3)])
    with pytest.raises(ValueError, match="must be static"):
        check_jem_arguments(dynamic, **WEIGHTS)
    assert check_jem_arguments(dynamic, image_shape=(8, 8, 1), num_classes=3, **WEIGHTS).image_shape == (8, 8, 1)


@pytest.mark.parametrize("kwargs, match", [({"loss": "mse"}, "does not take `loss`"),
                                           ({"loss_weights": [1.0]}, "does not take `loss_weights`"),
                                           ({"jit_compile": "yes"}, "`jit_compile` must be True, False or 'auto'")])
def test_compile_refuses_a_loss(kwargs, match):
    with pytest.raises(ValueError, match=match):
        check_compile_arguments(**kwargs)
    check_compile_arguments(jit_compile="auto", steps_per_execution=2, metrics=["accuracy"], weighted_metrics=[])


@pytest.mark.parametrize("head", ["softmax", "layer"])
def test_a_softmax_head_is_refused(head):
    backbone = users_classifier("softmax") if head == "softmax" else keras.Sequential(
        [*users_classifier().layers, keras.layers.Softmax()])
    with pytest.raises(ValueError, match="ends in a softmax"):
        JEM(backbone, buffer_size=16)


def test_a_dynamic_input_shape_is_refused_unless_given():
    backbone = users_classifier(input_shape=(None, None, 1))
    with pytest.raises(ValueError, match="must be static"):
        JEM(backbone, buffer_size=16)
    assert JEM(backbone, buffer_size=16, image_shape=(8, 8, 1)).image_shape == (8, 8, 1)


def test_compile_defaults_and_rejected_arguments():
    model = tiny_jem()
    assert model.jit_compile is False  # tiny_jem compiles with the default: off, on every device
    with pytest.raises(ValueError, match="does not take `loss`"):
        model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    with pytest.raises(ValueError, match="jit_compile"):
        model.compile(optimizer="adam", jit_compile="yes")
