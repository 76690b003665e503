"""Development scores of trained runs: what the conversion recipes were chosen on (validation data only).

    python bench/conversion_dev.py runs/exp/a runs/exp/b            # one JSON line per run
    python bench/conversion_dev.py --chain-energies runs/fashion_mnist_clf
    python bench/conversion_dev.py --feature-model runs/fashion_mnist_clf runs/exp/a   # + Fréchet distance

For each run (a training work directory): accuracy, ECE (20 bins) and NLL on the run's validation split,
the AUROC of log p(x) between the validation images and each kind of outlier the library makes from them
(`jem_tf.ood.outliers`: accepted shifts and outlier kinds), the final training energy gap and the training time
from `metrics.json`;
with --feature-model, the Fréchet distance between the validation images and 1,000 samples after 200 SGLD
steps from the model's start distribution, in that classifier's penultimate features. No test image and no
OOD set is read.

--chain-energies: for a classifier's run, the mean energy (and max p(y|x)) of 500 chains started from the
class Gaussians of its training split after 0, 1, 5 and 20 proximal SGLD steps of several sizes, against
its validation images and uniform noise: how far below the data short chains reach.
"""

import argparse
import json
import os
import sys

import numpy as np


def dev_scores(workdir, feature_model=None):
    from jem_tf.evaluation.frechet import evaluate_frechet, load_feature_network
    from jem_tf.metrics import calibration_metrics
    from jem_tf.ood import auroc, outliers
    from jem_tf.run.model_files import load_trained_model
    from jem_tf.run.splits import load_run_dataset, split_train_validation

    model, config = load_trained_model(workdir)
    data = load_run_dataset(config=config)
    _, validation = split_train_validation(config, data.x_train, data.y_train)
    logits = model.predict(validation.images, batch_size=500, verbose=0)
    calibration = calibration_metrics(logits, validation.labels)
    log_px = model.log_px(validation.images, batch_size=500)
    row = {"val_accuracy": round(calibration["accuracy"], 4), "val_ece": round(calibration["ece"], 4),
           "val_nll": round(calibration["nll"], 4)}
    for kind in outliers.ACCEPTED_SHIFTS + outliers.OUTLIER_KINDS:
        made = outliers.make(kind, validation.images, value_range=model.value_range, seed=1)
        row[f"auroc_{kind}"] = round(auroc(log_px, model.log_px(made, batch_size=500)), 3)
    if feature_model:
        network = load_feature_network(feature_model, image_shape=model.image_shape)
        frechet = evaluate_frechet(model, validation.images, network=network, num_images=1000, sample_steps=200)
        row["frechet"] = {k: round(v["frechet_distance"], 1) for k, v in frechet["distances"].items()}
    metrics = json.load(open(os.path.join(workdir, "metrics.json")))
    row["energy_gap"] = round(metrics["final_train"].get("energy_gap", float("nan")), 2)
    row["train_seconds"] = round(metrics["train_seconds"])
    return row


def chain_energies(workdir, num=500):
    import tensorflow as tf

    from jem_tf import JEM, ClassGaussian, SGLDSampler
    from jem_tf.run.model_files import load_trained_model
    from jem_tf.run.splits import load_run_dataset, split_train_validation

    model, config = load_trained_model(workdir)
    data = load_run_dataset(config=config)
    train, validation = split_train_validation(config, data.x_train, data.y_train)
    jem = JEM(model.backbone, buffer_size=16, chain_init=ClassGaussian.fit(*train, num_classes=data.num_classes),
              sampler=SGLDSampler(step_size=1.0, noise_std=0.0, n_steps=5, grad_clamp=1.0, clamp_range=(-1, 1)))
    noise = np.random.default_rng(0).uniform(-1, 1, (num, *jem.image_shape)).astype("float32")
    rows = {"validation images": float(jem.energy(validation.images[:num]).mean()),
            "uniform noise": float(jem.energy(noise).mean())}
    for step_size in (1.0, 0.1, 0.01):
        for n_steps in (0, 1, 5, 20):
            x = jem.sample(num, seed=0, n_steps=n_steps, step_size=step_size)
            confidence = tf.reduce_max(tf.nn.softmax(jem.predict(x, verbose=0)), axis=1).numpy().mean()
            rows[f"class Gaussians, {n_steps} steps of {step_size}"] = (float(jem.energy(x).mean()), float(confidence))
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+")
    parser.add_argument("--feature-model", default=None)
    parser.add_argument("--chain-energies", action="store_true")
    args = parser.parse_args(argv)
    for workdir in args.runs:
        row = chain_energies(workdir) if args.chain_energies else dev_scores(workdir, args.feature_model)
        print(workdir, json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
