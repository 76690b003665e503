"""Development pairings of the OOD selection rule: what the rule of `jem_tf.ood` was designed on.

    python bench/ood_selection_dev.py runs/digits runs/fashion_mnist --out bench/results/ood_selection_dev.json

For each run (a training work directory), the detector is chosen as the export chooses it (validation
split, outliers and accepted shifts made from it, Mahalanobis statistics of the training split), and every
candidate is then scored on *development pairings*: the run's validation images (in-distribution) against
real images that are never a reported OOD set of that model:

* `photo_patches`: grey-scale patches of the two photographs that ship with scikit-learn
  (`sklearn.datasets.load_sample_images`), cut at random and resized to the model's size;
* `fashion_mnist_train_HxW` (models smaller than 28x28): Fashion-MNIST *training* images resized to the
  model's size (the reported near-OOD set of a digits model is the Fashion-MNIST *test* split).

No test split, no reported OOD set (uniform, constant, permuted, mnist_5k, the Fashion-MNIST test split) is
read. The table shows each candidate's worst outlier AUROC (what the rule ranks by), the share of accepted
shifts it accepts, and its AUROC on each pairing; the chosen one is starred.
"""

import argparse
import json

import numpy as np


def photo_patches(count, shape, *, value_range, seed):
    """``count`` grey-scale patches of scikit-learn's sample photographs, resized to ``shape`` (H, W, C)."""
    import tensorflow as tf
    from sklearn.datasets import load_sample_images

    rng = np.random.default_rng(seed)
    photos = [np.asarray(image, np.float32).mean(axis=2) / 255.0 for image in load_sample_images().images]
    h, w, c = shape
    size = 4 * max(h, 7)
    patches = []
    for i in range(count):
        photo = photos[i % len(photos)]
        r, q = rng.integers(0, photo.shape[0] - size), rng.integers(0, photo.shape[1] - size)
        patches.append(photo[r:r + size, q:q + size])
    patches = tf.image.resize(np.stack(patches)[..., None], (h, w), method="area").numpy()
    low, high = value_range
    return np.repeat(low + (high - low) * patches, c, axis=3).astype(np.float32)


def dev_sets(model, config, count, seed):
    from jem_tf.data import load_dataset

    shape = tuple(model.image_shape)
    sets = {"photo_patches": photo_patches(count, shape, value_range=model.value_range, seed=seed)}
    if shape[0] < 28 and config.dataset != "fashion_mnist":
        import tensorflow as tf

        train = load_dataset("fashion_mnist").x_train[:count]
        resized = tf.image.resize(train, shape[:2], method="area").numpy()
        sets[f"fashion_mnist_train_{shape[0]}x{shape[1]}"] = np.clip(resized, *model.value_range).astype(np.float32)
    return sets


def measure(workdir, *, count, seed):
    from jem_tf.ood import OODScorer, auroc, default_candidates, select_detector
    from jem_tf.run.model_files import load_trained_model
    from jem_tf.run.splits import load_run_dataset, ood_calibration_data

    model, config = load_trained_model(workdir)
    data = load_run_dataset(config=config)
    calibration, train = ood_calibration_data(config.dataset, config=config, data=data)
    scorer = OODScorer.fit(model, train_images=train.images, train_labels=train.labels,
                           val_images=calibration.images, val_labels=calibration.labels)
    candidates = default_candidates(scorer.available)
    components = sorted({n for c in candidates for n in c.components})
    reference = scorer.arrays(calibration.images, components)
    chosen, report = select_detector(scorer, calibration.images, candidates=candidates, seed=seed,
                                     validation_components=reference)
    sets = {name: scorer.arrays(images, components) for name, images in dev_sets(model, config, count, seed).items()}
    rows = {}
    for candidate in candidates:
        detector = candidate.fitted(reference)
        scores_in = detector.combine(reference)
        row = report["candidates"][candidate.name]
        rows[candidate.name] = {"worst_outlier": row["worst"], "mean_outlier": row["mean"],
                                "mean_accepted": row["mean_accepted"],
                                **{name: auroc(scores_in, detector.combine(values)) for name, values in sets.items()}}
    return {"workdir": workdir, "dataset": config.dataset, "chosen": chosen.name, "selection": report, "dev": rows}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+")
    parser.add_argument("--count", type=int, default=2000, help="images per development set")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    records = []
    for workdir in args.runs:
        record = measure(workdir, count=args.count, seed=args.seed)
        records.append(record)
        sets = [k for k in next(iter(record["dev"].values())) if k not in ("worst_outlier", "mean_outlier",
                                                                               "mean_accepted")]
        print(f"\n{workdir} ({record['dataset']}): chosen {record['chosen']}")
        print(f"{'candidate':48s} worst  mean  accept " + " ".join(f"{s[:22]:>22s}" for s in sets))
        for name, row in sorted(record["dev"].items(), key=lambda kv: -kv[1]["worst_outlier"]):
            mark = "*" if name == record["chosen"] else " "
            print(f"{mark}{name:47s} {row['worst_outlier']:.3f} {row['mean_outlier']:.3f} "
                  f"{row['mean_accepted'] or 0:.3f}  " + " ".join(f"{row[s]:22.4f}" for s in sets))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(records, f, indent=1)


if __name__ == "__main__":
    main()
