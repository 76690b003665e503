"""gRPC client for a jem-tf model served by TensorFlow Serving.

    pip install tensorflow-serving-api      # brings grpcio and tensorflow
    python export/grpc_client.py --signature energy --images images.npy

The server's gRPC port is 8500 by default. Images: float32 [N, H, W, C] in the model's value range.
"""

import argparse
import sys

import numpy as np

SAMPLE_DTYPES = {"num_samples": np.int32, "n_steps": np.int32, "seed": np.int64, "class_label": np.int32,
                 "step_size": np.float32, "noise_std": np.float32}


def make_request(signature: str, inputs: dict, *, model: str = "jem"):
    """A ``PredictRequest`` for ``signature`` with numpy ``inputs`` (name -> array or scalar)."""
    import tensorflow as tf
    from tensorflow_serving.apis import predict_pb2

    request = predict_pb2.PredictRequest()
    request.model_spec.name = model
    request.model_spec.signature_name = signature
    for name, value in inputs.items():
        dtype = SAMPLE_DTYPES.get(name, np.float32)
        request.inputs[name].CopyFrom(tf.make_tensor_proto(np.asarray(value, dtype=dtype)))
    return request


def images_request(signature: str, images: np.ndarray, *, model: str = "jem"):
    return make_request(signature, {"images": np.asarray(images, np.float32)}, model=model)


def sample_request(num_samples: int, n_steps: int, seed: int, class_label: int = -1, step_size: float = 0.0,
                   noise_std: float = -1.0, *, model: str = "jem"):
    return make_request("sample", {"num_samples": num_samples, "n_steps": n_steps, "seed": seed,
                                   "class_label": class_label, "step_size": step_size, "noise_std": noise_std},
                        model=model)


def predict(request, *, host: str = "localhost", port: int = 8500, timeout: float = 60.0) -> dict:
    """Sends ``request`` and returns its outputs as numpy arrays."""
    import grpc
    import tensorflow as tf
    from tensorflow_serving.apis import prediction_service_pb2_grpc

    with grpc.insecure_channel(f"{host}:{port}") as channel:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        response = stub.Predict(request, timeout)
    return {name: tf.make_ndarray(proto) for name, proto in response.outputs.items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="localhost")
    parser.add_argument("--port", type=int, default=8500)
    parser.add_argument("--model", default="jem")
    parser.add_argument("--signature", choices=("classify", "energy", "sample"), default="classify")
    parser.add_argument("--images", help=".npy file of float32 [N, H, W, C] images (classify, energy)")
    parser.add_argument("--num-samples", type=int, default=16)
    parser.add_argument("--n-steps", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--class-label", type=int, default=-1)
    args = parser.parse_args(argv)
    if args.signature == "sample":
        request = sample_request(args.num_samples, args.n_steps, args.seed, args.class_label, model=args.model)
    else:
        if not args.images:
            parser.error("--images is required for classify and energy")
        request = images_request(args.signature, np.load(args.images), model=args.model)
    for name, value in predict(request, host=args.host, port=args.port).items():
        print(name, value.shape, value.dtype)
        print(value if value.size <= 64 else value.reshape(-1)[:64])
    return 0


if __name__ == "__main__":
    sys.exit(main())
