"""How stable is `--precision auto`'s probe? Runs the probe (no cache) N times on a recipe's network and prints
each decision and timing, so that it can be run on an idle machine and beside a busy one (e.g. while another
training runs) and the decisions compared.

    python bench/precision_probe.py --recipe digits --trials 5 [--out bench/results/precision_probe.json]
"""

import argparse
import json
import time


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", default="digits")
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--label", default="", help="e.g. idle or busy (recorded)")
    parser.add_argument("--out", default=None, help="append the records to this JSON list")
    args = parser.parse_args(argv)

    from jem_tf.data import load_dataset
    from jem_tf.run.config import load_recipe
    from jem_tf.training.factories import build_float32_backbone
    from jem_tf.training.precision import machine_kind, resolve_precision

    config = load_recipe(args.recipe)
    data = load_dataset(config.dataset, data_dir=config.data_dir)
    backbone = build_float32_backbone(config, image_shape=data.x_train.shape[1:], num_classes=data.num_classes)
    records = []
    for trial in range(args.trials):
        start = time.perf_counter()
        chosen, report = resolve_precision("auto", backbone=backbone, batch_size=config.batch_size, log=None,
                                           cache_dir=None)
        seconds = report["probe_seconds_per_step"]
        records.append({"recipe": args.recipe, "label": args.label, "trial": trial, "precision": chosen,
                        "probe_ms": {k: 1000 * v for k, v in seconds.items()},
                        "probe_wall_s": time.perf_counter() - start})
        print(f"{args.label or 'run'} trial {trial}: {chosen:<15} " +
              "  ".join(f"{k} {1000 * v:.2f} ms" for k, v in seconds.items()) +
              f"  ratio {seconds['float32'] / seconds['mixed_bfloat16']:.2f}", flush=True)
    if args.out:
        try:
            existing = json.load(open(args.out))
        except OSError:
            existing = []
        json.dump(existing + [{"machine": machine_kind(), **r} for r in records], open(args.out, "w"), indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
