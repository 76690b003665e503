"""OOD detection of trained runs, measured with the exported model (plain Python, CPU or GPU).

    python bench/ood_detectors.py --run jem=runs/fashion_mnist --run classifier=runs/fashion_mnist_clf \
        --ood uniform constant permuted mnist_5k --out bench/results/ood_fashion_mnist.json
    python bench/ood_detectors.py --run jem=runs/digits --run classifier=runs/digits_clf \
        --ood uniform constant permuted fashion_mnist_8x8 --out bench/results/ood_digits.json

For every run: exports it as `python -m jem_tf.export` does (the OOD detector chosen and calibrated on the
run's validation split and outliers made from it, Mahalanobis statistics from its training split), loads
the SavedModel with `tf.saved_model.load`, and scores the test split and each OOD set through the `energy`
signature's `ood_score`: AUROC, FPR at 95 % TPR, and the share of each set the exported threshold flags.
Then, for comparison, every candidate score of `jem_tf.ood` on the same sets (the table of
`python -m jem_tf.evaluate --modes ood`). OOD sets: the synthetic `uniform`, `constant`, `permuted` (of the
test images), a dataset name (its test split, e.g. `mnist_5k`), or `NAME_HxW` for a dataset's test images
resized to the model's size (e.g. `fashion_mnist_8x8` for an 8x8 digits model). Nothing here is tuned: the
detector and its threshold never see these sets.
"""

import argparse
import json
import os
import platform
import tempfile
import time

import numpy as np


def load_ood_set(name, test_images, *, model, seed, data_dir):
    from jem_tf.data import load_dataset
    from jem_tf.evaluation import SYNTHETIC_OOD, synthetic_ood_images

    if name in SYNTHETIC_OOD:
        return synthetic_ood_images(name, test_images, value_range=model.value_range, seed=seed)
    base, _, size = name.rpartition("_")
    if base and "x" in size and all(part.isdigit() for part in size.split("x")):
        import tensorflow as tf

        h, w = (int(part) for part in size.split("x"))
        images = load_dataset(base, data_dir=data_dir).x_test
        resized = tf.image.resize(images, (h, w), method="area").numpy()
        return np.clip(resized, *model.value_range).astype(np.float32)
    return load_dataset(name, data_dir=data_dir).x_test


def measure_run(label, workdir, ood_names, *, seed, data_dir, max_images, out_dir):
    import tensorflow as tf

    from jem_tf.evaluation import evaluate_ood
    from jem_tf.metrics import ood_metrics
    from jem_tf.ood import OODScorer, fit_ood_detector
    from jem_tf.run.model_files import load_trained_model
    from jem_tf.run.splits import load_run_dataset, ood_calibration_data
    from jem_tf.serving import export_saved_model

    model, config = load_trained_model(workdir)
    data = load_run_dataset(config=config)
    calibration, train = ood_calibration_data(config.dataset, config=config, data=data)
    start = time.perf_counter()
    ood = fit_ood_detector(model, calibration.images, calibration_split="validation",
                           calibration_labels=calibration.labels, train_images=train.images, train_labels=train.labels,
                           seed=seed)
    fit_seconds = time.perf_counter() - start
    test = data.x_test[:max_images]
    sets = {name: load_ood_set(name, test, model=model, seed=seed + 1 + i, data_dir=data_dir)[:max_images]
            for i, name in enumerate(ood_names)}
    export_dir = os.path.join(out_dir, label)
    path = export_saved_model(model, export_dir, ood=ood, dataset=config.dataset)
    energy = tf.saved_model.load(path).signatures["energy"]

    def served(images):
        parts = [energy(images=tf.constant(images[a:a + 500])) for a in range(0, len(images), 500)]
        return (np.concatenate([p["ood_score"].numpy() for p in parts]),
                np.concatenate([p["is_in_distribution"].numpy() for p in parts]))

    score_in, flag_in = served(test)
    exported = {"score": ood.detector.name, "threshold": ood.detector.threshold,
                "test_tpr": float(flag_in.mean()), "sets": {}}
    for name, images in sets.items():
        score_out, flag_out = served(images)
        exported["sets"][name] = {**ood_metrics(score_in, score_out), "flagged": float(1 - flag_out.mean())}
    # Every candidate, for comparison (selection repeated inside: the same validation data, the same choice).
    scorer = OODScorer.fit(model, train_images=train.images, train_labels=train.labels, val_images=calibration.images,
                           val_labels=calibration.labels)
    table = evaluate_ood(model, test, sets, out_dir=tempfile.mkdtemp(), scorer=scorer, val_images=calibration.images,
                         seed=seed)
    return {"label": label, "workdir": workdir, "dataset": config.dataset, "px_weight": config.px_weight,
            "num_test": int(len(test)), "ood_sets": {k: int(len(v)) for k, v in sets.items()},
            "detector_fit_seconds": fit_seconds, "exported": exported, "selection": ood.calibration["selection"],
            "all_scores": {score: {name: m["auroc"] for name, m in per_set.items()}
                           for score, per_set in table["metrics"].items()},
            "chosen_in_evaluation": table["detector"]["chosen"]}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", action="append", required=True, metavar="LABEL=WORKDIR",
                        help="a training work directory and its label (repeat)")
    parser.add_argument("--ood", nargs="+", default=["uniform", "constant", "permuted"])
    parser.add_argument("--data-dir", default=None, help="data directory of named OOD datasets")
    parser.add_argument("--max-images", type=int, default=None, help="cap on test and OOD images per set")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="write the records as JSON here")
    args = parser.parse_args(argv)
    runs = [spec.split("=", 1) for spec in args.run]
    if any(len(r) != 2 for r in runs):
        parser.error("--run takes LABEL=WORKDIR")
    records = []
    with tempfile.TemporaryDirectory() as out_dir:
        for label, workdir in runs:
            record = measure_run(label, workdir, args.ood, seed=args.seed, data_dir=args.data_dir,
                                 max_images=args.max_images, out_dir=out_dir)
            records.append(record)
            exported = record["exported"]
            print(f"{label} ({workdir}): exported ood_score = {exported['score']} (threshold "
                  f"{exported['threshold']:.4g}, test TPR {exported['test_tpr']:.3f}; chosen on validation + "
                  f"{', '.join(record['selection']['outlier_kinds'])})")
            print("  exported AUROC / FPR@95 / flagged: " + "  ".join(
                f"{name} {m['auroc']:.4f}/{m['fpr_at_95_tpr']:.3f}/{m['flagged']:.3f}"
                for name, m in exported["sets"].items()))
            for score, per_set in record["all_scores"].items():
                mark = " *" if score == exported["score"] else ""
                print(f"  {score}{mark}: " + "  ".join(f"{name} {v:.4f}" for name, v in per_set.items()))
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump({"machine": platform.processor() or platform.machine(), "seed": args.seed,
                       "records": records}, f, indent=2)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
