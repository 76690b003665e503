"""Mode ``frechet``: the Fréchet distance between test images and samples in the features of a network
the user names. Never called "FID": Keras's ``InceptionV3`` is not the TF-slim Inception network of the
standard FID, so even with ``inception_v3`` the metric is ``frechet_distance_inception_v3_keras``."""

from __future__ import annotations

import dataclasses
import os
from typing import Callable, Optional, Sequence

import keras
import numpy as np
import tensorflow as tf

from jem_tf import metrics as metrics_lib
from jem_tf import seeds
from jem_tf.evaluation.common import batches
from jem_tf.evaluation.samples import start_distribution
from jem_tf.evaluation.settings import INCEPTION
from jem_tf.model.jem import JEM
from jem_tf.run.model_files import load_keras_archive
from jem_tf.run.workdir import RunLayout


@dataclasses.dataclass
class FeatureNetwork:
    """A named feature extractor for the Fréchet distance: ``features(images) -> [N, D]``."""

    name: str
    description: str
    features: Callable[[np.ndarray], np.ndarray]
    is_inception: bool = False


def load_feature_network(spec: str, *, image_shape: Sequence[int], layer: Optional[str] = None,
                         inception_weights: Optional[str] = None, batch_size: int = 256) -> FeatureNetwork:
    """The feature network named by ``spec``:

    * ``"inception_v3"``: Keras's InceptionV3 without its top (2048-d average pool), weights read from the
      local file ``inception_weights`` (nothing is downloaded); images are resized to 299x299, grey
      images repeated to RGB, values kept in [-1, 1] (InceptionV3's input range).
    * a training work directory or ``.keras`` file: a JEM's backbone, or any Keras classifier; features are
      the input of its last layer (the penultimate activations), or the output of ``layer``.
    """
    if spec == INCEPTION:
        if not inception_weights or not os.path.isfile(inception_weights):
            raise ValueError(
                f"The Inception network needs its weights on this machine: --inception-weights {inception_weights!r} "
                "is not a file (nothing is downloaded). Without them there is no FID; use --feature-model PATH "
                "with a classifier trained on this data for a Fréchet distance in its features instead.")
        network = keras.applications.InceptionV3(include_top=False, weights=inception_weights, pooling="avg",
                                                 input_shape=(299, 299, 3))

        def features(images):
            out = []
            for a, b in batches(len(images), batch_size):
                x = tf.image.resize(tf.constant(images[a:b]), (299, 299), method="bilinear")
                if x.shape[-1] == 1:
                    x = tf.repeat(x, 3, axis=-1)
                out.append(network(x, training=False).numpy())
            return np.concatenate(out)

        return FeatureNetwork(INCEPTION, f"keras.applications.InceptionV3 pool (2048-d), weights {inception_weights}",
                              features, is_inception=True)
    if not os.path.exists(spec):
        raise ValueError(f"--feature-model {spec!r} is neither {INCEPTION!r} nor an existing .keras file or work "
                         "directory.")
    path = RunLayout(spec).model if os.path.isdir(spec) else spec
    network = load_keras_archive(path, "the feature model", compile=False)
    if isinstance(network, JEM):
        network = network.backbone
    if tuple(network.input_shape[1:]) != tuple(image_shape):
        raise ValueError(f"Feature model {path!r} takes inputs {tuple(network.input_shape[1:])}; the images are "
                         f"{tuple(image_shape)}.")
    try:
        output = network.get_layer(layer).output if layer else network.layers[-1].input
    except ValueError as error:
        raise ValueError(f"Feature model {path!r} has no layer {layer!r}.") from error
    extractor = keras.Model(network.inputs, output)
    where = f"layer {layer!r}" if layer else f"input of its last layer {network.layers[-1].name!r}"
    dim = int(np.prod(output.shape[1:]))

    def features(images):
        return np.concatenate([np.reshape(extractor(tf.constant(images[a:b]), training=False), (b - a, -1))
                               for a, b in batches(len(images), batch_size)])

    return FeatureNetwork(network.name, f"{network.name} from {path}, {where} ({dim}-d)", features)


def evaluate_frechet(model: JEM, test_images: np.ndarray, *, network: FeatureNetwork,
                     held_out_images: Optional[np.ndarray] = None, num_images: int = 1000,
                     sample_steps: int = 200, seed: int = 0, batch_size: int = 256) -> dict:
    """Fréchet distance between the test images and (a) replay-buffer samples, (b) samples from fresh
    noise after ``sample_steps`` SGLD steps and, as the floor to compare with, (c) held-out real images."""
    n = min(num_images, len(test_images))
    if n < 2:
        raise ValueError(f"The Fréchet distance needs >= 2 images; have {n}.")
    reference = metrics_lib.feature_statistics(network.features(test_images[:n]))
    sets = {
        "buffer": model.sample(min(n, model.buffer_size), seed=seed, n_steps=0, init="buffer"),
        f"{start_distribution(model)}_{sample_steps}_steps": np.concatenate(
            [model.sample(b - a, seed=seed + seeds.FRECHET_SAMPLES_OFFSET + a, n_steps=sample_steps)
             for a, b in batches(n, batch_size)]),
    }
    if held_out_images is not None and len(held_out_images) >= 2:
        sets["held_out_real_images"] = held_out_images[:n]
    name = "frechet_distance_inception_v3_keras" if network.is_inception else "frechet_distance"
    results = {key: {name: metrics_lib.frechet_distance(*reference,
                                                        *metrics_lib.feature_statistics(network.features(images))),
                     "num_images": int(len(images))}
               for key, images in sets.items()}
    return {"distances": results, "settings": {
        "feature_network": network.description, "metric_name": name, "num_test_images": n, "seed": seed,
        "note": ("Keras InceptionV3 pool features: not the reference FID network (TF-slim Inception, "
                 "pt_inception weights), so not comparable to published FIDs"
                 if network.is_inception else
                 "Fréchet distance in the named network's features; not an FID and not comparable to published FIDs")}}
