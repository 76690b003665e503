"""Markdown tables (scores x OOD sets, per model) from `bench/ood_detectors.py` JSON files.

    python bench/ood_table.py bench/results/ood_digits.json bench/results/ood_fashion_mnist.json

Rows: every score of `jem_tf.ood`; columns: each model's AUROC per OOD set; the exported detector of
each model is marked with a star, and the last row repeats what the exported SavedModel measured.
"""

import json
import sys


def table(path: str) -> str:
    records = json.load(open(path))["records"]
    sets = list(records[0]["ood_sets"])
    header = "| score | " + " | ".join(f"{r['label']}: {' / '.join(sets)}" for r in records) + " |"
    lines = [header, "| --- |" + " --- |" * len(records)]
    scores = list(records[0]["all_scores"])
    for score in scores:
        cells = []
        for r in records:
            values = " / ".join(f"{r['all_scores'][score][s]:.3f}" for s in sets)
            cells.append(f"**{values}** ★" if score == r["exported"]["score"] else values)
        lines.append(f"| `{score}` | " + " | ".join(cells) + " |")
    cells = [" / ".join(f"{r['exported']['sets'][s]['auroc']:.3f}" for s in sets)
             + f" (`{r['exported']['score']}`; test TPR at the threshold {r['exported']['test_tpr']:.3f})"
             for r in records]
    lines.append("| exported `ood_score`, measured through the SavedModel | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    for path in sys.argv[1:]:
        print(f"{path}:\n\n{table(path)}\n")
