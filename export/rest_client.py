"""REST client for a jem-tf model served by TensorFlow Serving (standard library + numpy only).

    python export/rest_client.py --signature classify --images images.npy
    python export/rest_client.py --signature energy --images images.npy
    python export/rest_client.py --signature sample --num-samples 16 --n-steps 200 --seed 7 --out samples.npy

Images: float32 [N, H, W, C] already scaled to the model's value range (see the export's
assets.extra/jem_metadata.json). The server's REST port is 8501 by default.
"""

import argparse
import json
import sys
import urllib.request

import numpy as np


def images_body(signature: str, images: np.ndarray) -> dict:
    """Row-format ("instances") request body for ``classify``/``energy`` (or ``serving_default``)."""
    images = np.asarray(images, dtype=np.float32)
    if images.ndim != 4:
        raise ValueError(f"images must be [N, H, W, C]; received shape {images.shape}")
    return {"signature_name": signature, "instances": images.tolist()}


def sample_body(num_samples: int, n_steps: int, seed: int, class_label: int = -1, step_size: float = 0.0,
                noise_std: float = -1.0) -> dict:
    """Columnar ("inputs") request body for ``sample``: scalar inputs need the columnar format.
    ``class_label=-1`` samples unconditionally; ``step_size <= 0`` / ``noise_std < 0`` use the trained
    sampler's settings."""
    return {"signature_name": "sample", "inputs": {
        "num_samples": int(num_samples), "n_steps": int(n_steps), "seed": int(seed),
        "class_label": int(class_label), "step_size": float(step_size), "noise_std": float(noise_std)}}


def predict(body: dict, *, host: str = "localhost", port: int = 8501, model: str = "jem",
            timeout: float = 60.0) -> dict:
    """POSTs ``body`` to ``/v1/models/<model>:predict`` and returns the decoded JSON response."""
    request = urllib.request.Request(
        f"http://{host}:{port}/v1/models/{model}:predict", data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"}, method="POST")
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="localhost")
    parser.add_argument("--port", type=int, default=8501)
    parser.add_argument("--model", default="jem")
    parser.add_argument("--signature", choices=("classify", "energy", "sample"), default="classify")
    parser.add_argument("--images", help=".npy file of float32 [N, H, W, C] images (classify, energy)")
    parser.add_argument("--num-samples", type=int, default=16)
    parser.add_argument("--n-steps", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--class-label", type=int, default=-1)
    parser.add_argument("--out", help="sample: write the samples to this .npy file")
    args = parser.parse_args(argv)
    if args.signature == "sample":
        body = sample_body(args.num_samples, args.n_steps, args.seed, args.class_label)
    else:
        if not args.images:
            parser.error("--images is required for classify and energy")
        body = images_body(args.signature, np.load(args.images))
    result = predict(body, host=args.host, port=args.port, model=args.model)
    if args.out and args.signature == "sample":
        np.save(args.out, np.asarray(result["outputs"]["samples"], dtype=np.float32))
        result["outputs"]["samples"] = f"saved to {args.out}"
    json.dump(result, sys.stdout, indent=1)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
