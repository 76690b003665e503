"""The components of the OOD scores, computed in TensorFlow from a trained backbone alone.

Every component is oriented so that **higher = more in-distribution**:

* ``log_px``: ``logsumexp_y f(x)[y]``, the JEM's unnormalised log-density (Grathwohl et al., ICLR 2020).
* ``max_softmax``: ``max_y p(y|x)``, the classifier baseline (Hendrycks & Gimpel, ICLR 2017).
* ``grad_norm``: ``-||d log p(x)/dx||_2``, the paper's "approximate mass" (Grathwohl et al. 2020).
* ``energy_t``: ``T logsumexp_y f(x)[y] / T`` with ``T`` from temperature scaling on the validation split
  (the negated energy score of Liu et al., NeurIPS 2020).
* ``mahalanobis``: ``-min_c (h - mu_c)^T Sigma^-1 (h - mu_c)`` in the penultimate features ``h``, with class
  means and a tied covariance of the training split (Lee et al., NeurIPS 2018).
* ``png_bits``: the input's complexity ``L(x)``, the length in bits of its lossless PNG (DEFLATE) encoding
  (Serrà et al., ICLR 2020, arXiv 1909.11480). Not a score alone: it corrects the likelihood.

A converted model's scorer can carry the scorer of the classifier it was converted from (``source``): its
components are then available too, named ``source_<component>`` (``source_mahalanobis``: the original
classifier's feature distance), so that the detector chosen for the JEM can be the one its classifier had.
"""

from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple

import keras
import numpy as np
import tensorflow as tf

from jem_tf.errors import UsageError
from jem_tf.metrics import fit_temperature

COMPONENTS = {
    "log_px": "logsumexp_y f(x)[y] (JEM unnormalised log p(x); Grathwohl et al. 2020)",
    "max_softmax": "max_y p(y|x) (Hendrycks & Gimpel 2017)",
    "grad_norm": "-||d log p(x)/dx||_2 (approximate mass; Grathwohl et al. 2020)",
    "energy_t": "T * logsumexp_y f(x)[y] / T, T fitted on the validation split (Liu et al. 2020)",
    "mahalanobis": "-min_c Mahalanobis distance of the penultimate features to the class means, tied covariance "
                   "of the training split (Lee et al. 2018)",
    "png_bits": "input complexity L(x): bits of the lossless PNG encoding (Serrà et al. 2020)",
}

SOURCE = "source_"  # the prefix of a source classifier's components


def describe(name: str) -> str:
    """The description of a component, ``source_`` ones included."""
    if name.startswith(SOURCE) and name[len(SOURCE):] in COMPONENTS:
        return "the source classifier's " + COMPONENTS[name[len(SOURCE):]]
    return COMPONENTS[name]


def penultimate_model(backbone: keras.Model) -> Optional[keras.Model]:
    """A model mapping images to ``(features, logits)``, the features being the input of the backbone's last
    layer; ``None`` when the backbone is not a functional model (then there is no ``mahalanobis``)."""
    try:
        return keras.Model(backbone.inputs, [backbone.layers[-1].input, backbone.outputs[0]])
    except (AttributeError, ValueError, TypeError, IndexError):
        return None


def png_bits(images: tf.Tensor, value_range: Sequence[float]) -> tf.Tensor:
    """float32 ``[N]``: the size in bits of each image's PNG encoding (8-bit, default zlib level), after
    mapping ``value_range`` to 0..255."""
    low, high = value_range
    pixels = tf.cast(tf.round(tf.clip_by_value((images - low) / (high - low), 0.0, 1.0) * 255.0), tf.uint8)
    lengths = tf.map_fn(lambda image: tf.strings.length(tf.io.encode_png(image)), pixels,
                        fn_output_signature=tf.int32)
    return 8.0 * tf.cast(lengths, tf.float32)


class OODScorer:
    """The components of a trained backbone's OOD scores, computed in TensorFlow.

    Args:
        backbone: The JEM's (or a classifier's) logits network.
        value_range: The images' value range.
        temperature: ``T`` of ``energy_t``.
        class_means: ``[K, D]`` class means of the penultimate features (``mahalanobis``).
        precision: ``[D, D]`` inverse of the tied feature covariance (``mahalanobis``).
        source: The fitted scorer of the classifier this model was converted from (its components become
            ``source_<name>``; ``png_bits`` depends on the input alone and stays this scorer's).

    Use :meth:`fit` to estimate the temperature and the feature statistics from data.
    """

    def __init__(self, backbone: keras.Model, *, value_range: Sequence[float] = (-1.0, 1.0), temperature: float = 1.0,
                 class_means: Optional[np.ndarray] = None, precision: Optional[np.ndarray] = None,
                 source: Optional["OODScorer"] = None):
        if source is not None and (source.source is not None or not isinstance(source, OODScorer)):
            raise ValueError("`source` must be the plain OODScorer of the source classifier.")
        if not (np.isfinite(temperature) and temperature > 0):
            raise ValueError(f"`temperature` must be a finite number > 0; received {temperature!r}")
        if (class_means is None) != (precision is None):
            raise ValueError("Pass both `class_means` and `precision` (Mahalanobis statistics) or neither.")
        self.backbone = backbone
        self.value_range = tuple(float(v) for v in value_range)
        self.temperature = float(temperature)
        self.features_and_logits = penultimate_model(backbone)
        self.class_means = None if class_means is None else np.asarray(class_means, np.float32)
        self.precision = None if precision is None else np.asarray(precision, np.float32)
        self.source = source
        self._score_fns = {}

    def with_backbone(self, backbone: keras.Model) -> "OODScorer":
        """The same fitted scorer (temperature, feature statistics) on another copy of the network, e.g. the
        float32 copy an export serves."""
        return OODScorer(backbone, value_range=self.value_range, temperature=self.temperature,
                         class_means=self.class_means, precision=self.precision, source=self.source)

    @property
    def available(self) -> Tuple[str, ...]:
        """The components this scorer can compute (its source's as ``source_<name>``)."""
        own = tuple(name for name in COMPONENTS if name != "mahalanobis" or self.class_means is not None)
        if self.source is None:
            return own
        return own + tuple(SOURCE + name for name in self.source.available if name != "png_bits")

    @classmethod
    def fit(cls, model, *, train_images: Optional[np.ndarray] = None, train_labels: Optional[np.ndarray] = None,
            val_images: Optional[np.ndarray] = None, val_labels: Optional[np.ndarray] = None,
            temperature: Optional[float] = None, batch_size: int = 256,
            source_network: Optional[keras.Model] = None) -> "OODScorer":
        """A scorer for ``model`` (a :class:`~jem_tf.JEM`): the temperature fitted on the validation split
        (1 without one; ``temperature``: one fitted there already) and the Mahalanobis statistics of the
        training split (none without one). ``source_network``: the logits network of the classifier ``model``
        was converted from, before its fine-tune; fitted on the same images as the ``source``."""
        fitted = {}
        for role, network in (("model", model.backbone), ("source", source_network)):
            if network is None:
                continue
            scorer = fitted[role] = cls(network, value_range=model.value_range)
            if temperature is not None and role == "model":
                scorer.temperature = float(temperature)
            elif val_images is not None and len(val_images) > 0:
                logits = scorer.arrays(val_images, ["logits"], batch_size=batch_size)["logits"]
                scorer.temperature = fit_temperature(logits, val_labels)
            if train_images is not None and len(train_images) > 0 and scorer.features_and_logits is not None:
                features = scorer.arrays(train_images, ["features"], batch_size=batch_size)["features"]
                scorer.class_means, scorer.precision = tied_gaussian(features, np.asarray(train_labels),
                                                                     num_classes=model.num_classes)
        fitted["model"].source = fitted.get("source")
        return fitted["model"]

    def components(self, images: tf.Tensor, names: Sequence[str]) -> Dict[str, tf.Tensor]:
        """``{name: float32 [N]}`` for each of ``names`` (components, or ``"logits"``/``"features"``), from
        one forward pass (plus one backward pass for ``grad_norm``). Pure TensorFlow: traced into the
        serving signatures."""
        source_names = [name[len(SOURCE):] for name in names if name.startswith(SOURCE)]
        if source_names and self.source is None:
            raise ValueError(f"Components {sorted(n for n in names if n.startswith(SOURCE))} need the source "
                             "classifier's scorer (OODScorer(..., source=...)).")
        names = [name for name in names if not name.startswith(SOURCE)]
        unknown = sorted(set(names) - set(COMPONENTS) - {"logits", "features"})
        if unknown:
            raise ValueError(f"Unknown OOD components {unknown}; expected some of {list(COMPONENTS)}")
        out = {}
        if source_names:
            out = {SOURCE + name: value for name, value in self.source.components(images, source_names).items()}
            if not names:
                return out
        if "mahalanobis" in names and self.class_means is None:
            raise ValueError("The `mahalanobis` score needs feature statistics: OODScorer.fit(..., train_images=...).")
        if ("mahalanobis" in names or "features" in names) and self.features_and_logits is None:
            raise ValueError("The `mahalanobis` score needs a functional backbone (its penultimate layer).")
        images = tf.convert_to_tensor(images, tf.float32)
        with tf.GradientTape(watch_accessed_variables=False) as tape:
            tape.watch(images)
            if self.features_and_logits is not None:
                features, logits = self.features_and_logits(images, training=False)
                features = tf.reshape(tf.cast(features, tf.float32), [tf.shape(images)[0], -1])
            else:
                features, logits = None, self.backbone(images, training=False)
            logits = tf.cast(logits, tf.float32)
            log_px = tf.reduce_logsumexp(logits, axis=1)
            total_log_px = tf.reduce_sum(log_px)
        if "grad_norm" in names:
            gradient = tape.gradient(total_log_px, images)
            out["grad_norm"] = -tf.sqrt(tf.reduce_sum(tf.square(gradient), axis=[1, 2, 3]))
        if "log_px" in names:
            out["log_px"] = log_px
        if "max_softmax" in names:
            out["max_softmax"] = tf.reduce_max(tf.nn.softmax(logits, axis=1), axis=1)
        if "energy_t" in names:
            out["energy_t"] = self.temperature * tf.reduce_logsumexp(logits / self.temperature, axis=1)
        if "mahalanobis" in names:
            centered = features[:, None, :] - tf.constant(self.class_means)[None]  # [N, K, D]
            distances = tf.einsum("nkd,de,nke->nk", centered, tf.constant(self.precision), centered)
            out["mahalanobis"] = -tf.reduce_min(distances, axis=1)
        if "png_bits" in names:
            out["png_bits"] = png_bits(images, self.value_range)
        if "logits" in names:
            out["logits"] = logits
        if "features" in names:
            out["features"] = features
        return out

    def arrays(self, images: np.ndarray, names: Sequence[str], *, batch_size: int = 256) -> Dict[str, np.ndarray]:
        """:meth:`components` of numpy ``images`` in batches (one compiled function per set of names), as
        float64 numpy arrays."""
        key = tuple(sorted(names))
        fn = self._score_fns.get(key)
        if fn is None:
            image_shape = tuple(self.backbone.input_shape[1:])
            fn = self._score_fns[key] = tf.function(
                lambda x: self.components(x, key),
                input_signature=[tf.TensorSpec([None, *image_shape], tf.float32)])
        images = np.asarray(images, np.float32)
        parts = [fn(tf.constant(images[a:a + batch_size])) for a in range(0, len(images), batch_size)]
        if not parts:
            raise ValueError("No images to score.")
        return {name: np.concatenate([p[name].numpy() for p in parts]).astype(np.float64) for name in key}

    def parameters(self) -> dict:
        """JSON-serialisable description of the fitted parameters (the arrays by shape)."""
        parameters = {"temperature": self.temperature, "value_range": list(self.value_range),
                      "mahalanobis": None if self.class_means is None else {
                          "class_means_shape": list(self.class_means.shape), "covariance": "tied, training split"}}
        if self.source is not None:
            parameters["source"] = {**self.source.parameters(), "network": self.source.backbone.name,
                                    "num_params": int(self.source.backbone.count_params())}
        return parameters


def tied_gaussian(features: np.ndarray, labels: np.ndarray, *, num_classes: int,
                  ridge: float = 1e-6) -> Tuple[np.ndarray, np.ndarray]:
    """``(class_means [K, D], precision [D, D])`` of ``features``: per-class means and the inverse of the
    shared (tied) within-class covariance, with a small ridge relative to its mean variance."""
    features = np.asarray(features, np.float64)
    labels = np.asarray(labels).astype(int)
    missing = sorted(set(range(num_classes)) - set(labels.tolist()))
    if missing:
        raise UsageError(f"Every class needs training features for the Mahalanobis score; missing {missing}.")
    means = np.stack([features[labels == c].mean(axis=0) for c in range(num_classes)])
    centered = features - means[labels]
    covariance = centered.T @ centered / len(features)
    covariance += ridge * max(float(np.trace(covariance)) / len(covariance), 1e-12) * np.eye(len(covariance))
    return means.astype(np.float32), np.linalg.pinv(covariance, hermitian=True).astype(np.float32)
