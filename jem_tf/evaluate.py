"""Evaluation suite: ``python -m jem_tf.evaluate --model PATH --out DIR`` and the same as functions.

Checks the paper's claims on a trained model and writes ``DIR/report.json`` (every number with the
settings that produced it) and PNG figures:

* ``accuracy``: test accuracy, also after K SGLD refinement steps of the inputs.
* ``calibration``: ECE (``tfp.stats``), MCE, NLL, Brier, a reliability diagram, and temperature scaling
  fitted on the run's validation split (never on test data).
* ``ood``: scores log p(x), max p(y|x), the input-gradient norm ("approximate mass") and the
  temperature-scaled energy against any loadable dataset and the synthetic sets ``uniform``,
  ``constant`` and ``permuted``; AUROC, AUPR-in/out and FPR at 95 % TPR with in-distribution positive.
* ``samples``: unconditional and class-conditional grids from fresh noise, replay-buffer grids and a long
  chain with its energy trace.
* ``frechet``: the Fréchet distance between test images and samples in the features of a network the
  user names (never called "FID" unless that network is the Inception network).
* ``robustness``: PGD L-inf / L2 accuracy with and without SGLD refinement before classifying.

Nothing is hidden: inputs are used as loaded (the training-time data noise is off) unless
``input_noise_std`` is given, and the report lists the transforms applied.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from typing import Callable, Dict, List, Mapping, Optional, Sequence

import keras
import numpy as np
import tensorflow as tf

from jem_tf import metrics as metrics_lib
from jem_tf import plots
from jem_tf.attacks import NORMS, PGD
from jem_tf.cli import OneLineErrorParser
from jem_tf.jem import JEM
from jem_tf.visualize import image_grid, upscale, write_png

MODES = ("accuracy", "calibration", "ood", "samples", "frechet", "robustness")
DEFAULT_MODES = ("accuracy", "calibration", "ood", "samples")
SYNTHETIC_OOD = ("uniform", "constant", "permuted")
OOD_SCORES = {
    "log_px": "log p(x) = logsumexp_y f(x)[y] (unnormalised)",
    "max_softmax": "max_y p(y|x)",
    "grad_norm": "-||d log p(x) / dx||_2 (the paper's approximate mass; flat density = in-distribution)",
    "energy_t": "T * logsumexp_y f(x)[y] / T, T from temperature scaling (Liu et al. 2020, negated energy)",
}
REPORT_FILE = "report.json"
SCHEMA_VERSION = 1
INCEPTION = "inception_v3"


# ------------------------------------------------------------------------------------- helpers
def _batches(n: int, batch_size: int):
    return ((start, min(start + batch_size, n)) for start in range(0, n, batch_size))


def predict_logits(model: JEM, images: np.ndarray, *, batch_size: int = 256) -> np.ndarray:
    """float32 logits ``[N, K]`` of the model in inference mode."""
    logits = [model.logits(tf.constant(images[a:b]), training=False).numpy()
              for a, b in _batches(len(images), batch_size)]
    return np.concatenate(logits) if logits else np.zeros((0, model.num_classes), np.float32)


def input_gradient_norms(model: JEM, images: np.ndarray, *, batch_size: int = 256) -> np.ndarray:
    """``||d log p(x) / dx||_2`` per image (one compiled function for every batch size)."""

    @tf.function(input_signature=[tf.TensorSpec([None, *model.image_shape], tf.float32)])
    def norms(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            log_px = tf.reduce_sum(model.log_px(x))
        grad = tape.gradient(log_px, x)
        return tf.sqrt(tf.reduce_sum(tf.square(grad), axis=[1, 2, 3]))

    return np.concatenate([norms(tf.constant(images[a:b])).numpy() for a, b in _batches(len(images), batch_size)])


def refine_in_batches(model: JEM, images: np.ndarray, *, n_steps: int, seed: int = 0,
                      batch_size: int = 256) -> np.ndarray:
    """:meth:`JEM.refine` over batches with one seed per batch (reproducible for a seed)."""
    if n_steps == 0:
        return np.asarray(images, np.float32)
    return np.concatenate([model.refine(images[a:b], n_steps=n_steps, seed=np.array([seed, a], np.int64))
                           for a, b in _batches(len(images), batch_size)])


def synthetic_ood_images(kind: str, like: np.ndarray, *, value_range: Sequence[float] = (-1.0, 1.0),
                         seed: int = 0) -> np.ndarray:
    """Synthetic out-of-distribution images shaped like ``like``:

    * ``uniform``: i.i.d. uniform noise on ``value_range``;
    * ``constant``: each image one uniform random value everywhere;
    * ``permuted``: each image of ``like`` with its pixel positions randomly permuted (channels stay
      together), which keeps the pixel histogram and destroys the structure.
    """
    rng = np.random.default_rng(seed)
    like = np.asarray(like, dtype=np.float32)
    low, high = value_range
    if kind == "uniform":
        return rng.uniform(low, high, size=like.shape).astype(np.float32)
    if kind == "constant":
        values = rng.uniform(low, high, size=(like.shape[0], 1, 1, 1))
        return np.broadcast_to(values, like.shape).astype(np.float32)
    if kind == "permuted":
        n, h, w, c = like.shape
        flat = like.reshape(n, h * w, c)
        order = np.argsort(rng.random((n, h * w)), axis=1)
        return np.take_along_axis(flat, order[..., None], axis=1).reshape(like.shape)
    raise ValueError(f"Unknown synthetic OOD set {kind!r}; expected one of {SYNTHETIC_OOD}")


def _upscale_factor(image_shape) -> int:
    return max(1, 64 // int(image_shape[0]))


def _save_grid(path: str, images: np.ndarray, model: JEM, columns: int = 0) -> str:
    grid = image_grid(images, value_range=model.value_range, columns=columns)
    write_png(path, upscale(grid, _upscale_factor(model.image_shape)))
    return path


# ------------------------------------------------------------------------------------- modes
def evaluate_accuracy(model: JEM, images: np.ndarray, labels: np.ndarray, *, refine_steps: Sequence[int] = (10,),
                      seed: int = 0, batch_size: int = 256) -> dict:
    """Test accuracy on the inputs as given and after each number of SGLD refinement steps."""
    results = {"accuracy": float((predict_logits(model, images, batch_size=batch_size).argmax(1) == labels).mean())}
    refined = {}
    for k in refine_steps:
        if k > 0:
            x = refine_in_batches(model, images, n_steps=int(k), seed=seed, batch_size=batch_size)
            refined[str(k)] = float((predict_logits(model, x, batch_size=batch_size).argmax(1) == labels).mean())
    results["accuracy_after_refinement"] = refined
    results["settings"] = {"num_examples": int(len(labels)), "refine_steps": [int(k) for k in refine_steps],
                           "refinement": "unconditional SGLD on log p(x) with the model's sampler settings",
                           "sampler": model.sampler.get_config(), "seed": seed}
    return results


def evaluate_calibration(model: JEM, images: np.ndarray, labels: np.ndarray, *, out_dir: str,
                         val_images: Optional[np.ndarray] = None, val_labels: Optional[np.ndarray] = None,
                         num_bins: int = 20, temperature_scaling: bool = True, batch_size: int = 256) -> dict:
    """ECE/MCE/NLL/Brier on the test inputs, a reliability diagram, and (with validation data) the same
    after temperature scaling fitted on the validation data."""
    logits = predict_logits(model, images, batch_size=batch_size)
    results = {"uncalibrated": metrics_lib.calibration_metrics(logits, labels, num_bins=num_bins)}
    results["reliability_diagram"] = os.path.basename(plots.reliability_diagram(
        results["uncalibrated"]["bins"], os.path.join(out_dir, "reliability.png"),
        title=f"ECE {results['uncalibrated']['ece']:.4f} ({num_bins} bins)"))
    scaling = "off"
    if temperature_scaling and val_images is not None and len(val_images) > 0:
        temperature = metrics_lib.fit_temperature(predict_logits(model, val_images, batch_size=batch_size),
                                                  val_labels)
        results["temperature_scaled"] = metrics_lib.calibration_metrics(
            logits, labels, num_bins=num_bins, temperature=temperature)
        results["reliability_diagram_temperature_scaled"] = os.path.basename(plots.reliability_diagram(
            results["temperature_scaled"]["bins"], os.path.join(out_dir, "reliability_temperature_scaled.png"),
            title=f"T = {temperature:.3f}: ECE {results['temperature_scaled']['ece']:.4f}"))
        scaling = f"fitted on {len(val_images)} validation images (NLL minimised over log T)"
    elif temperature_scaling:
        scaling = "skipped: no validation split (never fitted on test data)"
    results["settings"] = {"num_examples": int(len(labels)), "num_bins": num_bins,
                           "ece_implementation": "tfp.stats.expected_calibration_error",
                           "temperature_scaling": scaling}
    return results


def ood_scores(model: JEM, images: np.ndarray, *, temperature: float = 1.0, scores: Sequence[str] = tuple(OOD_SCORES),
               batch_size: int = 256) -> Dict[str, np.ndarray]:
    """Every requested OOD score of ``images``, each oriented so that higher = more in-distribution."""
    unknown = sorted(set(scores) - set(OOD_SCORES))
    if unknown:
        raise ValueError(f"Unknown OOD scores {unknown}; expected some of {list(OOD_SCORES)}")
    logits = predict_logits(model, images, batch_size=batch_size).astype(np.float64)
    out = {}
    if "log_px" in scores:
        out["log_px"] = np.logaddexp.reduce(logits, axis=1)
    if "max_softmax" in scores:
        out["max_softmax"] = metrics_lib.softmax(logits).max(axis=1)
    if "grad_norm" in scores:
        out["grad_norm"] = -input_gradient_norms(model, images, batch_size=batch_size).astype(np.float64)
    if "energy_t" in scores:
        out["energy_t"] = temperature * np.logaddexp.reduce(logits / temperature, axis=1)
    return out


def evaluate_ood(model: JEM, in_images: np.ndarray, ood_sets: Mapping[str, np.ndarray], *, out_dir: str,
                 temperature: float = 1.0, temperature_source: str = "given",
                 scores: Sequence[str] = tuple(OOD_SCORES), tpr: float = 0.95, batch_size: int = 256) -> dict:
    """OOD detection metrics for every (score, OOD set) pair, plus one histogram PNG per score."""
    if not ood_sets:
        raise ValueError("`ood_sets` is empty; name at least one OOD set.")
    for name, images in ood_sets.items():
        if tuple(images.shape[1:]) != tuple(in_images.shape[1:]):
            raise ValueError(f"OOD set {name!r} has images of shape {tuple(images.shape[1:])}; the model takes "
                             f"{tuple(in_images.shape[1:])}.")
    # All sets scored in one pass (one compiled gradient function), then split.
    names = list(ood_sets)
    everything = np.concatenate([in_images] + [np.asarray(ood_sets[n], np.float32) for n in names])
    all_scores = ood_scores(model, everything, temperature=temperature, scores=scores, batch_size=batch_size)
    bounds = np.cumsum([len(in_images)] + [len(ood_sets[n]) for n in names])
    in_scores = {score: values[:bounds[0]] for score, values in all_scores.items()}
    out_scores = {name: {score: values[bounds[i]:bounds[i + 1]] for score, values in all_scores.items()}
                  for i, name in enumerate(names)}
    results = {score: {name: metrics_lib.ood_metrics(in_scores[score], out_scores[name][score], tpr=tpr)
                       for name in ood_sets} for score in in_scores}
    figures = {}
    for score in in_scores:
        path = os.path.join(out_dir, f"ood_hist_{score}.png")
        plots.score_histograms({"in-distribution (test)": in_scores[score],
                                **{name: out_scores[name][score] for name in ood_sets}},
                               path, title=f"OOD score: {score}", xlabel=OOD_SCORES[score])
        figures[score] = os.path.basename(path)
    summary = {score: {"in_mean": float(np.mean(in_scores[score])),
                       **{f"{name}_mean": float(np.mean(out_scores[name][score])) for name in ood_sets}}
               for score in in_scores}
    return {"metrics": results, "score_means": summary, "histograms": figures,
            "settings": {"positive_class": "in-distribution", "scores": {s: OOD_SCORES[s] for s in in_scores},
                         "temperature": float(temperature), "temperature_source": temperature_source,
                         "tpr": tpr, "num_in": int(len(in_images)),
                         "ood_sets": {name: int(len(images)) for name, images in ood_sets.items()}}}


def _energies(logits: np.ndarray) -> np.ndarray:
    """``E(x) = -logsumexp_y f(x)[y]`` of numpy logits, in float64."""
    return -np.logaddexp.reduce(np.asarray(logits, np.float64), axis=1)


def _sample_summary(model: JEM, samples: np.ndarray, labels: Optional[np.ndarray] = None) -> dict:
    logits = predict_logits(model, samples).astype(np.float64)
    summary = {"num": int(len(samples)), "energy_mean": float(_energies(logits).mean()),
               "max_softmax_mean": float(metrics_lib.softmax(logits).max(axis=1).mean()),
               "pixel_min": float(samples.min()), "pixel_max": float(samples.max())}
    if labels is not None:
        summary["classified_as_conditioning_class"] = float((logits.argmax(1) == labels).mean())
    return summary


def _start_distribution(model: JEM) -> str:
    """Where the model's own sampler starts fresh chains: ``"class_gaussian"`` or ``"uniform"`` (the value
    of ``TrainConfig.chain_init``); the samples and Fréchet modes start there too."""
    return "uniform" if model.chain_init is None else "class_gaussian"


def evaluate_samples(model: JEM, *, out_dir: str, reference_images: np.ndarray, num_samples: int = 64,
                     sample_steps: int = 200, per_class: int = 8, long_chain_steps: int = 1000,
                     long_chain_num: int = 8, long_chain_snapshots: int = 10, seed: int = 0) -> dict:
    """Sample grids (PNG) with energies and confidences: fresh-noise unconditional and class-conditional
    samples, replay-buffer chains, and a long chain with snapshots and an energy trace."""
    for name, value in (("num_samples", num_samples), ("sample_steps", sample_steps), ("per_class", per_class),
                        ("long_chain_num", long_chain_num), ("long_chain_snapshots", long_chain_snapshots)):
        if not (isinstance(value, int) and value >= 1):
            raise ValueError(f"`{name}` must be an int >= 1; received {value!r}")
    if not (isinstance(long_chain_steps, int) and long_chain_steps >= 0):
        raise ValueError(f"`long_chain_steps` must be an int >= 0; received {long_chain_steps!r}")
    k = model.num_classes
    results = {"reference": _sample_summary(model, reference_images)}

    start = _start_distribution(model)
    x = model.sample(num_samples, seed=seed, n_steps=sample_steps)
    results["unconditional"] = {**_sample_summary(model, x), "init": start, "n_steps": sample_steps,
                                "file": os.path.basename(_save_grid(os.path.join(out_dir, "samples_unconditional.png"),
                                                                    x, model))}
    labels = np.repeat(np.arange(k), per_class).astype(np.int32)
    # The same chains' starting points: how much of the class agreement the start alone already gives.
    x = model.sample(len(labels), seed=seed + 1, n_steps=0, labels=labels)
    results["conditional_start"] = {**_sample_summary(model, x, labels), "init": start, "n_steps": 0}
    x = model.sample(len(labels), seed=seed + 1, n_steps=sample_steps, labels=labels)
    results["conditional"] = {**_sample_summary(model, x, labels), "init": start, "n_steps": sample_steps,
                              "layout": f"row i = class i, {per_class} per row",
                              "file": os.path.basename(_save_grid(os.path.join(out_dir, "samples_conditional.png"),
                                                                  x, model, columns=per_class))}
    x = model.sample(num_samples, seed=seed + 2, n_steps=0, init="buffer")
    results["buffer"] = {**_sample_summary(model, x), "init": "replay buffer (as stored, no extra steps)",
                         "file": os.path.basename(_save_grid(os.path.join(out_dir, "samples_buffer.png"), x, model))}

    if long_chain_steps > 0:
        checkpoints = np.unique(np.linspace(0, long_chain_steps, long_chain_snapshots + 1).round().astype(int))
        x = model.sample(long_chain_num, seed=seed + 3, n_steps=0)
        snapshots, energies = [x], [_energies(predict_logits(model, x))]
        for i, (a, b) in enumerate(zip(checkpoints[:-1], checkpoints[1:])):
            x = model.refine(x, n_steps=int(b - a), seed=np.array([seed + 3, i + 1], np.int64))
            snapshots.append(x)
            energies.append(_energies(predict_logits(model, x)))
        # Rows = chains, columns = snapshots in step order.
        grid = np.stack(snapshots, axis=1).reshape(-1, *model.image_shape)
        energies = np.stack(energies)
        reference = results["reference"]["energy_mean"]
        results["long_chain"] = {
            **_sample_summary(model, x), "init": start, "n_steps": long_chain_steps,
            "snapshot_steps": checkpoints.tolist(), "energy_mean_per_snapshot": energies.mean(axis=1).tolist(),
            "layout": "row = chain, column = snapshot",
            "file": os.path.basename(_save_grid(os.path.join(out_dir, "samples_long_chain.png"), grid, model,
                                                columns=len(checkpoints))),
            "energy_trace": os.path.basename(plots.energy_trace(
                checkpoints, energies, os.path.join(out_dir, "long_chain_energy.png"), reference=reference,
                title=f"{long_chain_num} chains from {'uniform noise' if start == 'uniform' else 'class Gaussians'}")),
        }
    results["settings"] = {"sampler": model.sampler.get_config(), "seed": seed, "value_range": list(model.value_range)}
    return results


# ------------------------------------------------------------------------------------- Fréchet distance
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
            for a, b in _batches(len(images), batch_size):
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
    from jem_tf.runs import MODEL_FILE

    path = os.path.join(spec, MODEL_FILE) if os.path.isdir(spec) else spec
    try:
        network = keras.models.load_model(path)
    except Exception as error:  # corrupt or foreign files raise many types
        raise ValueError(f"Cannot load the feature model {path!r}: {error}") from error
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
                               for a, b in _batches(len(images), batch_size)])

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
        f"{_start_distribution(model)}_{sample_steps}_steps": np.concatenate(
            [model.sample(b - a, seed=seed + 1 + a, n_steps=sample_steps) for a, b in _batches(n, batch_size)]),
    }
    if held_out_images is not None and len(held_out_images) >= 2:
        sets["held_out_real_images"] = held_out_images[:n]
    name = "fid" if network.is_inception else "frechet_distance"
    results = {key: {name: metrics_lib.frechet_distance(*reference,
                                                        *metrics_lib.feature_statistics(network.features(images))),
                     "num_images": int(len(images))}
               for key, images in sets.items()}
    return {"distances": results, "settings": {
        "feature_network": network.description, "metric_name": name, "num_test_images": n, "seed": seed,
        "note": ("Inception features: comparable to other FIDs only if the weights are the standard ones"
                 if network.is_inception else
                 "Fréchet distance in the named network's features; not an FID and not comparable to published FIDs")}}


# ------------------------------------------------------------------------------------- robustness
def evaluate_robustness(model: JEM, images: np.ndarray, labels: np.ndarray, *, eps: Mapping[str, Sequence[float]],
                        steps: int = 20, refine_steps: int = 10, max_examples: int = 500, seed: int = 0,
                        batch_size: int = 256) -> dict:
    """Accuracy under PGD attacks at each ``eps`` (in [0, 1] pixel units, scaled to the model's value
    range), with and without ``refine_steps`` SGLD refinement steps of the attacked inputs."""
    unknown = sorted(set(eps) - set(NORMS))
    if unknown:
        raise ValueError(f"Unknown norms {unknown}; expected some of {NORMS}")
    images, labels = images[:max_examples], labels[:max_examples]
    low, high = model.value_range
    scale = high - low

    def accuracy(x):
        return float((predict_logits(model, x, batch_size=batch_size).argmax(1) == labels).mean())

    def refined_accuracy(x):
        return accuracy(refine_in_batches(model, x, n_steps=refine_steps, seed=seed, batch_size=batch_size))

    results = {"clean": {"accuracy": accuracy(images), "accuracy_refined": refined_accuracy(images)}}
    for norm, values in eps.items():
        attack = PGD(lambda x: model.logits(x, training=False), image_shape=model.image_shape, norm=norm,
                     steps=steps, value_range=model.value_range)
        for e in values:
            x_adv = attack(images, labels, eps=float(e) * scale, seed=seed, batch_size=batch_size)
            results[f"{norm}_eps_{e:g}"] = {"norm": norm, "eps_pixel_scale": float(e), "eps_input_units": float(e) * scale,
                                            "accuracy": accuracy(x_adv), "accuracy_refined": refined_accuracy(x_adv)}
    results["settings"] = {
        "num_examples": int(len(labels)), "attack": f"PGD, {steps} steps, step 2.5*eps/steps, random start",
        "attack_gradients": "through the classifier f(x) only (refinement is not differentiated through)",
        "eps_units": f"fraction of the pixel range; input units = eps * {scale:g}",
        "refine_steps": refine_steps, "sampler": model.sampler.get_config(), "seed": seed}
    return results


# ------------------------------------------------------------------------------------- whole report
def evaluate(model: JEM, *, test_images: np.ndarray, test_labels: np.ndarray, out_dir: str,
             modes: Sequence[str] = DEFAULT_MODES, val_images: Optional[np.ndarray] = None,
             val_labels: Optional[np.ndarray] = None, ood_sets: Optional[Mapping[str, np.ndarray]] = None,
             feature_network: Optional[FeatureNetwork] = None, input_noise_std: float = 0.0, seed: int = 0,
             num_bins: int = 20, temperature_scaling: bool = True, refine_steps: Sequence[int] = (10,),
             sample_steps: int = 200, num_samples: int = 64, long_chain_steps: int = 1000,
             frechet_images: int = 1000, pgd_eps: Optional[Mapping[str, Sequence[float]]] = None,
             pgd_steps: int = 20, robustness_examples: int = 500, robustness_refine_steps: int = 10,
             batch_size: int = 256, model_info: Optional[dict] = None) -> dict:
    """Runs ``modes`` and writes ``out_dir/report.json`` and the figures; returns the report.

    Args:
        model: A trained :class:`JEM`.
        test_images, test_labels: In-distribution test data in the model's value range.
        out_dir: Output directory (created).
        modes: Some of ``MODES``. Default ``DEFAULT_MODES``.
        val_images, val_labels: Held-out data for temperature scaling (never the test split).
        ood_sets: ``{name: images}`` out-of-distribution sets (mode ``ood``); see
            :func:`synthetic_ood_images`.
        feature_network: Needed by mode ``frechet``; see :func:`load_feature_network`.
        input_noise_std: Gaussian noise std added to every evaluated input (default 0: inputs as given).
        seed: Seed of every random choice of the evaluation.
        The rest: settings of the modes (see the ``evaluate_*`` functions).
    """
    unknown = [m for m in modes if m not in MODES]
    if unknown or not modes:
        raise ValueError(f"`modes` must be a non-empty subset of {MODES}; received {list(modes)}")
    test_images = np.asarray(test_images, np.float32)
    if tuple(test_images.shape[1:]) != tuple(model.image_shape):
        raise ValueError(f"Test images have shape {tuple(test_images.shape[1:])}; the model takes "
                         f"{tuple(model.image_shape)}.")
    if "ood" in modes and not ood_sets:
        raise ValueError("Mode 'ood' needs `ood_sets` (e.g. {'uniform': synthetic_ood_images('uniform', x)}).")
    if "frechet" in modes and feature_network is None:
        raise ValueError("Mode 'frechet' needs a feature network (--feature-model PATH or inception_v3 with "
                         "--inception-weights FILE); there is no default, so no FID is reported under another name.")
    if not input_noise_std >= 0:
        raise ValueError(f"`input_noise_std` must be >= 0; received {input_noise_std!r}")
    os.makedirs(out_dir, exist_ok=True)
    transforms = ["none: inputs used as loaded (training-time data noise is off)"]
    ood_sets = dict(ood_sets or {})
    if input_noise_std > 0:
        rng = np.random.default_rng(seed)

        def noisy(x):
            return (x + rng.normal(0.0, input_noise_std, size=x.shape)).astype(np.float32)

        test_images = noisy(test_images)
        ood_sets = {name: noisy(np.asarray(x, np.float32)) for name, x in ood_sets.items()}
        transforms = [f"gaussian noise std {input_noise_std} added to test and OOD inputs (seed {seed})"]

    report = {"schema_version": SCHEMA_VERSION, "model": dict(model_info or {}),
              "settings": {"modes": list(modes), "seed": seed, "transforms": transforms, "batch_size": batch_size,
                           "num_test": int(len(test_labels)), "value_range": list(model.value_range)},
              "timing_s": {}}
    report["model"].update({"num_params": int(model.backbone.count_params()), "image_shape": list(model.image_shape),
                            "num_classes": model.num_classes, "px_weight": model.px_weight,
                            "sampler": model.sampler.get_config()})
    for mode in MODES:
        if mode not in modes:
            continue
        start = time.perf_counter()
        if mode == "accuracy":
            report[mode] = evaluate_accuracy(model, test_images, test_labels, refine_steps=refine_steps, seed=seed,
                                             batch_size=batch_size)
        elif mode == "calibration":
            report[mode] = evaluate_calibration(model, test_images, test_labels, out_dir=out_dir, val_images=val_images,
                                                val_labels=val_labels, num_bins=num_bins,
                                                temperature_scaling=temperature_scaling, batch_size=batch_size)
        elif mode == "ood":
            temperature, source = 1.0, "1 (no validation split to fit it on)"
            if val_images is not None and len(val_images) > 0:
                source = "fitted on the validation split"
                if "temperature_scaled" in report.get("calibration", {}):  # mode calibration fitted it already
                    temperature = report["calibration"]["temperature_scaled"]["temperature"]
                else:
                    temperature = metrics_lib.fit_temperature(
                        predict_logits(model, val_images, batch_size=batch_size), val_labels)
            report[mode] = evaluate_ood(model, test_images, ood_sets, out_dir=out_dir, temperature=temperature,
                                        temperature_source=source, batch_size=batch_size)
        elif mode == "samples":
            report[mode] = evaluate_samples(model, out_dir=out_dir, reference_images=test_images[:1000],
                                            num_samples=num_samples, sample_steps=sample_steps,
                                            long_chain_steps=long_chain_steps, seed=seed)
        elif mode == "frechet":
            report[mode] = evaluate_frechet(model, test_images, network=feature_network, held_out_images=val_images,
                                            num_images=frechet_images, sample_steps=sample_steps, seed=seed,
                                            batch_size=batch_size)
        elif mode == "robustness":
            report[mode] = evaluate_robustness(model, test_images, test_labels,
                                               eps=pgd_eps or {"linf": (0.03, 0.1), "l2": (0.5, 1.0)},
                                               steps=pgd_steps, refine_steps=robustness_refine_steps,
                                               max_examples=robustness_examples, seed=seed, batch_size=batch_size)
        report["timing_s"][mode] = round(time.perf_counter() - start, 2)
    tmp = os.path.join(out_dir, REPORT_FILE + ".tmp")
    with open(tmp, "w") as f:
        json.dump(report, f, indent=2)
    os.replace(tmp, os.path.join(out_dir, REPORT_FILE))
    return report


# ------------------------------------------------------------------------------------- CLI
def _ood_sets(names: Sequence[str], test_images: np.ndarray, *, value_range, seed: int, data_dir: Optional[str],
              max_images: Optional[int]) -> Dict[str, np.ndarray]:
    from jem_tf.data import load_dataset

    sets = {}
    for i, name in enumerate(names):
        if name in SYNTHETIC_OOD:
            images = synthetic_ood_images(name, test_images, value_range=value_range, seed=seed + 1 + i)
        else:
            images = load_dataset(name, data_dir=data_dir).x_test
        sets[name] = images[:max_images] if max_images else images
    return sets


def _summary_lines(report: dict) -> List[str]:
    lines = []
    if "accuracy" in report:
        refined = ", ".join(f"{k} steps {v:.4f}" for k, v in report["accuracy"]["accuracy_after_refinement"].items())
        lines.append(f"accuracy {report['accuracy']['accuracy']:.4f}" + (f" (refined: {refined})" if refined else ""))
    if "calibration" in report:
        c = report["calibration"]["uncalibrated"]
        lines.append(f"ECE {c['ece']:.4f}  MCE {c['mce']:.4f}  NLL {c['nll']:.4f}  Brier {c['brier']:.4f}")
        if "temperature_scaled" in report["calibration"]:
            t = report["calibration"]["temperature_scaled"]
            lines.append(f"temperature {t['temperature']:.3f}: ECE {t['ece']:.4f}  NLL {t['nll']:.4f}")
    if "ood" in report:
        for score, per_set in report["ood"]["metrics"].items():
            lines.append(f"OOD AUROC [{score}] " + "  ".join(f"{n} {m['auroc']:.4f}" for n, m in per_set.items()))
    if "frechet" in report:
        name = report["frechet"]["settings"]["metric_name"]
        lines.append(f"{name} " + "  ".join(f"{k} {v[name]:.3f}" for k, v in report["frechet"]["distances"].items()))
    if "robustness" in report:
        lines.append("robust accuracy (plain / refined) " + "  ".join(
            f"{k} {v['accuracy']:.3f}/{v['accuracy_refined']:.3f}" for k, v in report["robustness"].items()
            if k != "settings"))
    return lines


def main(argv: Optional[List[str]] = None) -> int:
    from jem_tf.data import DATASETS, EVALUATION_ONLY_DATASETS, DataNotFoundError
    from jem_tf.runs import held_out_split, load_run_dataset, load_trained_model

    parser = OneLineErrorParser(prog="python -m jem_tf.evaluate",
                                description="Evaluate a trained JEM: accuracy, calibration, OOD detection, samples, "
                                            "Fréchet distance and adversarial robustness.")
    parser.add_argument("--model", required=True, help="training work directory or .keras file")
    parser.add_argument("--dataset", choices=DATASETS, default=None,
                        help="in-distribution dataset (default: the run's)")
    parser.add_argument("--data-dir", default=None, help="data directory of --dataset")
    parser.add_argument("--ood", nargs="+", default=["uniform", "constant", "permuted"],
                        choices=DATASETS + EVALUATION_ONLY_DATASETS + SYNTHETIC_OOD, metavar="NAME",
                        help=f"OOD sets: {', '.join(SYNTHETIC_OOD + EVALUATION_ONLY_DATASETS + DATASETS)}")
    parser.add_argument("--ood-data-dir", default=None, help="data directory of the named OOD datasets")
    parser.add_argument("--max-ood-images", type=int, default=None, help="cap on images per OOD set")
    parser.add_argument("--out", required=True, help="output directory for report.json and PNG figures")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(DEFAULT_MODES), metavar="MODE",
                        help=f"some of {', '.join(MODES)} (default: {' '.join(DEFAULT_MODES)})")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--max-test-images", type=int, default=None, help="evaluate on the first N test images")
    parser.add_argument("--input-noise-std", type=float, default=0.0,
                        help="Gaussian noise added to evaluated inputs (default 0: none, unlike the reference code)")
    parser.add_argument("--num-bins", type=int, default=20, help="calibration bins (default 20)")
    parser.add_argument("--temperature-scaling", choices=["true", "false"], default="true")
    parser.add_argument("--refine-steps", type=int, nargs="+", default=[10], help="SGLD refinement steps (accuracy)")
    parser.add_argument("--sample-steps", type=int, default=200, help="SGLD steps from fresh noise")
    parser.add_argument("--num-samples", type=int, default=64)
    parser.add_argument("--long-chain-steps", type=int, default=1000)
    parser.add_argument("--feature-model", default=None,
                        help=f"Fréchet features: a work directory / .keras classifier, or {INCEPTION}")
    parser.add_argument("--feature-layer", default=None, help="layer of --feature-model (default: penultimate)")
    parser.add_argument("--inception-weights", default=None, help=f"local weights file for {INCEPTION}")
    parser.add_argument("--frechet-images", type=int, default=1000)
    parser.add_argument("--pgd-linf-eps", type=float, nargs="*", default=[0.03, 0.1],
                        help="L-inf budgets as fractions of the pixel range")
    parser.add_argument("--pgd-l2-eps", type=float, nargs="*", default=[0.5, 1.0],
                        help="L2 budgets in units of the pixel range")
    parser.add_argument("--pgd-steps", type=int, default=20)
    parser.add_argument("--robustness-examples", type=int, default=500)
    parser.add_argument("--robustness-refine-steps", type=int, default=10)
    args = parser.parse_args(argv)
    for name in ("batch_size", "num_bins", "sample_steps", "num_samples", "frechet_images", "pgd_steps",
                 "robustness_examples", "max_test_images", "max_ood_images"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1; received {value}")
    for name in ("long_chain_steps", "robustness_refine_steps"):
        if getattr(args, name) < 0:
            parser.error(f"--{name.replace('_', '-')} must be >= 0; received {getattr(args, name)}")
    if any(k < 0 for k in args.refine_steps) or args.input_noise_std < 0:
        parser.error("--refine-steps and --input-noise-std must be >= 0")
    if any(e < 0 for e in args.pgd_linf_eps + args.pgd_l2_eps):
        parser.error("PGD budgets must be >= 0")
    started = time.perf_counter()
    try:
        model, config = load_trained_model(args.model)
        dataset = args.dataset or (config.dataset if config else None)
        if dataset is None:
            parser.error("--dataset is needed with a bare .keras file")
        data = load_run_dataset(dataset, config=config, data_dir=args.data_dir)
        x_val, y_val, split = held_out_split(dataset, config=config, data=data)
        if split != "validation":  # temperatures are never fitted on test data
            x_val = y_val = None
        x_test, y_test = data.x_test[:args.max_test_images], data.y_test[:args.max_test_images]
        ood_sets = (_ood_sets(args.ood, x_test, value_range=model.value_range, seed=args.seed,
                              data_dir=args.ood_data_dir, max_images=args.max_ood_images)
                    if "ood" in args.modes else {})
        network = None
        if "frechet" in args.modes:
            if args.feature_model is None:
                parser.error(f"--modes frechet needs --feature-model (a classifier's work directory / .keras file, "
                             f"or {INCEPTION} with --inception-weights); no FID is reported with another network")
            network = load_feature_network(args.feature_model, image_shape=model.image_shape, layer=args.feature_layer,
                                           inception_weights=args.inception_weights, batch_size=args.batch_size)
        report = evaluate(
            model, test_images=x_test, test_labels=y_test, out_dir=args.out, modes=args.modes, val_images=x_val,
            val_labels=y_val, ood_sets=ood_sets, feature_network=network, input_noise_std=args.input_noise_std,
            seed=args.seed, num_bins=args.num_bins, temperature_scaling=args.temperature_scaling == "true",
            refine_steps=args.refine_steps, sample_steps=args.sample_steps, num_samples=args.num_samples,
            long_chain_steps=args.long_chain_steps, frechet_images=args.frechet_images,
            pgd_eps={"linf": args.pgd_linf_eps, "l2": args.pgd_l2_eps}, pgd_steps=args.pgd_steps,
            robustness_examples=args.robustness_examples, robustness_refine_steps=args.robustness_refine_steps,
            batch_size=args.batch_size,
            model_info={"path": os.path.abspath(args.model), "dataset": dataset,
                        "train_config": dataclasses.asdict(config) if config else None})
    except (ValueError, DataNotFoundError) as error:
        parser.error(str(error))
    for line in _summary_lines(report):
        print(line)
    print(f"wrote {os.path.join(args.out, REPORT_FILE)} ({time.perf_counter() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
