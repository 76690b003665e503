"""The Joint Energy-based Model: any Keras classifier, trained as a classifier and as an EBM."""

from __future__ import annotations

from typing import Optional, Sequence

import keras
import numpy as np
import tensorflow as tf

from jem_tf import keras_workarounds
from jem_tf.data import inputs
from jem_tf.model import energy as energy_lib
from jem_tf.model import generation
from jem_tf.model.chains import TrainingChains
from jem_tf.model.conversion import backbone_from_classifier
from jem_tf.model.jem_arguments import check_compile_arguments, check_jem_arguments
from jem_tf.model.objective import jem_objective
from jem_tf.model.refinement import RefinementSettings
from jem_tf.networks import with_precision
from jem_tf.sampling.chain_init import ClassGaussian
from jem_tf.sampling.replay_buffer import ReplayBuffer
from jem_tf.sampling.sgld import SGLDSampler
from jem_tf.seeds import SeedState


@keras.saving.register_keras_serializable(package="jem_tf")
class JEM(inputs.CheckedInputs, keras.Model):
    """Joint Energy-based Model around a classifier ``backbone`` that outputs logits ``f(x)``.

    ``p(y|x) = softmax(f(x))`` and ``E(x) = -logsumexp_y f(x)[y]``. Each training step minimises
    :func:`jem_tf.model.objective.jem_objective` on noisy data and SGLD chains from a persistent :class:`ReplayBuffer`
    (:mod:`jem_tf.model.chains`); with ``px_weight=0`` and ``pxy_weight=0`` no sampling runs (a plain classifier).
    Images are floats in ``value_range``, labels class ids; a row of ``sample_weight`` 0 is unlabelled and
    trains ``p(x)`` alone (semi-supervised learning).

    Args:
        backbone: A Keras model mapping images to ``[batch, num_classes]`` logits.
        sampler: An :class:`SGLDSampler`. Default: step 1.0, noise 0.01, 20 steps.
        buffer_size: Replay-buffer chains. Default 10,000.
        restart_prob: Probability a drawn chain restarts from the start distribution. Default 0.05.
        class_conditional_buffer: Keep per-class buffer slots. Default: ``pxy_weight > 0``.
        pyx_weight, px_weight, pxy_weight, energy_l2_weight: Weights of the cross-entropy, the contrastive
            ``log p(x)`` and ``log p(x|y)`` terms and the L2 energy regulariser. Defaults 1.0, 1.0, 0.0, 0.0.
        energy_l2_center: The energy the L2 regulariser pulls towards (:mod:`jem_tf.model.objective`). Default 0; for
            a converted classifier, its mean energy on the training data
            (:func:`jem_tf.model.conversion.mean_energy`), as ``--init-from`` runs use.
        energy_l2_samples: Whether the L2 regulariser also pulls the samples' energies (default True, IGEBM's and
            JEM's) or only the data's (:mod:`jem_tf.model.objective`).
        label_smoothing: Share in ``[0, 1)`` of the cross-entropy's target spread over the classes. Default 0.
        data_noise_std: Std of Gaussian noise added to training images. Default 0.03.
        value_range: ``(low, high)`` of images. Default (-1.0, 1.0).
        validate_inputs: Check image range and label ids in every step. Default True.
        seed: Base seed of all training randomness (noise, buffer draws, SGLD). Default 0.
        buffer_storage: ``"float32"`` (default) or ``"uint8"`` (4x smaller; see :class:`ReplayBuffer`).
        image_shape, num_classes: Needed only when the backbone has no static input/output shape.
        chain_init: Where chains start (buffer fill and restarts, :meth:`sample`): ``None`` (uniform noise, the
            paper's JEM) or a fitted :class:`~jem_tf.sampling.chain_init.ClassGaussian` (JEM++). Default ``None``.
        chain_init_uniform_fraction: With ``chain_init``, the share of fresh chains that start from uniform
            noise instead. Default 0.
        chain_init_flat_fraction: The share of fresh chains that start from flat, low-frequency fields
            (:func:`~jem_tf.sampling.chain_init.flat_fields`), with or without ``chain_init``. Default 0.
        energy_start_step: Optimizer step from which the energy terms and SGLD are on. Default 0.
        refinement: The :class:`~jem_tf.model.refinement.RefinementSettings` of :meth:`refine` (usually chosen by
            :func:`jem_tf.evaluation.refinement_choice.choose_refinement`). Default ``None``: see
            :attr:`refinement_settings`.

    Example:
        >>> backbone = jem_tf.networks.small_cnn(num_classes=10, input_shape=(8, 8, 1))
        >>> model = JEM(backbone, buffer_size=1000, seed=0)
        >>> model.compile(optimizer=keras.optimizers.Adam(1e-3))
        >>> model.fit(x_train, y_train, batch_size=64, epochs=1)

    Reference:
        Grathwohl et al., "Your Classifier is Secretly an Energy Based Model and You Should Treat it Like One", 2020.
    """

    def __init__(self, backbone: keras.Model, *, sampler: Optional[SGLDSampler] = None, buffer_size: int = 10_000,
                 restart_prob: float = 0.05, class_conditional_buffer: Optional[bool] = None,
                 pyx_weight: float = 1.0, px_weight: float = 1.0, pxy_weight: float = 0.0,
                 energy_l2_weight: float = 0.0, energy_l2_center: float = 0.0, energy_l2_samples: bool = True,
                 label_smoothing: float = 0.0, data_noise_std: float = 0.03, value_range: Sequence[float] = (-1.0, 1.0),
                 validate_inputs: bool = True, seed: int = 0,
                 buffer_storage: str = "float32", image_shape: Optional[Sequence[int]] = None,
                 num_classes: Optional[int] = None, chain_init: Optional[ClassGaussian] = None,
                 chain_init_uniform_fraction: float = 0.0, chain_init_flat_fraction: float = 0.0,
                 energy_start_step: int = 0,
                 refinement: Optional[RefinementSettings] = None, **kwargs):
        super().__init__(**kwargs)
        args = check_jem_arguments(
            backbone, sampler=sampler, class_conditional_buffer=class_conditional_buffer, pyx_weight=pyx_weight,
            px_weight=px_weight, pxy_weight=pxy_weight, energy_l2_weight=energy_l2_weight,
            energy_l2_center=energy_l2_center, energy_l2_samples=energy_l2_samples, label_smoothing=label_smoothing,
            data_noise_std=data_noise_std, value_range=value_range, seed=seed, energy_start_step=energy_start_step,
            image_shape=image_shape, num_classes=num_classes, refinement=refinement)
        self.backbone, self.sampler, self.refinement = backbone, args.sampler, args.refinement
        self.image_shape, self.num_classes = args.image_shape, args.num_classes
        self.class_conditional_buffer = args.class_conditional_buffer
        self.pyx_weight, self.px_weight, self.pxy_weight = float(pyx_weight), float(px_weight), float(pxy_weight)
        self.energy_l2_weight, self.data_noise_std = float(energy_l2_weight), float(data_noise_std)
        self.energy_l2_center, self.energy_l2_samples = float(energy_l2_center), energy_l2_samples
        self.label_smoothing, self.seed, self.energy_start_step = float(label_smoothing), seed, energy_start_step
        self.value_range, self.validate_inputs = args.value_range, bool(validate_inputs)
        self.replay_buffer = ReplayBuffer(
            image_shape=self.image_shape, size=buffer_size, restart_prob=restart_prob,
            num_classes=self.num_classes if self.class_conditional_buffer else None, value_range=self.value_range,
            seed=seed, storage=buffer_storage, init=chain_init, uniform_fraction=chain_init_uniform_fraction,
            flat_fraction=chain_init_flat_fraction, name="replay_buffer")
        self.loss_tracker = keras.metrics.Mean(name="loss")
        self.ce_tracker = keras.metrics.Mean(name="ce")
        self.accuracy_metric = keras.metrics.SparseCategoricalAccuracy(name="accuracy")
        self.e_data_tracker = keras.metrics.Mean(name="e_data")
        self.e_sample_tracker = keras.metrics.Mean(name="e_sample")
        self.energy_gap_tracker = keras.metrics.Mean(name="energy_gap")
        self.sgld_grad_norm_tracker = keras.metrics.Mean(name="sgld_grad_norm")
        # Largest |x| of the SGLD samples, averaged over steps: samples leaving the data range signal divergence.
        self.sample_abs_max_tracker = keras.metrics.Mean(name="sample_abs_max")
        self.seed_state = SeedState(name="seed_state")
        # Python side effects run only while TensorFlow traces: counts the train step's (re)tracings.
        self.train_step_trace_count = 0
        # sample / refine, with the compiled SGLD they share; the training step's noisy data, chains and forward.
        self._generator = generation.Generator(self)
        self._chains = TrainingChains(self)
        self.build((None,) + self.image_shape)

    @classmethod
    def from_classifier(cls, classifier: keras.Model, *, density_head: int = 0, density_head_layers=(),
                        density_head_offset: str = "free", density_temperature: float = 1.0, **kwargs) -> "JEM":
        """A JEM made from a trained Keras classifier, ready for ``compile`` and ``fit`` (fine-tuning): it trains a copy
        whose softmax head gives its logits (:func:`jem_tf.model.conversion.backbone_from_classifier`, with a warning).

        Args:
            classifier: A trained Functional or Sequential Keras classifier ``[batch, H, W, C] ->
                [batch, num_classes]`` (logits or softmax probabilities); a subclassed one must end in logits.
            density_head: 0 (default) trains the classifier's weights; ``N > 0`` keeps them fixed and trains an
                energy offset of ``N`` hidden units instead, so ``p(y|x)`` stays exactly the classifier's
                (:func:`jem_tf.model.heads.with_density_head`).
            density_head_layers: Names of the classifier's earlier layers the density head reads as well (their
                per-channel means and standard deviations), e.g. ``["stem_act"]``.
            density_head_offset: ``"free"`` (default) or ``"nonpositive"``: an offset ``g(x) <= 0`` that can only
                make an input less likely than the classifier's ``logsumexp`` has it.
            density_temperature: The density's own temperature ``tau``: ``log p(x) = logsumexp(f / tau) + g(x)``,
                ``p(y|x) = softmax(f)`` unchanged. Default 1.
            **kwargs: The :class:`JEM` arguments (``sampler``, ``chain_init``, ``px_weight``, ...).

        Example:
            >>> jem = JEM.from_classifier(my_trained_cnn, chain_init=ClassGaussian.fit(x, y, num_classes=10))
            >>> jem.compile(optimizer=keras.optimizers.Adam(1e-4))
        """
        backbone = backbone_from_classifier(classifier, image_shape=kwargs.get("image_shape"),
                                            num_classes=kwargs.get("num_classes"), density_head=density_head,
                                            density_head_layers=density_head_layers,
                                            density_head_offset=density_head_offset,
                                            density_temperature=density_temperature, seed=kwargs.get("seed"))
        return cls(backbone, **kwargs)

    # ----------------------------------------------------------------------------- model API
    @property
    def buffer_size(self) -> int:
        """Number of replay-buffer chains (held by :attr:`replay_buffer`)."""
        return self.replay_buffer.size

    @property
    def restart_prob(self) -> float:
        """Probability that a drawn chain restarts (held by :attr:`replay_buffer`)."""
        return self.replay_buffer.restart_prob

    @property
    def samples_contrastive(self) -> bool:
        """Whether training runs SGLD (a JEM) or not (a plain classifier)."""
        return self.px_weight > 0 or self.pxy_weight > 0

    @property
    def metrics(self):
        """The metrics Keras logs and resets: the JEM's own (those of :meth:`test_step` and, when sampling, the
        chains') and those given to :meth:`compile`."""
        metrics = self._test_metrics
        if self.samples_contrastive:
            metrics += [self.e_sample_tracker, self.energy_gap_tracker, self.sgld_grad_norm_tracker,
                        self.sample_abs_max_tracker]
        return metrics

    @property
    def _test_metrics(self):
        compiled = keras_workarounds.compiled_metrics(self)
        return ([self.loss_tracker, self.ce_tracker, self.accuracy_metric, self.e_data_tracker]
                + ([] if compiled is None else [compiled]))

    def build(self, input_shape):
        if not self.backbone.built:
            self.backbone.build(input_shape)
        self.built = True

    def call(self, inputs, training=False):
        """Returns the backbone's logits ``f(x)``."""
        return self.backbone(inputs, training=training)

    @property
    def chain_init(self) -> Optional[ClassGaussian]:
        """The class Gaussians chains start from, or ``None`` for uniform noise."""
        return self.replay_buffer.init

    def logits(self, x, training=False):
        """float32 logits ``f(x)`` (mixed-precision backbones may compute in 16 bits)."""
        return tf.cast(self.backbone(x, training=training), tf.float32)

    def energy(self, x, *, batch_size: int = 256) -> np.ndarray:
        """``E(x) = -logsumexp_y f(x)[y]`` of images ``x`` ``[N, *image_shape]`` (array or tensor), in batches of
        ``batch_size``, in inference mode: a float32 numpy array ``[N]``. In a ``tf.function`` use
        ``jem_tf.model.energy.energy(model.logits(x))``."""
        return -self.log_px(x, batch_size=batch_size)

    def log_px(self, x, *, batch_size: int = 256) -> np.ndarray:
        """Unnormalised ``log p(x) = logsumexp_y f(x)[y]`` of images ``x``, batched like :meth:`energy`; a
        float32 numpy array ``[N]``. Inside a ``tf.function`` use ``jem_tf.model.energy.log_px(model.logits(x))``."""
        logits = self.predict(x, batch_size=batch_size, verbose=0)
        return energy_lib.log_px(tf.constant(logits, tf.float32)).numpy()

    # ----------------------------------------------------------------------------- Keras's model API
    def summary(self, *args, print_fn=None, **kwargs):
        """``keras.Model.summary``, then a line that tells the replay buffer apart from the network's weights: Keras
        counts its chains as non-trainable parameters, but they are the sampler's state (saved with the model,
        not part of the network or of any export)."""
        super().summary(*args, print_fn=print_fn, **kwargs)
        (print_fn or print)(f" Of the non-trainable params, {self.replay_buffer.describe()}; the network has "
                            f"{self.backbone.count_params():,} params.")

    def export(self, filepath, format="tf_saved_model", verbose=None, input_signature=None, **kwargs):
        """``keras.Model.export`` of the network's forward pass (the logits, as :meth:`predict`): the backbone in
        float32 (as :func:`jem_tf.serving.export_saved_model` serves it), with the input signature ``[None,
        *image_shape]`` float32 by default. The replay buffer and optimizer are training state and not exported.
        For TensorFlow Serving with the ``classify``, ``energy`` and ``sample`` signatures use
        ``python -m jem_tf.export`` / :func:`jem_tf.serving.export_saved_model`."""
        if input_signature is None:
            input_signature = [keras.InputSpec(shape=(None, *self.image_shape), dtype="float32")]
        network = with_precision(self.backbone, "float32")
        return network.export(filepath, format=format, verbose=verbose, input_signature=input_signature, **kwargs)

    # ----------------------------------------------------------------------------- compile
    def compile(self, optimizer="adam", loss=None, metrics=None, *, jit_compile=False, **kwargs):
        """``keras.Model.compile`` for a JEM, whose loss is its own (:func:`~jem_tf.model.objective.jem_objective`):
        passing ``loss`` or ``loss_weights`` is an error. It always logs ``loss, ce, accuracy, e_data`` and, when
        sampling, ``e_sample, energy_gap, sgld_grad_norm, sample_abs_max``; ``metrics`` and ``weighted_metrics`` (any
        Keras metrics, e.g. ``["sparse_top_k_categorical_accuracy"]``) are computed on the classifier's logits (what
        :meth:`predict` returns: use ``from_logits=True`` metrics for probabilities) of the training batch (the
        noised data) and of the evaluation data. ``jit_compile`` (XLA for the whole step) defaults to ``False`` on
        every device, unlike Keras's ``"auto"``; ``True`` or ``"auto"`` are honoured, with the same input checks
        (see docs/python.md, XLA)."""
        check_compile_arguments(loss=loss, jit_compile=jit_compile, **kwargs)
        super().compile(optimizer=optimizer, metrics=metrics, jit_compile=jit_compile, **kwargs)

    def compile_from_config(self, config):
        """Recompiles a loaded model with its saved compile settings (through :meth:`compile`)."""
        self.compile(**keras.saving.deserialize_keras_object(config))
        if self.built:
            self.optimizer.build(self.trainable_variables)

    # ----------------------------------------------------------------------------- training
    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        # Overrides a private Keras hook (keras-team/keras#20585): see keras_workarounds.build_for_distributed_fit.
        keras_workarounds.build_for_distributed_fit(self)

    def reseed(self) -> int:
        """Moves training onto fresh random numbers (data noise, buffer draws, SGLD); returns the new
        reseed count. Used after a divergence rollback."""
        self.seed_state.reseeds.assign_add(1)
        return int(self.seed_state.reseeds.numpy())

    def train_step(self, data):
        """One JEM step on a batch ``(images, labels[, sample_weight])``: 1. **sample** the noisy data and
        the SGLD chains (:meth:`jem_tf.model.chains.TrainingChains.sample`); 2. **forward** them; 3. **loss**:
        :func:`jem_tf.model.objective.jem_objective` plus the backbone's own losses, scaled for the number of replicas;
        4. **apply** one optimizer step (the samples are constants); 5. **track** the metrics Keras logs."""
        self.train_step_trace_count += 1
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        x, y = inputs.prepare_model_batch(self, x, y)
        if sample_weight is not None:
            sample_weight = tf.reshape(tf.cast(sample_weight, tf.float32), [-1])

        # 1. Sample.
        batch = self._chains.sample(x, y, sample_weight)
        with tf.GradientTape() as tape:
            # 2. Forward.
            logits = self._chains.forward(batch)
            # 3. Loss.
            terms = jem_objective(
                y, logits.data, logits_sample=logits.sample, logits_conditional_sample=logits.conditional_sample,
                sample_weight=sample_weight,
                pyx_weight=self.pyx_weight, px_weight=self.px_weight, pxy_weight=self.pxy_weight,
                energy_l2_weight=self.energy_l2_weight, energy_l2_center=self.energy_l2_center,
                energy_l2_samples=self.energy_l2_samples, energy_active=self._chains.energy_active(),
                label_smoothing=self.label_smoothing)
            loss = terms.loss
            if self.backbone.losses:
                loss += tf.add_n([tf.cast(term, tf.float32) for term in self.backbone.losses])
            # Gradients are summed over replicas: each replica's loss is divided by their number, as Keras does.
            replicas = tf.distribute.get_strategy().num_replicas_in_sync
            scaled_loss = self.optimizer.scale_loss(loss / replicas)

        # 4. Apply.
        variables = self.trainable_variables
        gradients = tape.gradient(scaled_loss, variables)
        self.optimizer.apply(gradients, variables)

        # 5. Track.
        self.loss_tracker.update_state(loss)
        self.ce_tracker.update_state(terms.ce)
        self.accuracy_metric.update_state(y, logits.data, sample_weight=sample_weight)
        self.e_data_tracker.update_state(terms.e_data)
        if self.px_weight > 0:
            self.e_sample_tracker.update_state(terms.e_sample)
            self.energy_gap_tracker.update_state(terms.energy_gap)
        if batch.chains:
            self.sample_abs_max_tracker.update_state(tf.reduce_max(tf.abs(tf.concat(batch.chains, axis=0))))
        if batch.grad_norms:
            self.sgld_grad_norm_tracker.update_state(tf.concat(batch.grad_norms, axis=0))
        self._update_compiled_metrics(y, logits.data, sample_weight)
        return keras_workarounds.step_logs(self.metrics)

    def _update_compiled_metrics(self, y, logits, sample_weight):
        compiled = keras_workarounds.compiled_metrics(self)
        if compiled is not None:
            compiled.update_state(y, logits, sample_weight)

    def test_step(self, data):
        """Cross-entropy, accuracy and mean energy of clean (noise-free) data."""
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        x, y = inputs.prepare_model_batch(self, x, y)
        logits = self.logits(x, training=False)
        ce = keras.losses.sparse_categorical_crossentropy(y, logits, from_logits=True)
        self.loss_tracker.update_state(ce, sample_weight=sample_weight)
        self.ce_tracker.update_state(ce, sample_weight=sample_weight)
        self.accuracy_metric.update_state(y, logits, sample_weight=sample_weight)
        self.e_data_tracker.update_state(energy_lib.energy(logits))
        self._update_compiled_metrics(y, logits, sample_weight)
        return keras_workarounds.step_logs(self._test_metrics)

    def predict_step(self, data):
        x, _, _ = keras.utils.unpack_x_y_sample_weight(data)
        return self.logits(x, training=False)

    # ----------------------------------------------------------------------------- sampling
    def sample(self, num_samples: int, *, seed: int = 0, n_steps: Optional[int] = None, labels=None,
               init: str = "default", step_size: Optional[float] = None,
               noise_std: Optional[float] = None) -> np.ndarray:
        """Draws samples with SGLD, unconditionally or from ``p(x|y)`` when ``labels`` is given: a numpy array
        ``[num_samples, *image_shape]``.

        Args:
            num_samples: Number of samples.
            seed: Seed; the same seed gives the same samples. Default 0.
            n_steps: SGLD steps. Default: the sampler's.
            labels: Optional int class ids ``[num_samples]`` for conditional sampling.
            init: ``"default"`` (the model's start distribution: its class Gaussians when it has them, else
                uniform noise), ``"uniform"`` (noise on ``value_range``), ``"class_gaussian"`` (of ``labels``, else
                of classes drawn with the prior) or ``"buffer"`` (replay-buffer chains, left unchanged).
            step_size, noise_std: Optional overrides of the sampler's settings.
        """
        return self._generator.sample(num_samples, seed=seed, n_steps=n_steps, labels=labels, init=init,
                                      step_size=step_size, noise_std=noise_std)

    @property
    def refinement_settings(self) -> RefinementSettings:
        """The settings :meth:`refine` uses by default: :attr:`refinement` when chosen, else the training
        sampler's (step size, noise, gradient clamp) with 10 steps."""
        return self.refinement if self.refinement is not None else RefinementSettings.from_sampler(
            self.sampler, n_steps=10, source="the training sampler's settings (no refinement chosen for this model)")

    def refine(self, images, *, n_steps: Optional[int] = None, seed: int = 0, labels=None,
               step_size: Optional[float] = None, noise_std: Optional[float] = None, settings=None) -> np.ndarray:
        """SGLD on ``log p(x)`` (or ``log p(x|y)`` with ``labels``) starting at ``images``: the paper's
        test-time refinement of inputs before classifying. Returns the refined images as a numpy array (in the
        value range, unless ``settings="sampler"`` and the sampler does not clamp).

        Args:
            images: ``[N, *image_shape]`` images in the model's value range.
            n_steps: SGLD steps (0 returns the images unchanged). Default: the settings'.
            seed: Seed of the SGLD noise; the same seed gives the same result.
            labels: Optional int class ids ``[N]`` for class-conditional refinement.
            step_size, noise_std: Optional overrides of the settings.
            settings: ``None`` (default: :attr:`refinement_settings`, the chosen ones), a
                :class:`~jem_tf.model.refinement.RefinementSettings`, or ``"sampler"``: the training sampler itself
                (its clamps too; for continuing sampling chains).
        """
        return self._generator.refine(images, n_steps=n_steps, seed=seed, labels=labels, step_size=step_size,
                                      noise_std=noise_std, settings=settings)

    # ----------------------------------------------------------------------------- config
    def get_config(self) -> dict:
        config = super().get_config()
        serialize = keras.saving.serialize_keras_object
        config.update({
            "backbone": serialize(self.backbone), "sampler": serialize(self.sampler),
            "buffer_size": self.buffer_size, "restart_prob": self.restart_prob,
            "class_conditional_buffer": self.class_conditional_buffer,
            "pyx_weight": self.pyx_weight, "px_weight": self.px_weight, "pxy_weight": self.pxy_weight,
            "energy_l2_weight": self.energy_l2_weight, "energy_l2_center": self.energy_l2_center,
            "energy_l2_samples": self.energy_l2_samples, "label_smoothing": self.label_smoothing,
            "data_noise_std": self.data_noise_std,
            "value_range": list(self.value_range), "validate_inputs": self.validate_inputs, "seed": self.seed,
            "buffer_storage": self.replay_buffer.storage, "image_shape": list(self.image_shape),
            "num_classes": self.num_classes,
            "chain_init": None if self.chain_init is None else serialize(self.chain_init),
            "chain_init_uniform_fraction": self.replay_buffer.uniform_fraction,
            "chain_init_flat_fraction": self.replay_buffer.flat_fraction,
            "energy_start_step": self.energy_start_step,
            "refinement": None if self.refinement is None else serialize(self.refinement),
        })
        return config

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        for key in ("backbone", "sampler", "refinement", "chain_init"):
            if key in ("backbone", "sampler") or config.get(key) is not None:
                config[key] = keras.saving.deserialize_keras_object(config[key], custom_objects=custom_objects)
        return cls(**config)
