"""The Joint Energy-based Model: any Keras classifier, trained as a classifier and as an EBM."""

from __future__ import annotations

import warnings
from typing import Optional, Sequence

import keras
import numpy as np
import tensorflow as tf

from jem_tf import energy as energy_lib
from jem_tf import generation, inputs, keras_workarounds, seeds
from jem_tf.chain_init import ClassGaussian
from jem_tf.conversion import logits_network, softmax_head
from jem_tf.distribution import global_batch_position, replica_random
from jem_tf.objective import jem_objective
from jem_tf.refinement import RefinementSettings
from jem_tf.replay_buffer import ReplayBuffer
from jem_tf.seeds import SeedState
from jem_tf.sgld import SGLDSampler


@keras.saving.register_keras_serializable(package="jem_tf")
class JEM(keras.Model):
    """Joint Energy-based Model around a classifier ``backbone`` that outputs logits.

    ``p(y|x) = softmax(f(x))`` and ``E(x) = -logsumexp_y f(x)[y]``. Each training step minimises
    :func:`jem_tf.objective.jem_objective`::

        pyx_weight * CE(f(x_data), y)
      + px_weight  * (mean E(x_data) - mean E(x_sample))              # contrastive log p(x)
      + pxy_weight * (mean E(x_data, y) - mean E(x_sample|y, y))       # optional log p(x|y)
      + energy_l2_weight * (mean E(x_data)^2 + mean E(x_sample)^2)     # optional regulariser

    where ``x_data`` is the batch plus Gaussian noise ``data_noise_std`` and ``x_sample`` comes from
    SGLD (``sampler``, run with ``training=False``) started from a persistent :class:`ReplayBuffer`.
    With ``px_weight=0`` and ``pxy_weight=0`` no sampling runs: a plain classifier, for baselines.

    Images are ``[batch, height, width, channels]`` floats in ``value_range`` (default [-1, 1]);
    labels are class ids in ``[0, num_classes)``. ``fit``'s ``sample_weight`` weights the label terms (the
    cross-entropy and the conditional term) only: a row of weight 0 is *unlabelled* and trains ``p(x)``
    alone (semi-supervised learning; see :func:`jem_tf.data.make_semi_supervised_dataset`). Learning-rate
    warm-up belongs to the optimizer (see :class:`jem_tf.schedules.WarmupPiecewiseSchedule`).

    Args:
        backbone: A Keras model mapping images to ``[batch, num_classes]`` logits.
        sampler: An :class:`SGLDSampler` (default: step 1.0, noise 0.01, 20 steps).
        buffer_size: Replay-buffer chains. Default 10,000.
        restart_prob: Probability a drawn chain restarts from uniform noise. Default 0.05.
        class_conditional_buffer: Keep per-class buffer slots. Default: ``pxy_weight > 0``.
        pyx_weight: Weight of the cross-entropy term. Default 1.0.
        px_weight: Weight of the contrastive ``log p(x)`` term. Default 1.0.
        pxy_weight: Weight of the contrastive ``log p(x|y)`` term. Default 0.0.
        energy_l2_weight: Weight of the L2 energy regulariser. Default 0.0.
        data_noise_std: Std of Gaussian noise added to training images. Default 0.03.
        value_range: ``(low, high)`` of images. Default (-1.0, 1.0).
        validate_inputs: Check image range and label ids in every step. Default True.
        seed: Base seed of all training randomness (noise, buffer draws, SGLD). Default 0.
        buffer_storage: ``"float32"`` (default) or ``"uint8"`` (4x smaller buffer; see
            :class:`ReplayBuffer`).
        image_shape, num_classes: Needed only when the backbone has no static input/output shape.
        chain_init: Where SGLD chains start: ``None`` (uniform noise on ``value_range``, the paper's JEM)
            or a fitted :class:`~jem_tf.chain_init.ClassGaussian` (JEM++'s informative initialisation):
            the replay buffer's fill and restarts, and :meth:`sample`'s default start. Saved with the
            model.
        chain_init_uniform_fraction: With ``chain_init``, the share of the buffer's fresh chains (fill and
            restarts) that start from uniform noise instead (see :class:`ReplayBuffer`). Default 0.
        energy_start_step: Optimizer step from which the energy terms and SGLD are on (a classifier warm
            start before it). Default 0.
        refinement: The :class:`~jem_tf.refinement.RefinementSettings` of :meth:`refine` (test-time
            refinement), saved with the model; usually chosen on the validation split by
            :func:`jem_tf.refinement.choose_refinement` (training does it). Default ``None``: none chosen,
            :meth:`refine` falls back to the training sampler's settings with 10 steps.

    Example:
        >>> backbone = jem_tf.networks.small_cnn(num_classes=10, input_shape=(8, 8, 1))
        >>> model = JEM(backbone, buffer_size=1000, seed=0)
        >>> model.compile(optimizer=keras.optimizers.Adam(1e-3))
        >>> model.fit(x_train, y_train, batch_size=64, epochs=1)

    Reference:
        Grathwohl et al., "Your Classifier is Secretly an Energy Based Model and You Should Treat
        it Like One", ICLR 2020.
    """

    def __init__(
        self,
        backbone: keras.Model,
        *,
        sampler: Optional[SGLDSampler] = None,
        buffer_size: int = 10_000,
        restart_prob: float = 0.05,
        class_conditional_buffer: Optional[bool] = None,
        pyx_weight: float = 1.0,
        px_weight: float = 1.0,
        pxy_weight: float = 0.0,
        energy_l2_weight: float = 0.0,
        data_noise_std: float = 0.03,
        value_range: Sequence[float] = (-1.0, 1.0),
        validate_inputs: bool = True,
        seed: int = 0,
        buffer_storage: str = "float32",
        image_shape: Optional[Sequence[int]] = None,
        num_classes: Optional[int] = None,
        chain_init: Optional[ClassGaussian] = None,
        chain_init_uniform_fraction: float = 0.0,
        energy_start_step: int = 0,
        refinement: Optional[RefinementSettings] = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if keras.backend.backend() != "tensorflow":
            raise ValueError(f"jem-tf needs Keras's TensorFlow backend; this Keras uses {keras.backend.backend()!r} "
                             "(set KERAS_BACKEND=tensorflow before importing keras).")
        if not isinstance(backbone, keras.Model):
            raise ValueError(f"`backbone` must be a keras.Model returning logits; received {backbone!r}")
        head = softmax_head(backbone)
        if head is not None:
            raise ValueError(f"The backbone ends in a softmax ({head}): a JEM needs the logits f(x) (its energies "
                             "-logsumexp f(x) would be meaningless on probabilities). Remove the softmax "
                             "(activation=None on the last layer), or convert the classifier with "
                             "JEM.from_classifier, which takes its logits.")
        if image_shape is None:
            image_shape = inputs.static_shape_tuple(getattr(backbone, "input_shape", None) and backbone.input_shape[1:])
        if num_classes is None and getattr(backbone, "output_shape", None) is not None:
            num_classes = backbone.output_shape[-1]
        if image_shape is None or num_classes is None:
            declared = getattr(backbone, "input_shape", None) if backbone.built or hasattr(backbone, "inputs") else None
            raise ValueError(
                "Could not infer `image_shape`/`num_classes` from the backbone (its input shape "
                f"{declared!r} must be static: the replay buffer holds images of one size); build it with a "
                "fixed input shape or pass them explicitly "
                f"(received image_shape={image_shape!r}, num_classes={num_classes!r})."
            )
        for name, weight in [("pyx_weight", pyx_weight), ("px_weight", px_weight),
                             ("pxy_weight", pxy_weight), ("energy_l2_weight", energy_l2_weight),
                             ("data_noise_std", data_noise_std)]:
            if not (isinstance(weight, (int, float)) and np.isfinite(weight) and weight >= 0):
                raise ValueError(f"`{name}` must be a finite number >= 0; received {name}={weight!r}")
        if sampler is None:
            sampler = SGLDSampler()
        elif isinstance(sampler, dict):
            sampler = keras.saving.deserialize_keras_object(sampler)
        if not isinstance(sampler, SGLDSampler):
            raise ValueError(f"`sampler` must be an SGLDSampler; received {sampler!r}")
        value_range = tuple(float(v) for v in value_range)
        if len(value_range) != 2 or not value_range[0] < value_range[1]:
            raise ValueError(f"`value_range` must be (low, high) with low < high; received {value_range!r}")
        if not isinstance(seed, int):
            raise ValueError(f"`seed` must be an int; received seed={seed!r}")
        if not (isinstance(energy_start_step, int) and energy_start_step >= 0):
            raise ValueError(f"`energy_start_step` must be an int >= 0; received {energy_start_step!r}")
        if class_conditional_buffer is None:
            class_conditional_buffer = pxy_weight > 0
        if pxy_weight > 0 and not class_conditional_buffer:
            raise ValueError("`pxy_weight` > 0 needs `class_conditional_buffer=True`.")

        if isinstance(refinement, dict):
            refinement = keras.saving.deserialize_keras_object(refinement)
        if refinement is not None and not isinstance(refinement, RefinementSettings):
            raise ValueError(f"`refinement` must be None or RefinementSettings; received {refinement!r}")

        self.backbone = backbone
        self.sampler = sampler
        self.refinement = refinement
        self.image_shape = tuple(int(d) for d in image_shape)
        self.num_classes = int(num_classes)
        self.class_conditional_buffer = bool(class_conditional_buffer)
        self.pyx_weight = float(pyx_weight)
        self.px_weight = float(px_weight)
        self.pxy_weight = float(pxy_weight)
        self.energy_l2_weight = float(energy_l2_weight)
        self.data_noise_std = float(data_noise_std)
        self.value_range = value_range
        self.validate_inputs = bool(validate_inputs)
        self.seed = seed
        self.energy_start_step = energy_start_step
        self.replay_buffer = ReplayBuffer(
            image_shape=self.image_shape,
            size=buffer_size,
            restart_prob=restart_prob,
            num_classes=self.num_classes if self.class_conditional_buffer else None,
            value_range=value_range,
            seed=seed,
            storage=buffer_storage,
            init=chain_init,
            uniform_fraction=chain_init_uniform_fraction,
            name="replay_buffer",
        )
        # Batch norm statistics must never see SGLD samples, so with batch norm the data and the
        # samples take separate forward passes; without it one concatenated pass is cheaper.
        self._has_batch_norm = any(
            isinstance(layer, keras.layers.BatchNormalization) for layer in keras_workarounds.all_layers(backbone)
        )
        self.loss_tracker = keras.metrics.Mean(name="loss")
        self.ce_tracker = keras.metrics.Mean(name="ce")
        self.accuracy_metric = keras.metrics.SparseCategoricalAccuracy(name="accuracy")
        self.e_data_tracker = keras.metrics.Mean(name="e_data")
        self.e_sample_tracker = keras.metrics.Mean(name="e_sample")
        self.energy_gap_tracker = keras.metrics.Mean(name="energy_gap")
        self.sgld_grad_norm_tracker = keras.metrics.Mean(name="sgld_grad_norm")
        # Largest |x| of the SGLD samples, averaged over steps: samples leaving the data range signal
        # a diverging sampler.
        self.sample_abs_max_tracker = keras.metrics.Mean(name="sample_abs_max")
        self.seed_state = SeedState(name="seed_state")
        # Python side effects run only while TensorFlow traces: counts the train step's (re)tracings.
        self.train_step_trace_count = 0
        # sample / refine, with the compiled SGLD they share, and the energy of every SGLD chain (training's too).
        self._generator = generation.Generator(self)
        self.build((None,) + self.image_shape)

    @classmethod
    def from_classifier(cls, classifier: keras.Model, **kwargs) -> "JEM":
        """A JEM made from a trained Keras classifier, ready for ``compile`` and ``fit`` (fine-tuning).

        The JEM trains a copy of ``classifier`` (weights copied exactly; your model is never changed). A
        classifier that ends in a softmax gives its logits (the pre-softmax output of the last layer; see
        :func:`jem_tf.conversion.logits_network`): ``p(y|x)`` stays the same, and a ``UserWarning`` says
        what was changed. Nothing else carries over: the optimizer state is the new ``compile``'s, and the
        replay buffer starts from ``chain_init`` (or uniform noise).

        Args:
            classifier: A trained Functional or Sequential Keras classifier ``[batch, H, W, C] ->
                [batch, num_classes]`` (logits or softmax probabilities); a subclassed one must end in logits.
            **kwargs: The :class:`JEM` arguments (``sampler``, ``chain_init``, ``px_weight``, ...).

        Example:
            >>> jem = JEM.from_classifier(my_trained_cnn, chain_init=ClassGaussian.fit(x, y, num_classes=10),
            ...                           sampler=SGLDSampler(n_steps=5, noise_std=0.0, grad_clamp=1.0))
            >>> jem.compile(optimizer=keras.optimizers.Adam(1e-4))
            >>> jem.fit(x, y, epochs=2)
        """
        backbone, changes = logits_network(classifier, image_shape=kwargs.get("image_shape"),
                                           num_classes=kwargs.get("num_classes"))
        if changes:
            warnings.warn(f"JEM.from_classifier: {'; '.join(changes)}.", UserWarning, stacklevel=2)
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
        metrics = [self.loss_tracker, self.ce_tracker, self.accuracy_metric, self.e_data_tracker]
        if self.samples_contrastive:
            metrics += [self.e_sample_tracker, self.energy_gap_tracker, self.sgld_grad_norm_tracker,
                        self.sample_abs_max_tracker]
        return metrics

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
        """``E(x) = -logsumexp_y f(x)[y]`` of images ``x`` (numpy array or tensor ``[N, *image_shape]``), in
        batches of ``batch_size`` and in inference mode, as a float32 numpy array ``[N]`` (like
        ``predict``). Inside a ``tf.function`` use ``jem_tf.energy.energy(model.logits(x))``."""
        return -self.log_px(x, batch_size=batch_size)

    def log_px(self, x, *, batch_size: int = 256) -> np.ndarray:
        """Unnormalised ``log p(x) = logsumexp_y f(x)[y]`` of images ``x``, batched like :meth:`energy`; a
        float32 numpy array ``[N]``. Inside a ``tf.function`` use ``jem_tf.energy.log_px(model.logits(x))``."""
        logits = self.predict(x, batch_size=batch_size, verbose=0)
        return energy_lib.log_px(tf.constant(logits, tf.float32)).numpy()

    # ----------------------------------------------------------------------------- randomness
    def _step_seed(self, salt: int) -> tf.Tensor:
        """The training stream ``salt`` at the current optimizer step (:func:`jem_tf.seeds.step_seed`):
        reproducible and resumable, the same on every replica."""
        return seeds.step_seed(self.seed, self.seed_state.reseeds.value, self.optimizer.iterations, salt)

    def reseed(self) -> int:
        """Moves training onto fresh random numbers (data noise, buffer draws, SGLD); returns the new
        reseed count. Used after a divergence rollback."""
        self.seed_state.reseeds.assign_add(1)
        return int(self.seed_state.reseeds.numpy())

    # ----------------------------------------------------------------------------- compile
    def compile(self, optimizer="adam", loss=None, metrics=None, *, jit_compile=False, **kwargs):
        """``keras.Model.compile`` for a JEM.

        The loss is JEM's own (:func:`jem_tf.objective.jem_objective`) and so are the metrics (``loss, ce,
        accuracy, e_data`` and, when sampling, ``e_sample, energy_gap, sgld_grad_norm, sample_abs_max``):
        passing ``loss``, ``loss_weights``, ``metrics`` or ``weighted_metrics`` is an error rather than being
        ignored.

        ``jit_compile`` (XLA for the whole train/test/predict step) defaults to ``False`` on every device,
        unlike Keras's ``"auto"`` (which turns XLA on when a GPU is present): on CPU XLA made a small JEM step
        about 3x slower, and on GPU it is unmeasured here (``bench/gpu.sh`` times both). ``True`` or ``"auto"``
        are honoured. The input checks hold in every mode: XLA drops TensorFlow's in-graph ``Assert`` ops,
        so under XLA :meth:`fit` and :meth:`evaluate` check ``tf.data`` inputs in the input pipeline instead
        (numpy inputs are checked eagerly either way; ``predict`` returns logits of any input, as before).
        """
        for name, value in (("loss", loss), ("metrics", metrics), ("loss_weights", kwargs.get("loss_weights")),
                            ("weighted_metrics", kwargs.get("weighted_metrics"))):
            if value is not None:
                raise ValueError(
                    f"JEM.compile does not take `{name}`: the JEM objective is the loss, and the logged metrics are "
                    "loss, ce, accuracy, e_data (+ e_sample, energy_gap, sgld_grad_norm, sample_abs_max); compute "
                    f"other metrics from model.predict(x) (logits). Received {name}={value!r}")
        if jit_compile not in (True, False, "auto"):
            raise ValueError(f"`jit_compile` must be True, False or 'auto'; received {jit_compile!r}")
        super().compile(optimizer=optimizer, jit_compile=jit_compile, **kwargs)

    def compile_from_config(self, config):
        """Recompiles a loaded model with its saved compile settings (through :meth:`compile`)."""
        self.compile(**keras.saving.deserialize_keras_object(config))
        if self.built:
            self.optimizer.build(self.trainable_variables)

    # ----------------------------------------------------------------------------- input checks (jem_tf.inputs)
    def _prepare_batch(self, x, y):
        """Checks shapes statically and values in-graph; returns float32 images, int32 labels."""
        return inputs.prepare_batch(x, y, image_shape=self.image_shape, num_classes=self.num_classes,
                                    value_range=self.value_range, validate=self.validate_inputs)

    def check_arrays(self, x, y=None) -> None:
        """Eagerly checks numpy images/labels, raising ``ValueError`` naming the bad value."""
        inputs.check_arrays(x, y, image_shape=self.image_shape, num_classes=self.num_classes,
                            value_range=self.value_range)

    def fit(self, x=None, y=None, *args, **kwargs):
        """``keras.Model.fit``; numpy inputs are checked first (see :meth:`check_arrays`), and so are tensors
        under XLA; ``tf.data`` inputs in the compiled step (or, under XLA, in the input pipeline): see
        :func:`jem_tf.inputs.fit_inputs`."""
        x, kwargs = inputs.fit_inputs(self, x, y, kwargs)
        return super().fit(x, y, *args, **kwargs)

    def evaluate(self, x=None, y=None, *args, **kwargs):
        """``keras.Model.evaluate`` with the same input checks as :meth:`fit`."""
        return super().evaluate(inputs.evaluate_inputs(self, x, y), y, *args, **kwargs)

    def train_on_batch(self, x, y=None, *args, **kwargs):
        """``keras.Model.train_on_batch``; under XLA the batch is checked eagerly first (the compiled step drops
        the in-graph checks that hold without XLA)."""
        inputs.check_batch(self, x, y)
        return super().train_on_batch(x, y, *args, **kwargs)

    def test_on_batch(self, x, y=None, *args, **kwargs):
        """``keras.Model.test_on_batch`` with the same input checks as :meth:`train_on_batch`."""
        inputs.check_batch(self, x, y)
        return super().test_on_batch(x, y, *args, **kwargs)

    # ----------------------------------------------------------------------------- training
    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        # Overrides a private Keras hook (keras-team/keras#20585): see keras_workarounds.build_for_distributed_fit.
        keras_workarounds.build_for_distributed_fit(self)

    def _forward(self, inputs, sizes):
        """Logits of several input groups, in one pass unless the backbone has batch norm."""
        if self._has_batch_norm:
            return [self.logits(inputs[0], training=True)] + [
                self.logits(x, training=False) for x in inputs[1:]
            ]
        logits = self.logits(tf.concat(inputs, axis=0), training=True)
        return tf.split(logits, sizes, axis=0)

    def _energy_terms_active(self):
        """``None`` when the energy terms are on from the first step, else a boolean tensor: whether the
        optimizer step has reached ``energy_start_step``."""
        if self.energy_start_step == 0:
            return None
        return self.optimizer.iterations >= self.energy_start_step

    def _px_chain_count(self, batch_size, position, sample_weight):
        """``(count, position)`` of the p(x) chains: one per row, or, in a semi-supervised batch (rows of weight
        0 next to labelled rows), one per unlabelled row: the labelled rows feed the cross-entropy and are
        already among the unlabelled images of an epoch, so chains for them would only add cost."""
        if sample_weight is None or getattr(self, "jit_compile", False):
            return batch_size, position  # (XLA needs a static chain count.)
        unlabelled = tf.reduce_sum(tf.cast(tf.equal(sample_weight, 0.0), tf.int32))
        count = tf.where(unlabelled > 0, unlabelled, batch_size)
        return count, global_batch_position(count)

    def _run_chains(self, batch_size, position, draw_salt, sgld_salt, labels=None, labelled=None):
        """SGLD chains drawn from the replay buffer (of class ``labels[i]`` for row ``i`` when given) and written
        back; ``labelled`` (bool ``[batch]``): the rows whose chains are written back (the others are discarded)."""
        draw = self.replay_buffer.draw(batch_size, self._step_seed(draw_salt), labels=labels, position=position)
        context = () if labels is None else (labels,)
        active = self._energy_terms_active()
        # Before energy_start_step the chains take no SGLD step (the loop runs zero times).
        n_steps = None if active is None else tf.where(active, self.sampler.n_steps, 0)
        samples, diagnostics = self.sampler.sample(
            self._generator.energy, draw.x, self._step_seed(sgld_salt), context=context, position=position,
            n_steps=n_steps,
        )
        self.replay_buffer.update(draw.indices, samples, keep=labelled)
        return samples, diagnostics

    def train_step(self, data):
        """One JEM step on a batch ``(images, labels[, sample_weight])``:

        1. **sample**: noise the data (``data_noise_std``); draw chains from the replay buffer (restarts
           from the start distribution) and run SGLD on them, for p(x) and, with ``pxy_weight``, p(x|y);
           write the chains back;
        2. **forward**: the logits of data and samples, in one pass (one per group when the backbone has
           batch norm, whose statistics must not see samples);
        3. **loss**: :func:`jem_tf.objective.jem_objective` plus the backbone's own losses, scaled for
           the number of replicas;
        4. **apply**: one optimizer step on the network's weights (the samples are constants);
        5. **track**: update the metrics Keras logs (loss terms, energies, SGLD diagnostics).

        Every random number comes from :meth:`_step_seed`, so a step is reproducible and resumable.
        """
        self.train_step_trace_count += 1
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        x, y = self._prepare_batch(x, y)
        if sample_weight is not None:
            sample_weight = tf.reshape(tf.cast(sample_weight, tf.float32), [-1])
        batch_size = tf.shape(x)[0]
        # Where this replica's rows sit in the global batch: (0, batch_size) on one device.
        position = global_batch_position(batch_size)

        # 1. Sample. x_data = x + sigma * N(0, I): the paper's data noise.
        if self.data_noise_std > 0:
            noise = replica_random(tf.random.stateless_normal, tf.shape(x), position,
                                   seed=self._step_seed(seeds.STEP_DATA_NOISE))
            x = x + self.data_noise_std * noise
        batches, sizes, grad_norms = [x], [batch_size], []
        if self.px_weight > 0:
            num_chains, chain_position = self._px_chain_count(batch_size, position, sample_weight)
            x_sample, diagnostics = self._run_chains(num_chains, chain_position, seeds.STEP_DRAW, seeds.STEP_SGLD)
            batches.append(x_sample)
            sizes.append(num_chains)
            grad_norms.append(diagnostics.grad_norm_trace)
        if self.pxy_weight > 0:
            # p(x|y) needs labels: an unlabelled row (weight 0) carries a placeholder, so its chain is drawn from
            # the slots of class (row mod K) instead, weighs 0 in the loss and is never written back (no class's
            # slots are rewritten by unlabelled data).
            labelled = None if sample_weight is None else sample_weight > 0
            labels = y if labelled is None else tf.where(
                labelled, y, tf.math.floormod(tf.range(batch_size, dtype=y.dtype) + tf.cast(position[0], y.dtype),
                                             self.num_classes))
            x_cond, diagnostics = self._run_chains(batch_size, position, seeds.STEP_DRAW_CONDITIONAL,
                                                   seeds.STEP_SGLD_CONDITIONAL, labels=labels, labelled=labelled)
            batches.append(x_cond)
            sizes.append(batch_size)
            grad_norms.append(diagnostics.grad_norm_trace)

        with tf.GradientTape() as tape:
            # 2. Forward.
            logits = self._forward(batches, sizes)
            # 3. Loss.
            terms = jem_objective(
                y, logits[0], logits_sample=logits[1] if self.px_weight > 0 else None,
                logits_conditional_sample=logits[-1] if self.pxy_weight > 0 else None, sample_weight=sample_weight,
                pyx_weight=self.pyx_weight, px_weight=self.px_weight, pxy_weight=self.pxy_weight,
                energy_l2_weight=self.energy_l2_weight, energy_active=self._energy_terms_active())
            loss = terms.loss
            if self.backbone.losses:
                loss += tf.add_n([tf.cast(l, tf.float32) for l in self.backbone.losses])
            # Gradients are summed over replicas, so each replica's loss is divided by their number,
            # exactly as Keras scales its own losses for the global batch.
            replicas = tf.distribute.get_strategy().num_replicas_in_sync
            scaled_loss = self.optimizer.scale_loss(loss / replicas)

        # 4. Apply.
        variables = self.trainable_variables
        gradients = tape.gradient(scaled_loss, variables)
        self.optimizer.apply(gradients, variables)

        # 5. Track.
        self.loss_tracker.update_state(loss)
        self.ce_tracker.update_state(terms.ce)
        self.accuracy_metric.update_state(y, logits[0], sample_weight=sample_weight)
        self.e_data_tracker.update_state(terms.e_data)
        if self.px_weight > 0:
            self.e_sample_tracker.update_state(terms.e_sample)
            self.energy_gap_tracker.update_state(terms.energy_gap)
        if len(batches) > 1:
            self.sample_abs_max_tracker.update_state(tf.reduce_max(tf.abs(tf.concat(batches[1:], axis=0))))
        if grad_norms:
            self.sgld_grad_norm_tracker.update_state(tf.concat(grad_norms, axis=0))
        return keras_workarounds.step_logs(self.metrics)

    def test_step(self, data):
        """Cross-entropy, accuracy and mean energy of clean (noise-free) data."""
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        x, y = self._prepare_batch(x, y)
        logits = self.logits(x, training=False)
        ce = keras.losses.sparse_categorical_crossentropy(y, logits, from_logits=True)
        self.loss_tracker.update_state(ce, sample_weight=sample_weight)
        self.ce_tracker.update_state(ce, sample_weight=sample_weight)
        self.accuracy_metric.update_state(y, logits, sample_weight=sample_weight)
        self.e_data_tracker.update_state(energy_lib.energy(logits))
        return keras_workarounds.step_logs([self.loss_tracker, self.ce_tracker, self.accuracy_metric,
                                            self.e_data_tracker])

    def predict_step(self, data):
        x, _, _ = keras.utils.unpack_x_y_sample_weight(data)
        return self.logits(x, training=False)

    # ----------------------------------------------------------------------------- sampling
    def sample(self, num_samples: int, *, seed: int = 0, n_steps: Optional[int] = None,
               labels=None, init: str = "default", step_size: Optional[float] = None,
               noise_std: Optional[float] = None) -> np.ndarray:
        """Draws samples with SGLD, unconditionally or from ``p(x|y)`` when ``labels`` is given.

        Args:
            num_samples: Number of samples.
            seed: Seed; the same seed gives the same samples.
            n_steps: SGLD steps (default: the sampler's).
            labels: Optional int class ids ``[num_samples]`` for conditional sampling.
            init: ``"default"`` (the model's start distribution: its class Gaussians when it has them,
                else uniform noise), ``"uniform"`` (fresh noise on ``value_range``), ``"class_gaussian"``
                (the class Gaussians: of ``labels`` when given, else of classes drawn with the class
                prior) or ``"buffer"`` (replay-buffer chains; does not modify the buffer).
            step_size, noise_std: Optional overrides of the sampler's settings.

        Returns:
            A numpy array ``[num_samples, *image_shape]``.
        """
        return self._generator.sample(num_samples, seed=seed, n_steps=n_steps, labels=labels, init=init,
                                      step_size=step_size, noise_std=noise_std)

    @property
    def refinement_settings(self) -> RefinementSettings:
        """The settings :meth:`refine` uses by default: :attr:`refinement` when chosen, else the training
        sampler's (step size, noise, gradient clamp) with 10 steps."""
        if self.refinement is not None:
            return self.refinement
        return RefinementSettings.from_sampler(
            self.sampler, n_steps=10, source="the training sampler's settings (no refinement chosen for this model)")

    def refine(self, images, *, n_steps: Optional[int] = None, seed: int = 0, labels=None,
               step_size: Optional[float] = None, noise_std: Optional[float] = None, settings=None) -> np.ndarray:
        """SGLD on ``log p(x)`` (or ``log p(x|y)`` with ``labels``) starting at ``images``: the paper's
        test-time refinement of inputs before classifying, with the model's refinement settings.

        Args:
            images: ``[N, *image_shape]`` images in the model's value range.
            n_steps: SGLD steps (0 returns the images unchanged). Default: the settings'.
            seed: Seed of the SGLD noise; the same seed gives the same result.
            labels: Optional int class ids ``[N]`` for class-conditional refinement.
            step_size, noise_std: Optional overrides of the settings.
            settings: ``None`` (default: :attr:`refinement_settings`, the chosen ones), a
                :class:`~jem_tf.refinement.RefinementSettings`, or ``"sampler"``: the training sampler itself
                (its clamps too; for continuing sampling chains).

        Returns:
            A numpy array of the refined images (in the value range, unless ``settings="sampler"`` and the
            sampler does not clamp).
        """
        return self._generator.refine(images, n_steps=n_steps, seed=seed, labels=labels, step_size=step_size,
                                      noise_std=noise_std, settings=settings)

    # ----------------------------------------------------------------------------- config
    def get_config(self) -> dict:
        config = super().get_config()
        config.update(
            {
                "backbone": keras.saving.serialize_keras_object(self.backbone),
                "sampler": keras.saving.serialize_keras_object(self.sampler),
                "buffer_size": self.buffer_size,
                "restart_prob": self.restart_prob,
                "class_conditional_buffer": self.class_conditional_buffer,
                "pyx_weight": self.pyx_weight,
                "px_weight": self.px_weight,
                "pxy_weight": self.pxy_weight,
                "energy_l2_weight": self.energy_l2_weight,
                "data_noise_std": self.data_noise_std,
                "value_range": list(self.value_range),
                "validate_inputs": self.validate_inputs,
                "seed": self.seed,
                "buffer_storage": self.replay_buffer.storage,
                "image_shape": list(self.image_shape),
                "num_classes": self.num_classes,
                "chain_init": None if self.chain_init is None else keras.saving.serialize_keras_object(self.chain_init),
                "chain_init_uniform_fraction": self.replay_buffer.uniform_fraction,
                "energy_start_step": self.energy_start_step,
                "refinement": None if self.refinement is None else keras.saving.serialize_keras_object(self.refinement),
            }
        )
        return config

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        config["backbone"] = keras.saving.deserialize_keras_object(config["backbone"], custom_objects=custom_objects)
        config["sampler"] = keras.saving.deserialize_keras_object(config["sampler"], custom_objects=custom_objects)
        if config.get("refinement") is not None:
            config["refinement"] = keras.saving.deserialize_keras_object(config["refinement"],
                                                                         custom_objects=custom_objects)
        if config.get("chain_init") is not None:
            config["chain_init"] = keras.saving.deserialize_keras_object(config["chain_init"],
                                                                         custom_objects=custom_objects)
        return cls(**config)
