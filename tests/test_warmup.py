"""jem_tf.serving.warmup: the requests TF Serving replays when it loads an export."""

import os

import pytest
import tensorflow as tf
from conftest import check_against_signature as _check_against_signature
from conftest import run_session as _run_session
from conftest import signature_defs as _signature_defs

from jem_tf.serving import WARMUP_FILE


@pytest.fixture(scope="module")
def trained(tiny_export):
    """The tiny trained model these tests share: conftest's ``tiny_export``, trained once per test run."""
    return tiny_export


def test_the_warmup_file_holds_one_valid_request_per_signature(trained):
    from tensorflow_serving.apis import prediction_log_pb2

    path = trained[3]
    signature_defs = _signature_defs(path)
    logs = []
    for record in tf.data.TFRecordDataset(os.path.join(path, WARMUP_FILE)):
        log = prediction_log_pb2.PredictionLog()
        log.ParseFromString(record.numpy())
        logs.append(log)
    assert [log.WhichOneof("log_type") for log in logs] == ["predict_log"] * 3
    requests = [log.predict_log.request for log in logs]
    assert [request.model_spec.signature_name for request in requests] == ["classify", "energy", "sample"]
    for request in requests:  # TF Serving replays each when it loads the version: each must run
        arrays = {k: tf.make_ndarray(v) for k, v in request.inputs.items()}
        signature = request.model_spec.signature_name
        _check_against_signature(signature_defs[signature], arrays)
        assert set(_run_session(path, signature, arrays)) == set(signature_defs[signature].outputs)
