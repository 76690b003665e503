"""TF Serving's warm-up file of an export: one small request per signature, which the server replays when it loads a
version, before it serves, so that the first client request is as fast as the next ones
(https://www.tensorflow.org/tfx/serving/saved_model_warmup)."""

from __future__ import annotations

import os

import numpy as np
import tensorflow as tf

WARMUP_FILE = os.path.join("assets.extra", "tf_serving_warmup_requests")


def warmup_requests(model, *, uint8_inputs: bool = False) -> dict:
    """``{signature: {input: array}}``: one small request per signature (one mid-range image for ``classify`` and
    ``energy``, and with ``uint8_inputs`` for ``classify_uint8``; one sample of one SGLD step for ``sample``), the
    export's TF Serving warm-up."""
    low, high = model.value_range
    image = np.full((1, *model.image_shape), (low + high) / 2, np.float32)
    requests = {"classify": {"images": image}, "energy": {"images": image},
                "sample": {"num_samples": np.int32(1), "n_steps": np.int32(1), "seed": np.int64(0),
                           "class_label": np.int32(-1), "step_size": np.float32(0.0), "noise_std": np.float32(-1.0)}}
    if uint8_inputs:
        requests["classify_uint8"] = {"images": np.full((1, *model.image_shape), 128, np.uint8)}
    return requests


def _length_delimited(field: int, payload: bytes) -> bytes:
    """One protobuf field of wire type 2 (a message, string or bytes)."""
    def varint(value):
        out = bytearray()
        while True:
            out.append((value & 0x7F) | (0x80 if value > 0x7F else 0))
            value >>= 7
            if not value:
                return bytes(out)
    return varint(field << 3 | 2) + varint(len(payload)) + payload


def write_warmup_requests(path: str, requests: dict) -> None:
    """Writes TF Serving's warm-up file: a TFRecord of ``PredictionLog`` messages (``predict_log.request``: a
    ``PredictRequest`` with ``model_spec.signature_name`` and its ``inputs``), one per ``{signature: {input:
    array}}`` item. The messages are encoded here (five length-delimited fields of tensorflow_serving/apis'
    ``prediction_log.proto``, ``predict.proto`` and ``model.proto``) so that exporting does not need the
    tensorflow-serving-api package; the tests parse them with it."""
    with tf.io.TFRecordWriter(path) as writer:
        for signature, inputs in requests.items():
            model_spec = _length_delimited(3, signature.encode())  # ModelSpec.signature_name = 3
            request = _length_delimited(1, model_spec)  # PredictRequest.model_spec = 1
            for name, array in inputs.items():  # PredictRequest.inputs = 2: map entries {key = 1, value = 2}
                entry = _length_delimited(1, name.encode()) + _length_delimited(
                    2, tf.make_tensor_proto(array).SerializeToString())
                request += _length_delimited(2, entry)
            writer.write(_length_delimited(6, _length_delimited(1, request)))  # PredictionLog.predict_log = 6
