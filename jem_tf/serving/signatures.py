"""The serving graph of an export: the model it serves (:func:`serving_model`: float32 unless asked otherwise) and its
three signatures (:func:`build_serving_module`; see :mod:`jem_tf.serving`)."""

from __future__ import annotations

from typing import List, Optional, Sequence

import numpy as np
import tensorflow as tf

from jem_tf import seeds
from jem_tf.choices import DEFAULT_MAX_BATCH_SIZE, SERVING_PRECISIONS
from jem_tf.data.inputs import check_image_shape_in_graph, check_images_in_graph
from jem_tf.errors import UsageError
from jem_tf.model import energy as energy_lib
from jem_tf.model import generation
from jem_tf.model.jem import JEM
from jem_tf.networks import compute_precision, with_precision
from jem_tf.ood import SOURCE, FittedDetector
from jem_tf.sampling.sgld import SGLDSampler
from jem_tf.serving.limits import check_max_batch_size, sample_limits

SIGNATURES = ("classify", "energy", "sample")


def serving_model(model: JEM, serving_precision: str = "float32") -> JEM:
    """The model an export serves: ``model`` itself, or for ``serving_precision="float32"`` and a model that
    computes in 16 bits, an inference twin whose network is a float32 copy of ``model.backbone`` (the same
    weights: mixed precision keeps them in float32) with the same sampler, start distribution, value range and
    refinement settings. Fit the OOD detector on the returned model, so that its threshold is calibrated on the
    scores the export will compute."""
    if serving_precision not in SERVING_PRECISIONS:
        raise UsageError(f"`serving_precision` must be one of {SERVING_PRECISIONS}; received {serving_precision!r}")
    if serving_precision == "trained" or compute_precision(model.backbone) == "float32":
        return model
    return JEM(with_precision(model.backbone, "float32"), sampler=model.sampler, buffer_size=1,
               value_range=model.value_range, seed=model.seed, image_shape=model.image_shape,
               num_classes=model.num_classes, chain_init=model.chain_init,
               chain_init_uniform_fraction=model.replay_buffer.uniform_fraction,
               chain_init_flat_fraction=model.replay_buffer.flat_fraction, refinement=model.refinement,
               name=f"{model.name}_float32")


def build_serving_module(model: JEM, *, ood: FittedDetector, max_num_samples: int = 256,
                         max_n_steps: int = 1000, max_step_size: Optional[float] = None,
                         max_noise_std: Optional[float] = None, max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
                         class_names: Optional[Sequence[str]] = None, uint8_inputs: bool = False):
    """``(module, signatures)`` for ``tf.saved_model.save``: a ``tf.Module`` that tracks the backbone's
    variables only, and the three signatures (see the module docstring) plus ``serving_default``.

    ``class_names`` (one per class, e.g. an image folder's class folders): ``classify`` also returns
    ``predicted_class_name`` [N] (string).

    ``uint8_inputs`` (a model of 8-bit images scaled by ``x / 127.5 - 1`` to ``[-1, 1]``): a fourth signature,
    ``classify_uint8``, takes the raw ``uint8`` pixels ``[N, H, W, C]`` and scales them in the graph, so that a
    client need not know the scaling; its outputs are ``classify``'s.

    The ``sample`` signature's hard upper bounds (a request above one fails in-graph before any sampling, with an
    ``InvalidArgumentError`` naming the bound):

    * ``max_num_samples`` (default 256): at most ``max_num_samples_limit(image_shape)``, i.e. 1 GiB of float32
      samples per request (``ValueError`` above).
    * ``max_n_steps`` (default 1000): at most 100,000.
    * ``max_step_size`` (default 10x the trained sampler's ``step_size``): the step is tuned with the model, and
      an order of magnitude leaves room to explore while ruling out the absurd (1e30) steps that only return
      saturated or garbage samples.
    * ``max_noise_std`` (default ``max(10x the trained noise_std, high - low)`` of the value range): noise with a
      standard deviation of the value range's width already scatters a step over the whole range (and samples
      are clipped to it), so more only saturates pixels; the width also keeps the default meaningful for a
      sampler trained without noise.

    Both must be finite and > 0, and not below the trained values (which requests get by default).

    ``classify`` and ``energy`` take at most ``max_batch_size`` images per request (default 1024, at most 1 GiB of
    float32 images): a larger batch fails in-graph before the network runs, with an ``InvalidArgumentError``
    naming the bound (a client splits its images into batches; a million images at once would exhaust the server).

    (``keras.export.ExportArchive`` would work too, but it checkpoints every variable twice, doubling
    the export's size.)
    """
    limits = sample_limits(model, max_num_samples=max_num_samples, max_n_steps=max_n_steps,
                           max_step_size=max_step_size, max_noise_std=max_noise_std)
    max_step_size, max_noise_std = limits["max_step_size"], limits["max_noise_std"]
    max_batch_size = check_max_batch_size(model, max_batch_size)
    detector, scorer = ood.detector, ood.scorer
    if detector.threshold is None or not np.isfinite(detector.threshold):
        raise ValueError(f"The OOD detector needs a finite threshold; received {detector.threshold!r}")
    ood_components = sorted(set(detector.components) | {"logits"})
    backbone, replay_buffer = model.backbone, model.replay_buffer
    image_shape, value_range, num_classes = model.image_shape, model.value_range, model.num_classes
    # The sampler's settings without XLA: a portable graph for any TF Serving build.
    sampler = SGLDSampler.from_config({**model.sampler.get_config(), "jit_compile": False})
    images_spec = tf.TensorSpec([None, *image_shape], tf.float32, name="images")

    def logits_of(images):
        return tf.cast(backbone(images, training=False), tf.float32)

    def checked(images):
        images = check_image_shape_in_graph(images, image_shape)  # first: the batch bound needs a batch axis
        too_many = tf.debugging.assert_less_equal(
            tf.shape(images)[0], max_batch_size,
            message=f"a request holds at most max_batch_size = {max_batch_size} images (send larger sets in batches); "
                    "got")
        with tf.control_dependencies([too_many]):
            images = tf.identity(images)
        return check_images_in_graph(images, value_range)

    names = check_class_names(class_names, num_classes)

    def classify(images):
        logits = logits_of(checked(images))
        predicted = tf.argmax(logits, axis=-1, output_type=tf.int64)
        outputs = {"probabilities": tf.nn.softmax(logits, axis=-1), "logits": logits, "predicted_class": predicted}
        if names is not None:
            outputs["predicted_class_name"] = tf.gather(tf.constant(names, tf.string), predicted)
        return outputs

    def energy(images):
        components = scorer.components(checked(images), ood_components)
        logits = components["logits"]
        ood_score = tf.cast(detector.combine(components), tf.float32)
        return {"energy": energy_lib.energy(logits), "log_px": energy_lib.log_px(logits), "ood_score": ood_score,
                "is_in_distribution": ood_score >= tf.constant(detector.threshold, tf.float32)}

    # class_label -1: unconditional E(x); otherwise the joint energy E(x, y) = -f(x)[y].
    sampling_energy = generation.sgld_energy_per_row(logits_of)

    def sample(num_samples, n_steps, seed, class_label, step_size, noise_std):
        checks = [
            tf.debugging.assert_greater_equal(num_samples, 1, message="num_samples must be >= 1; got"),
            tf.debugging.assert_less_equal(
                num_samples, max_num_samples, message=f"num_samples must be <= {max_num_samples}; got"),
            tf.debugging.assert_greater_equal(n_steps, 0, message="n_steps must be >= 0; got"),
            tf.debugging.assert_less_equal(n_steps, max_n_steps, message=f"n_steps must be <= {max_n_steps}; got"),
            tf.debugging.assert_greater_equal(class_label, -1, message="class_label must be -1 or a class id; got"),
            tf.debugging.assert_less(class_label, num_classes, message=f"class_label must be < {num_classes}; got"),
            tf.debugging.assert_all_finite(step_size, message="step_size must be finite"),
            tf.debugging.assert_all_finite(noise_std, message="noise_std must be finite"),
            tf.debugging.assert_less_equal(step_size, max_step_size,
                                           message=f"step_size must be <= max_step_size = {max_step_size}; got"),
            tf.debugging.assert_less_equal(noise_std, max_noise_std,
                                           message=f"noise_std must be <= max_noise_std = {max_noise_std}; got"),
        ]
        with tf.control_dependencies(checks):
            num_samples, n_steps, class_label, step_size, noise_std = (
                tf.identity(t) for t in (num_samples, n_steps, class_label, step_size, noise_std))
        step_size = tf.where(step_size > 0, step_size, sampler.step_size)
        noise_std = tf.where(noise_std >= 0, noise_std, sampler.noise_std)
        stateless_seed = tf.stack([seed, tf.constant(0, tf.int64)])  # JEM.sample's seed s is [s, 0] too
        labels = tf.fill([num_samples], class_label)
        # Where training chains start (ReplayBuffer.fresh_chains): the model's class Gaussians (of class_label, or
        # of classes drawn with the class prior) with its share of uniform noise, else uniform noise; its share of
        # flat fields.
        x0 = replay_buffer.fresh_chains(num_samples, stateless_seed, labels=labels)
        samples, _ = sampler.sample(
            sampling_energy, x0, seeds.fold(stateless_seed, seeds.SAMPLE_SGLD),
            context=(labels,), n_steps=n_steps, step_size=step_size, noise_std=noise_std)
        # Clipped to the value range: every sample is a valid input of classify and energy.
        samples = tf.clip_by_value(samples, *value_range)
        return {"samples": samples, "energy": energy_lib.energy(logits_of(samples))}

    module = tf.Module(name="jem_serving")
    # The tf.Variables behind the backbone's Keras variables: saved once, captured by the signatures.
    module.backbone_variables = [variable.value for variable in backbone.variables]
    if scorer.source is not None and any(name.startswith(SOURCE) for name in detector.components):
        # The converted model's detector is (partly) its source classifier's: that network is served too.
        module.source_variables = [variable.value for variable in scorer.source.backbone.variables]
    if replay_buffer.init is not None:  # the class Gaussians the sample signature starts from
        module.chain_init_variables = [variable.value for variable in replay_buffer.init.variables]
    classify_fn = tf.function(classify, input_signature=[images_spec]).get_concrete_function()
    extra = {}
    if uint8_inputs:
        if tuple(value_range) != (-1.0, 1.0):
            raise ValueError(f"`uint8_inputs` needs a model of the value range (-1, 1); received {value_range!r}")

        def classify_uint8(images):
            return classify(tf.cast(images, tf.float32) / 127.5 - 1.0)

        extra["classify_uint8"] = tf.function(classify_uint8, input_signature=[
            tf.TensorSpec([None, *image_shape], tf.uint8, name="images")]).get_concrete_function()
    signatures = {
        "serving_default": classify_fn,
        "classify": classify_fn,
        "energy": tf.function(energy, input_signature=[images_spec]).get_concrete_function(),
        "sample": tf.function(sample, input_signature=[
            tf.TensorSpec([], tf.int32, name="num_samples"),
            tf.TensorSpec([], tf.int32, name="n_steps"),
            tf.TensorSpec([], tf.int64, name="seed"),
            tf.TensorSpec([], tf.int32, name="class_label"),
            tf.TensorSpec([], tf.float32, name="step_size"),
            tf.TensorSpec([], tf.float32, name="noise_std"),
        ]).get_concrete_function(),
    }
    signatures.update(extra)
    return module, signatures


def check_class_names(class_names: Optional[Sequence[str]], num_classes: int) -> Optional[List[str]]:
    """``class_names`` as a list of ``num_classes`` distinct non-empty strings, or ``None``; else a ``ValueError``."""
    if class_names is None:
        return None
    names = list(class_names)
    if (len(names) != num_classes or any(not isinstance(n, str) or not n for n in names)
            or len(set(names)) != len(names)):
        raise ValueError(f"`class_names` must be {num_classes} distinct non-empty strings (one per class); "
                         f"received {class_names!r}")
    return names
