"""Backbones that output logits: the paper's Wide-ResNet, a small CNN for CPUs and a fast colour-image CNN.

Both are factories returning functional ``keras.Model`` s (serializable without custom
classes). Keyword arguments only.
"""

from __future__ import annotations

from typing import Optional, Sequence

import keras
import numpy as np

from jem_tf.choices import NORMALIZATIONS, PRECISIONS
from jem_tf.errors import UsageError
from jem_tf.keras_workarounds import all_layers


def torch_default_initializer(seed: Optional[int] = None) -> keras.initializers.Initializer:
    """``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``: PyTorch's default conv/linear weight init, which
    the JEM reference code trains with (Keras's default is Glorot uniform)."""
    return keras.initializers.VarianceScaling(
        scale=1.0 / 3.0, mode="fan_in", distribution="uniform", seed=seed
    )


def _check_common(num_classes, input_shape):
    if not (isinstance(num_classes, int) and num_classes >= 2):
        raise ValueError(f"`num_classes` must be an int >= 2; received num_classes={num_classes!r}")
    input_shape = tuple(input_shape)
    if len(input_shape) != 3 or any(not isinstance(d, int) or d < 1 for d in input_shape):
        raise ValueError(
            f"`input_shape` must be (height, width, channels) positive ints; received {input_shape!r}"
        )
    return input_shape


def _check_layers(*, width: int, dropout: float, normalization: Optional[str] = None) -> None:
    if not (isinstance(width, int) and width >= 1):
        raise ValueError(f"`width` must be an int >= 1; received width={width!r}")
    if normalization is not None and normalization not in NORMALIZATIONS:
        raise ValueError(f"`normalization` must be one of {NORMALIZATIONS}; received {normalization!r}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"`dropout` must be in [0, 1); received dropout={dropout!r}")


def _normalization(kind: str, name: str):
    if kind == "batch":
        return keras.layers.BatchNormalization(momentum=0.9, epsilon=1e-5, name=name)
    if kind == "layer":
        return keras.layers.LayerNormalization(axis=(-3, -2, -1), epsilon=1e-5, name=name)
    return keras.layers.Identity(name=name)


def wide_resnet(
    *,
    num_classes: int = 10,
    input_shape: Sequence[int] = (32, 32, 3),
    depth: int = 28,
    width: int = 10,
    normalization: str = "none",
    dropout: float = 0.0,
    leaky_relu_slope: float = 0.2,
    seed: Optional[int] = None,
    name: Optional[str] = None,
) -> keras.Model:
    """Pre-activation Wide-ResNet-``depth``-``width`` as in the JEM reference code.

    Depth ``6n + 4``; three groups of ``n`` blocks with ``16k, 32k, 64k`` channels (``k`` =
    width) and strides 1, 2, 2; leaky-ReLU everywhere; convolutions with biases; global average
    pooling; a linear head to ``num_classes`` logits. The paper trains it without normalisation
    (batch norm hurts sampling).

    Args:
        num_classes: Number of logits. Default 10.
        input_shape: ``(height, width, channels)``. Default (32, 32, 3).
        depth: ``6n + 4``: 10, 16, 22, 28, ... Default 28.
        width: Widening factor ``k``. Default 10.
        normalization: ``"none"`` (default), ``"batch"`` or ``"layer"``.
        dropout: Dropout rate inside each block. Default 0.0.
        leaky_relu_slope: Negative slope of the leaky ReLU. Default 0.2.
        seed: Seed of the weight initialisation. Default ``None``.
        name: Model name. Default ``"wrn_{depth}_{width}"``.

    Example:
        >>> net = wide_resnet(depth=10, width=1)   # WRN-10-1, 78k parameters
        >>> net(keras.ops.ones((2, 32, 32, 3))).shape
        TensorShape([2, 10])

    Reference:
        Zagoruyko & Komodakis, "Wide Residual Networks", 2016; Grathwohl et al., ICLR 2020.
    """
    input_shape = _check_common(num_classes, input_shape)
    if not (isinstance(depth, int) and depth >= 10 and (depth - 4) % 6 == 0):
        raise ValueError(f"`depth` must be 6n + 4 with n >= 1 (10, 16, 22, 28, ...); received depth={depth!r}")
    _check_layers(width=width, dropout=dropout, normalization=normalization)
    blocks_per_group = (depth - 4) // 6
    init_seed = iter(range(10**6)) if seed is None else iter(range(seed, seed + 10**6))

    def conv(filters, kernel, strides, name):
        return keras.layers.Conv2D(
            filters, kernel, strides=strides, padding="same", use_bias=True,
            kernel_initializer=torch_default_initializer(None if seed is None else next(init_seed)),
            name=name,
        )

    def act(name):
        return keras.layers.LeakyReLU(negative_slope=leaky_relu_slope, name=name)

    inputs = keras.Input(shape=input_shape, name="images")
    x = conv(16, 3, 1, "stem_conv")(inputs)
    in_filters = 16
    for group, (filters, stride) in enumerate(zip((16 * width, 32 * width, 64 * width), (1, 2, 2))):
        for block in range(blocks_per_group):
            prefix = f"group{group}_block{block}"
            block_stride = stride if block == 0 else 1
            # Pre-activation block: norm -> act -> conv -> dropout -> norm -> act -> conv(stride).
            h = act(f"{prefix}_act1")(_normalization(normalization, f"{prefix}_norm1")(x))
            h = conv(filters, 3, 1, f"{prefix}_conv1")(h)
            if dropout > 0:
                h = keras.layers.Dropout(dropout, name=f"{prefix}_dropout")(h)
            h = act(f"{prefix}_act2")(_normalization(normalization, f"{prefix}_norm2")(h))
            h = conv(filters, 3, block_stride, f"{prefix}_conv2")(h)
            shortcut = x
            if block_stride != 1 or in_filters != filters:
                shortcut = conv(filters, 1, block_stride, f"{prefix}_shortcut")(x)
            x = keras.layers.Add(name=f"{prefix}_add")([h, shortcut])
            in_filters = filters
    x = act("head_act")(_normalization(normalization, "head_norm")(x))
    x = keras.layers.GlobalAveragePooling2D(name="head_pool")(x)
    logits = keras.layers.Dense(
        num_classes, kernel_initializer=torch_default_initializer(seed), name="logits"
    )(x)
    return keras.Model(inputs, logits, name=name or f"wrn_{depth}_{width}")


def small_cnn(
    *,
    num_classes: int = 10,
    input_shape: Sequence[int] = (8, 8, 1),
    width: int = 32,
    stages: int = 2,
    leaky_relu_slope: float = 0.2,
    dropout: float = 0.0,
    seed: Optional[int] = None,
    name: str = "small_cnn",
) -> keras.Model:
    """A small, fast convolutional classifier for CPUs (no normalisation, leaky ReLU).

    A 3x3 stem conv with ``width`` channels, then ``stages`` stages of (3x3 stride-2 conv,
    3x3 conv) doubling the channels, global average pooling and a linear head.

    Args:
        num_classes: Number of logits. Default 10.
        input_shape: ``(height, width, channels)``. Default (8, 8, 1) (scikit-learn digits).
        width: Channels of the stem. Default 32.
        stages: Number of downsampling stages. Default 2.
        leaky_relu_slope: Negative slope of the leaky ReLU. Default 0.2.
        dropout: Dropout rate before the head. Default 0.0.
        seed: Seed of the weight initialisation. Default ``None``.
        name: Model name.

    Example:
        >>> net = small_cnn(num_classes=10, input_shape=(8, 8, 1))
        >>> net(keras.ops.ones((2, 8, 8, 1))).shape
        TensorShape([2, 10])
    """
    input_shape = _check_common(num_classes, input_shape)
    _check_layers(width=width, dropout=dropout)
    if not (isinstance(stages, int) and stages >= 0):
        raise ValueError(f"`stages` must be an int >= 0; received stages={stages!r}")
    seeds = iter(range(10**6)) if seed is None else iter(range(seed, seed + 10**6))

    def conv_act(x, filters, strides, name):
        x = keras.layers.Conv2D(
            filters, 3, strides=strides, padding="same",
            kernel_initializer=torch_default_initializer(None if seed is None else next(seeds)),
            name=f"{name}_conv",
        )(x)
        return keras.layers.LeakyReLU(negative_slope=leaky_relu_slope, name=f"{name}_act")(x)

    inputs = keras.Input(shape=input_shape, name="images")
    x = conv_act(inputs, width, 1, "stem")
    for stage in range(stages):
        filters = width * 2 ** (stage + 1)
        x = conv_act(x, filters, 2, f"stage{stage}_down")
        x = conv_act(x, filters, 1, f"stage{stage}_mix")
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    if dropout > 0:
        x = keras.layers.Dropout(dropout, name="dropout")(x)
    logits = keras.layers.Dense(
        num_classes, kernel_initializer=torch_default_initializer(None if seed is None else next(seeds)),
        name="logits",
    )(x)
    return keras.Model(inputs, logits, name=name)


def fast_cnn(
    *,
    num_classes: int = 10,
    input_shape: Sequence[int] = (32, 32, 3),
    width: int = 64,
    normalization: str = "batch",
    dropout: float = 0.0,
    seed: Optional[int] = None,
    name: str = "fast_cnn",
) -> keras.Model:
    """A fast CNN for 32x32 colour images on CPUs, after Keller Jordan's airbench (2024; 94 % on CIFAR-10 in
    seconds on a GPU): a 2x2 stem conv (24 channels, no padding), three blocks of (3x3 conv, 2x2 max pool,
    norm, GELU, 3x3 conv, norm, GELU) with ``width, 4 width, 4 width`` channels, global max pooling and a
    linear head. GELU is smooth, so SGLD gradients through it are too. 2.0M parameters at ``width=64``.

    Args:
        num_classes: Number of logits. Default 10.
        input_shape: ``(height, width, channels)``, at least 16x16. Default (32, 32, 3).
        width: Channels of the first block. Default 64.
        normalization: ``"batch"`` (default), ``"layer"`` or ``"none"``.
        dropout: Dropout rate before the head. Default 0.0.
        seed: Seed of the weight initialisation. Default ``None``.
        name: Model name.

    Example:
        >>> net = fast_cnn(num_classes=10, input_shape=(32, 32, 3), width=16)
        >>> net(keras.ops.ones((2, 32, 32, 3))).shape
        TensorShape([2, 10])
    """
    input_shape = _check_common(num_classes, input_shape)
    if input_shape[0] < 16 or input_shape[1] < 16:
        raise ValueError(f"fast_cnn needs images of at least 16x16 (three 2x2 poolings); received {input_shape!r}")
    _check_layers(width=width, dropout=dropout, normalization=normalization)
    seeds = iter(range(10**6)) if seed is None else iter(range(seed, seed + 10**6))

    def conv(filters, kernel, padding, name):
        return keras.layers.Conv2D(
            filters, kernel, padding=padding, use_bias=normalization != "batch",
            kernel_initializer=keras.initializers.HeNormal(None if seed is None else next(seeds)), name=name)

    inputs = keras.Input(shape=input_shape, name="images")
    x = keras.layers.Activation("gelu", name="stem_act")(conv(24, 2, "valid", "stem_conv")(inputs))
    for block, filters in enumerate((width, 4 * width, 4 * width)):
        x = conv(filters, 3, "same", f"block{block}_conv1")(x)
        x = keras.layers.MaxPooling2D(2, name=f"block{block}_pool")(x)
        x = _normalization(normalization, f"block{block}_norm1")(x)
        x = keras.layers.Activation("gelu", name=f"block{block}_act1")(x)
        x = conv(filters, 3, "same", f"block{block}_conv2")(x)
        x = _normalization(normalization, f"block{block}_norm2")(x)
        x = keras.layers.Activation("gelu", name=f"block{block}_act2")(x)
    x = keras.layers.GlobalMaxPooling2D(name="pool")(x)
    if dropout > 0:
        x = keras.layers.Dropout(dropout, name="dropout")(x)
    logits = keras.layers.Dense(
        num_classes, kernel_initializer=torch_default_initializer(None if seed is None else next(seeds)),
        name="logits")(x)
    return keras.Model(inputs, logits, name=name)


def whiten_stem(model: keras.Model, images, *, layer: str = "stem_conv", eps: float = 5e-4,
                max_images: int = 5000) -> np.ndarray:
    """Sets the kernel of ``model``'s first conv (``layer``; fast_cnn's ``stem_conv``) to a patch-whitening
    transform of ``images``, as airbench does (Jordan, 2024): for the second-moment matrix of the conv's
    ``kh x kw x C`` input patches, with eigenvalues ``l_i`` and eigenvectors ``v_i`` (largest first), filter ``i``
    is ``v_i / sqrt(l_i + eps mean(l))`` and filter ``k + i`` its negation (``k`` directions), so the responses to
    the images are decorrelated with unit second moment (up to ``eps``) and both signs survive the activation after
    it. ``k = d = kh kw C`` when the conv has ``2 d`` filters or more (the rest keep their initialisation), else the
    leading ``filters // 2`` directions. A bias, if any, is set to 0.

    ``images``: ``(n, H, W, C)`` in the network's input scale: the training images (never validation or test
    images); the first ``max_images`` are used. ``eps``: added to each eigenvalue, relative to their mean
    (scale-free; bounds the gain of the faintest directions; airbench's 5e-4 on standardized images). The kernel
    stays trainable: freeze ``layer`` to keep it, as airbench does (:func:`freeze_layers`). Returns the
    eigenvalues, largest first.
    """
    conv = next((candidate for candidate in all_layers(model) if candidate.name == layer), None)
    if not isinstance(conv, keras.layers.Conv2D):
        raise ValueError(f"whiten_stem: {model.name!r} has no Conv2D layer named {layer!r}")
    kernel = conv.kernel.numpy()
    kh, kw, channels, filters = kernel.shape
    images = np.asarray(images, dtype=np.float32)
    if images.ndim != 4 or images.shape[-1] != channels or images.shape[1] < kh or images.shape[2] < kw:
        raise ValueError(f"whiten_stem needs images of shape (n, H >= {kh}, W >= {kw}, {channels}); "
                         f"received {images.shape}")
    if not (isinstance(max_images, int) and max_images >= 1) or not eps > 0:
        raise ValueError(f"whiten_stem needs max_images >= 1 and eps > 0; received max_images={max_images!r}, "
                         f"eps={eps!r}")
    images = images[:max_images]
    if len(images) == 0:
        raise ValueError("whiten_stem needs at least one image; received none")
    dims = kh * kw * channels
    moment, count = np.zeros((dims, dims), np.float64), 0
    for start in range(0, len(images), 256):  # bounded memory: 256 images' patches at a time
        chunk = images[start:start + 256]
        h, w = chunk.shape[1] - kh + 1, chunk.shape[2] - kw + 1
        patches = np.stack([chunk[:, i:i + h, j:j + w, :] for i in range(kh) for j in range(kw)], axis=3)
        patches = patches.reshape(-1, dims).astype(np.float64)  # (kh, kw, C) order, as the kernel's
        moment += patches.T @ patches
        count += len(patches)
    eigenvalues, eigenvectors = np.linalg.eigh(moment / count)
    eigenvalues, eigenvectors = eigenvalues[::-1], eigenvectors[:, ::-1]
    used = min(dims, filters // 2)
    floor = eps * max(float(np.mean(eigenvalues)), float(np.finfo(np.float32).tiny))
    scaled = eigenvectors[:, :used] / np.sqrt(np.maximum(eigenvalues[:used], 0.0) + floor)
    kernel[..., :2 * used] = np.concatenate([scaled, -scaled], axis=1).reshape(kh, kw, channels, 2 * used)
    conv.kernel.assign(kernel)
    if conv.use_bias:
        conv.bias.assign(np.zeros(conv.bias.shape, np.float32))
    return eigenvalues


def freeze_batch_norm(model: keras.Model) -> int:
    """Sets ``trainable = False`` on every ``BatchNormalization`` layer of ``model`` (nested models included) and
    returns how many: Keras then runs them in inference mode even in training (moving statistics, scale and offset
    fixed), so every input, data or SGLD chain, goes through the same function. Saved with the model."""
    layers = [layer for layer in all_layers(model) if isinstance(layer, keras.layers.BatchNormalization)]
    for layer in layers:
        layer.trainable = False
    return len(layers)


def freeze_layers(model: keras.Model, names: Sequence[str]) -> int:
    """Sets ``trainable = False`` on the layers of ``model`` (nested models included) named in ``names``: a layer
    is frozen when its name is an entry or starts with an entry followed by ``_`` (``"block0"`` freezes
    ``block0_conv1``, ``block0_norm1``, ...). Returns how many; an entry that matches no layer is a ``UsageError``
    naming it and the layers there are. Saved with the model."""
    layers = all_layers(model)[1:]
    frozen = set()
    for name in names:
        matches = [layer for layer in layers if layer.name == name or layer.name.startswith(f"{name}_")]
        if not matches:
            raise UsageError(f"frozen_layers: no layer of {model.name!r} is named {name!r} or {name}_...; its "
                             f"layers: {', '.join(layer.name for layer in layers)}")
        frozen.update(id(layer) for layer in matches)
        for layer in matches:
            layer.trainable = False
    return len(frozen)


def compute_precision(model: keras.Model) -> str:
    """The precision ``model`` computes in: ``"float32"`` when every layer (nested models included) computes in
    float32, else the mixed policy of its 16-bit layers (``"mixed_bfloat16"`` or ``"mixed_float16"``)."""
    for layer in all_layers(model):
        compute = layer.dtype_policy.compute_dtype
        if compute in ("bfloat16", "float16"):
            return f"mixed_{compute}"
    return "float32"


# Layers that stay float32 under a 16-bit precision, besides the logits head: a density temperature's correction
# (jem_tf.model.heads.with_density_head), a difference of two logsumexps that 16 bits would not keep.
FLOAT32_LAYERS = ("density_temperature_logits", "density_temperature_offset", "density_offset_with_temperature")


def with_precision(model: keras.Model, precision: str) -> keras.Model:
    """A copy of a functional or sequential ``model`` whose layers compute in ``precision``, with the
    same weights (``model`` itself when it already computes in ``precision``).

    ``"mixed_bfloat16"`` / ``"mixed_float16"``: every layer computes in 16 bits with float32 weights
    (Keras mixed precision), except the last layer (the logits head) and :data:`FLOAT32_LAYERS`, which stay
    float32 so that ``logsumexp`` energies keep their resolution. Inputs stay float32: a JEM's SGLD chains and their
    gradients remain float32 and the first layer casts. ``"float32"``: every layer computes in float32 (a model
    trained in mixed precision, for serving; its weights are float32 already, so nothing is rounded).
    """
    if precision not in PRECISIONS:
        raise ValueError(f"`precision` must be one of {PRECISIONS}; received {precision!r}")
    if compute_precision(model) == precision:
        return model
    head = model.layers[-1].name

    def clone_layer(layer):
        config = layer.get_config()
        if not isinstance(layer, keras.layers.InputLayer):
            float32 = layer.name == head or layer.name in FLOAT32_LAYERS or precision == "float32"
            config["dtype"] = "float32" if float32 else precision
        return layer.__class__.from_config(config)

    # recursive: the layers of nested models too (a test-time-augmented network nests its single-view network).
    clone = keras.models.clone_model(model, clone_function=clone_layer, recursive=True)
    clone.set_weights(model.get_weights())
    return clone


def build_backbone(name: str, **kwargs) -> keras.Model:
    """Builds a backbone by name: ``"small_cnn"``, ``"fast_cnn"``, ``"wrn"`` or ``"wrn-DEPTH-WIDTH"``."""
    if name == "small_cnn":
        return small_cnn(**kwargs)
    if name == "fast_cnn":
        return fast_cnn(**kwargs)
    if name == "wrn":
        return wide_resnet(**kwargs)
    if name.startswith("wrn-"):
        parts = name.split("-")
        if len(parts) == 3 and parts[1].isdigit() and parts[2].isdigit():
            return wide_resnet(depth=int(parts[1]), width=int(parts[2]), **kwargs)
    raise ValueError(
        f"Unknown backbone {name!r}; expected 'small_cnn', 'fast_cnn', 'wrn' or 'wrn-DEPTH-WIDTH' (e.g. 'wrn-28-10')."
    )
