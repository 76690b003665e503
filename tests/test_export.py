"""SavedModel export: loaded the way TensorFlow Serving loads it, in a process without Keras or jem_tf."""

import contextlib
import importlib.util
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest
import tensorflow as tf
from conftest import tiny_jem

from jem_tf.export import main as export_main
from jem_tf.model import energy as energy_lib
from jem_tf.serving import (
    METADATA_FILE,
    WARMUP_FILE,
    export_saved_model,
    max_num_samples_limit,
    next_version,
    sample_limits,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HELPER = os.path.join(ROOT, "tests", "helpers", "serving_check.py")
SAMPLE_REQUEST = {"num_samples": np.int32(6), "n_steps": np.int32(30), "seed": np.int64(11),
                  "class_label": np.int32(-1), "step_size": np.float32(0.0), "noise_std": np.float32(-1.0)}
# Images the 8x8x1 test export must reject with an error naming its shape [N, 8, 8, 1].
BAD_IMAGE_SHAPES = [[2, 28, 28, 1], [2, 8, 8, 3], [2, 8, 8], [1, 8, 8, 1, 1], [8, 8, 1], []]
EXPECTED_SHAPE = r"images must have shape \[N, 8, 8, 1\]"


def _load_client(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "export", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _ood_scores(model, metadata, images, scorer=None):
    """The exported detector's score recomputed in this process from the metadata (jem_tf.ood)."""
    from jem_tf.ood import OODDetector, OODScorer

    detector = OODDetector.from_dict(metadata["ood"]["detector"])
    scorer = scorer or OODScorer(model.backbone, value_range=model.value_range,
                                 temperature=metadata["ood"]["parameters"]["temperature"])
    return detector.combine(scorer.arrays(images, detector.components))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny JEM trained a few steps, its calibration images, and its export (version 1)."""
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, (96, 8, 8, 1)).astype("float32")
    y = rng.integers(0, 3, 96).astype("int32")
    model = tiny_jem()
    model.fit(x, y, batch_size=32, epochs=2, verbose=0)
    base = str(tmp_path_factory.mktemp("export") / "jem")
    path = export_saved_model(model, base, calibration_images=x, preprocessing="test", dataset="random",
                              max_num_samples=32, max_n_steps=250)
    return model, x, base, path


@pytest.fixture(scope="module")
def served(trained, tmp_path_factory):
    """Outputs of every signature from a separate process that cannot import Keras or jem_tf."""
    model, x, base, path = trained
    tmp = tmp_path_factory.mktemp("serving")
    np.savez(tmp / "inputs.npz", images=x[:5], **SAMPLE_REQUEST)
    result = subprocess.run([sys.executable, HELPER, path, str(tmp / "inputs.npz"), str(tmp / "outputs.npz")],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "IMPORTED: none" in result.stdout
    return dict(np.load(tmp / "outputs.npz"))


@pytest.fixture(scope="module")
def loaded(trained):
    """The test export loaded with ``tf.saved_model.load`` (the object API)."""
    return tf.saved_model.load(trained[3])


def test_layout_metadata_and_small_size(trained):
    model, x, base, path = trained
    assert path == os.path.join(base, "1") and sorted(os.listdir(base)) == ["1"]
    assert os.path.isfile(os.path.join(path, "saved_model.pb"))
    metadata = json.load(open(os.path.join(path, METADATA_FILE)))
    assert metadata["input"] == {"name": "images", "dtype": "float32", "shape": [None, 8, 8, 1],
                                 "value_range": [-1.0, 1.0], "preprocessing": "test"}
    assert metadata["sample"]["max_num_samples"] == 32 and metadata["sample"]["max_n_steps"] == 250
    # Default step/noise bounds of the trained sampler (step 1.0, noise 0.01): 10x the step, the range's width 2.
    assert metadata["sample"]["max_step_size"] == 10.0 and metadata["sample"]["max_noise_std"] == 2.0
    assert metadata["sample"]["clipped_to_value_range"] is True
    # The OOD detector: chosen on the calibration images and outliers made from them, calibrated at 95 % TPR.
    ood = metadata["ood"]
    assert ood["calibration_split"] == "given" and ood["num_calibration_images"] == len(x)
    assert ood["score"] == ood["selection"]["chosen"] and ood["threshold"] == ood["detector"]["threshold"]
    scores = _ood_scores(model, metadata, x)
    assert np.mean(scores >= ood["threshold"]) == pytest.approx(ood["achieved_tpr"])
    assert 0.95 <= ood["achieved_tpr"] < 0.95 + 1 / len(x)  # at least 95 % pass, not one image more than needed
    # No replay buffer or optimizer state, and each backbone variable stored once.
    data = [f for f in os.listdir(os.path.join(path, "variables")) if f.startswith("variables.data")]
    stored = sum(os.path.getsize(os.path.join(path, "variables", f)) for f in data)
    weight_bytes = 4 * model.backbone.count_params()
    assert weight_bytes <= stored < 1.2 * weight_bytes + 4096
    assert model.replay_buffer.samples.numpy().nbytes > 3 * stored  # the buffer alone would dwarf it


@pytest.mark.integration
@pytest.mark.parametrize("loader", ["object", "session"])
def test_classify_and_energy_match_keras(trained, served, loader):
    model, x, _, path = trained
    logits = model.predict(x[:5], verbose=0)
    np.testing.assert_allclose(served[f"{loader}/classify/logits"], logits, atol=1e-5)
    np.testing.assert_allclose(served[f"{loader}/classify/probabilities"], tf.nn.softmax(logits), atol=1e-5)
    np.testing.assert_array_equal(served[f"{loader}/classify/predicted_class"], logits.argmax(-1))
    np.testing.assert_allclose(served[f"{loader}/serving_default/logits"], logits, atol=1e-5)
    np.testing.assert_allclose(served[f"{loader}/energy/energy"], energy_lib.energy(logits), atol=1e-5)
    np.testing.assert_allclose(served[f"{loader}/energy/log_px"], energy_lib.log_px(logits), atol=1e-5)
    metadata = json.load(open(os.path.join(path, METADATA_FILE)))
    np.testing.assert_allclose(served[f"{loader}/energy/ood_score"], _ood_scores(model, metadata, x[:5]),
                               rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(served[f"{loader}/energy/is_in_distribution"],
                                  served[f"{loader}/energy/ood_score"] >= metadata["ood"]["threshold"])


@pytest.mark.parametrize("loader", ["object", "session"])
def test_sample_is_deterministic_and_lowers_energy(served, loader):
    samples = served[f"{loader}/sample/samples"]
    assert samples.shape == (6, 8, 8, 1)
    np.testing.assert_array_equal(samples, served[f"{loader}/sample_again/samples"])
    start = served[f"{loader}/sample_start/samples"]
    assert start.min() >= -1 and start.max() <= 1 and not np.array_equal(start, samples)
    assert served[f"{loader}/sample/energy"].mean() < served[f"{loader}/sample_start/energy"].mean()
    assert not np.array_equal(served[f"{loader}/sample_conditional/samples"], samples)


def test_both_loaders_agree(served):
    for key in [k for k in served if k.startswith("object/")]:
        np.testing.assert_allclose(served[key], served["session/" + key[len("object/"):]], atol=1e-5, err_msg=key)


def test_signature_rejects_bad_inputs_and_enforces_bounds(trained):
    loaded = tf.saved_model.load(trained[3])
    classify, sample = loaded.signatures["classify"], loaded.signatures["sample"]
    rejected = (ValueError, TypeError, tf.errors.InvalidArgumentError)
    with pytest.raises(rejected):
        classify(images=tf.zeros([2, 8, 8, 3]))  # wrong shape
    with pytest.raises(rejected):
        classify(images=tf.zeros([2, 8, 8, 1], tf.int32))  # wrong dtype
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"images must lie in \[-1.0, 1.0\]"):
        classify(images=tf.fill([2, 8, 8, 1], 255.0))
    with pytest.raises(tf.errors.InvalidArgumentError, match="NaN"):
        loaded.signatures["energy"](images=tf.fill([1, 8, 8, 1], np.nan))
    ok = {k: tf.constant(v) for k, v in SAMPLE_REQUEST.items()}
    for name, value, message in [("num_samples", 33, "num_samples must be <= 32"),
                                 ("num_samples", 0, "num_samples must be >= 1"),
                                 ("n_steps", 251, "n_steps must be <= 250"),
                                 ("n_steps", -1, "n_steps must be >= 0"),
                                 ("class_label", 3, "class_label must be < 3")]:
        start = time.time()
        with pytest.raises(tf.errors.InvalidArgumentError, match=message):
            sample(**{**ok, name: tf.constant(value, ok[name].dtype)})
        assert time.time() - start < 5  # rejected before any sampling


@pytest.mark.parametrize("signature", ["classify", "energy"])
def test_image_signatures_check_the_full_shape_in_graph(loaded, signature):
    """tf.saved_model.load does not enforce the input spec's shape: the signature's own check names the shape."""
    function = loaded.signatures[signature]
    for shape in BAD_IMAGE_SHAPES:
        with pytest.raises(tf.errors.InvalidArgumentError, match=EXPECTED_SHAPE):
            function(images=tf.zeros(shape))
    with pytest.raises(tf.errors.InvalidArgumentError, match=EXPECTED_SHAPE + " with N >= 1; the batch is empty"):
        function(images=tf.zeros([0, 8, 8, 1]))
    assert set(function(images=tf.zeros([1, 8, 8, 1]))) >= {"logits" if signature == "classify" else "energy"}


@contextlib.contextmanager
def _session_loader(path):
    """The TF1 session loader (TF Serving's C++ path); yields ``run(signature, feeds, check_feed_shapes=True)``.

    Python's ``sess.run`` itself refuses a feed whose shape differs from the placeholder's declared one; TF
    Serving's C++ server does not, so ``check_feed_shapes=False`` feeds through the C API like it does.
    """
    with tf.Graph().as_default() as graph, tf.compat.v1.Session() as sess:
        meta_graph = tf.compat.v1.saved_model.loader.load(sess, ["serve"], path)

        def run(signature, feeds, check_feed_shapes=True):
            signature_def = meta_graph.signature_def[signature]
            fetches = {k: t.name for k, t in signature_def.outputs.items()}
            feed_dict = {signature_def.inputs[k].name: v for k, v in feeds.items()}
            if check_feed_shapes:
                return sess.run(fetches, feed_dict)
            names = sorted(fetches)
            values = sess._call_tf_sessionrun(
                None, {graph.get_tensor_by_name(k)._as_tf_output(): np.asarray(v) for k, v in feed_dict.items()},
                [graph.get_tensor_by_name(fetches[name])._as_tf_output() for name in names], [], None)
            return dict(zip(names, values))

        yield run


def test_session_loader_runs_the_shape_and_sampling_checks(trained):
    """The checks are ops of the graph TF Serving's C++ loader runs, not Python-side checks of the object API."""
    with _session_loader(trained[3]) as run:
        for signature in ("classify", "energy"):
            with pytest.raises(tf.errors.InvalidArgumentError, match=EXPECTED_SHAPE + ".*the batch is empty"):
                run(signature, {"images": np.zeros([0, 8, 8, 1], np.float32)})
            for shape in BAD_IMAGE_SHAPES:
                with pytest.raises(tf.errors.InvalidArgumentError, match=EXPECTED_SHAPE):
                    run(signature, {"images": np.zeros(shape, np.float32)}, check_feed_shapes=False)
        assert run("classify", {"images": np.zeros([2, 8, 8, 1], np.float32)},
                   check_feed_shapes=False)["logits"].shape == (2, 3)
        with pytest.raises(tf.errors.InvalidArgumentError, match="step_size must be <= max_step_size = 10.0"):
            run("sample", {**SAMPLE_REQUEST, "step_size": np.float32(1e30)})


def test_sample_rejects_step_size_and_noise_std_above_the_export_limits(loaded):
    sample = loaded.signatures["sample"]
    ok = {k: tf.constant(v) for k, v in SAMPLE_REQUEST.items()}
    for name, value, message in [("step_size", 1e30, "step_size must be <= max_step_size = 10.0"),
                                 ("step_size", 10.5, "step_size must be <= max_step_size = 10.0"),
                                 ("step_size", np.inf, "step_size must be"),
                                 ("noise_std", 1e30, "noise_std must be <= max_noise_std = 2.0"),
                                 ("noise_std", 2.5, "noise_std must be <= max_noise_std = 2.0"),
                                 ("noise_std", np.nan, "noise_std must be")]:
        start = time.time()
        with pytest.raises(tf.errors.InvalidArgumentError, match=message):
            sample(**{**ok, name: tf.constant(value, tf.float32), "n_steps": tf.constant(250)})
        assert time.time() - start < 5  # rejected before any sampling
    at_limits = sample(**{**ok, "step_size": tf.constant(10.0), "noise_std": tf.constant(2.0)})
    assert np.all(np.isfinite(at_limits["samples"].numpy()))


@pytest.mark.parametrize("kwargs, message", [
    ({"max_step_size": 0.0}, "`max_step_size` must be finite (as float32) and > 0; received 0.0"),
    ({"max_step_size": -1.0}, "`max_step_size` must be finite (as float32) and > 0; received -1.0"),
    ({"max_step_size": float("inf")}, "`max_step_size` must be finite (as float32) and > 0; received inf"),
    ({"max_step_size": float("nan")}, "`max_step_size` must be finite (as float32) and > 0; received nan"),
    ({"max_step_size": 1e39}, "`max_step_size` must be finite (as float32) and > 0; received 1e+39"),
    ({"max_step_size": "10"}, "`max_step_size` must be a number; received '10'"),
    ({"max_step_size": 0.5}, "`max_step_size` must be >= the trained sampler's step_size 1.0"),
    ({"max_noise_std": float("nan")}, "`max_noise_std` must be finite (as float32) and > 0; received nan"),
    ({"max_noise_std": 0.001}, "`max_noise_std` must be >= the trained sampler's noise_std 0.01"),
    ({"max_num_samples": 0}, "`max_num_samples` must be an int >= 1; received 0"),
    ({"max_num_samples": 4194305}, "`max_num_samples` must be <= 4194304 for images of shape [8, 8, 1] (1 GiB"),
    ({"max_num_samples": 1_000_000_000}, "`max_num_samples` must be <= 4194304"),
    ({"max_n_steps": 100_001}, "`max_n_steps` must be an int in [1, 100000]; received 100001"),
    ({"max_n_steps": 0}, "`max_n_steps` must be an int in [1, 100000]; received 0"),
])
def test_export_rejects_bad_sample_limits_before_any_work(trained, tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        export_saved_model(trained[0], str(tmp_path / "served"), ood_threshold=0.0, **kwargs)
    assert not (tmp_path / "served").exists()


def test_sample_limits_memory_cap_and_defaults(trained):
    model = trained[0]
    assert max_num_samples_limit((8, 8, 1)) == 2 ** 30 // 256 and max_num_samples_limit((32, 32, 3)) == 87381
    limits = sample_limits(model, max_num_samples=2 ** 30 // 256, max_n_steps=100_000)  # the ceilings themselves
    assert limits == {"max_num_samples": 4194304, "max_n_steps": 100_000, "max_step_size": 10.0, "max_noise_std": 2.0}
    assert sample_limits(model, max_step_size=1, max_noise_std=0.01)["max_step_size"] == 1.0


def test_samples_of_an_unclamped_sampler_are_clipped_to_the_value_range(trained, loaded):
    model = trained[0]
    assert model.sampler.clamp_range is None and model.value_range == (-1.0, 1.0)
    request = {**{k: tf.constant(v) for k, v in SAMPLE_REQUEST.items()}, "num_samples": tf.constant(16),
               "step_size": tf.constant(10.0), "noise_std": tf.constant(2.0)}
    result = loaded.signatures["sample"](**request)
    samples = result["samples"].numpy()
    assert samples.min() >= -1.0 and samples.max() <= 1.0
    assert np.mean(np.abs(samples) == 1.0) > 0.2  # without the clip, these would lie outside [-1, 1]
    classified = loaded.signatures["classify"](images=result["samples"])  # a valid input of classify...
    np.testing.assert_allclose(classified["logits"].numpy(), model.predict(samples, verbose=0), atol=1e-5)
    energies = loaded.signatures["energy"](images=result["samples"])  # ...and of energy, which matches
    np.testing.assert_allclose(result["energy"].numpy(), energies["energy"].numpy(), atol=1e-5)


def test_versions_are_never_overwritten_and_increment(trained):
    model, x, base, _ = trained
    with pytest.raises(ValueError, match="already exists"):
        export_saved_model(model, base, version=1, ood_threshold=0.0)
    assert next_version(base) == 2
    with pytest.raises(ValueError, match="exactly one"):
        export_saved_model(model, base)


def test_two_exports_at_once_never_collide(trained, tmp_path, monkeypatch):
    """Another export writes the chosen version between the check and the rename: the next free version is taken
    (its metadata says which), or, for a version asked for, one error; nothing is overwritten or left behind."""
    from jem_tf.serving import saved_model

    model, _, _, _ = trained
    base = str(tmp_path / "served")
    real_write = saved_model.write_atomically
    raced = []

    def racing_write(path, write, **kwargs):
        if not raced:  # the other export finishes first, once
            raced.append(path)
            os.makedirs(path)
            open(os.path.join(path, "saved_model.pb"), "wb").write(b"the other export's")
        return real_write(path, write, **kwargs)

    monkeypatch.setattr(saved_model, "write_atomically", racing_write)
    path = export_saved_model(model, base, ood_threshold=0.0)
    assert path == os.path.join(base, "2")
    assert json.load(open(os.path.join(path, "assets.extra", "jem_metadata.json")))["version"] == 2
    assert open(os.path.join(base, "1", "saved_model.pb"), "rb").read() == b"the other export's"
    raced.clear()
    with pytest.raises(ValueError, match="Version 7 .* was written by another export at the same time"):
        export_saved_model(model, base, version=7, ood_threshold=0.0)
    assert sorted(os.listdir(base)) == ["1", "2", "7"]  # only the other export's 7: no temporary left


@pytest.mark.integration
def test_saved_model_cli_lists_the_signatures(trained):
    result = subprocess.run([sys.executable, "-m", "tensorflow.python.tools.saved_model_cli", "show", "--dir",
                             trained[3], "--all"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    for name in ("classify", "energy", "sample", "serving_default"):
        assert f"signature_def['{name}']" in result.stdout
    assert "is_in_distribution" in result.stdout and "num_samples" in result.stdout


def _signature_defs(path):
    from tensorflow.core.protobuf import saved_model_pb2

    proto = saved_model_pb2.SavedModel()
    proto.ParseFromString(open(os.path.join(path, "saved_model.pb"), "rb").read())
    return proto.meta_graphs[0].signature_def


def _run_session(path, signature, feeds):
    """Runs `signature` on numpy `feeds` through the TF1 session loader (TF Serving's C++ path)."""
    with tf.Graph().as_default(), tf.compat.v1.Session() as sess:
        meta_graph = tf.compat.v1.saved_model.loader.load(sess, ["serve"], path)
        signature_def = meta_graph.signature_def[signature]
        fetches = {k: t.name for k, t in signature_def.outputs.items()}
        return sess.run(fetches, {signature_def.inputs[k].name: v for k, v in feeds.items()})


def _check_against_signature(signature_def, arrays):
    assert set(arrays) == set(signature_def.inputs), (set(arrays), set(signature_def.inputs))
    for name, array in arrays.items():
        spec = signature_def.inputs[name]
        assert tf.as_dtype(spec.dtype) == tf.as_dtype(array.dtype), name
        dims = [d.size for d in spec.tensor_shape.dim]
        assert len(dims) == array.ndim and all(d in (-1, a) for d, a in zip(dims, array.shape)), name


def test_grpc_predict_requests_match_signature_defs(trained):
    grpc_client = _load_client("grpc_client")
    model, x, _, path = trained
    signature_defs = _signature_defs(path)
    requests = [grpc_client.images_request("classify", x[:3]), grpc_client.images_request("energy", x[:3]),
                grpc_client.sample_request(4, 10, 5)]
    for request in requests:
        assert type(request).__name__ == "PredictRequest" and request.model_spec.name == "jem"
        signature = request.model_spec.signature_name
        arrays = {k: tf.make_ndarray(v) for k, v in request.inputs.items()}
        _check_against_signature(signature_defs[signature], arrays)
        outputs = _run_session(path, signature, arrays)
        assert set(outputs) == set(signature_defs[signature].outputs)


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


def _rest_to_arrays(body, signature_def):
    """TF Serving's REST decoding: row ("instances") or columnar ("inputs") JSON -> typed arrays."""
    if "instances" in body:
        assert len(signature_def.inputs) == 1
        (name,) = signature_def.inputs
        values = {name: body["instances"]}
    else:
        values = body["inputs"]
    return {k: np.asarray(v, dtype=tf.as_dtype(signature_def.inputs[k].dtype).as_numpy_dtype)
            for k, v in values.items()}


def test_documented_rest_examples_are_valid_for_their_signatures(trained):
    page = open(os.path.join(ROOT, "docs", "serving.md")).read()
    section = page.split("# Export and serve", 1)[1]
    bodies = [json.loads(block) for block in re.findall(r"```json\n(.*?)```", section, re.S)]
    assert {b["signature_name"] for b in bodies} >= {"classify", "sample"}
    path = trained[3]
    signature_defs = _signature_defs(path)
    rest_client = _load_client("rest_client")
    bodies += [rest_client.images_body("energy", trained[1][:2]), rest_client.sample_body(3, 5, 1, class_label=2)]
    for body in bodies:
        signature_def = signature_defs[body["signature_name"]]
        arrays = _rest_to_arrays(body, signature_def)
        _check_against_signature(signature_def, arrays)
        outputs = _run_session(path, body["signature_name"], arrays)
        assert all(np.all(np.isfinite(v)) for v in outputs.values() if v.dtype.kind == "f")


@pytest.mark.integration
def test_export_cli_from_a_training_workdir(tmp_path, capsys):
    from jem_tf import train

    workdir = str(tmp_path / "run")
    assert train.main(["--epochs", "1", "--buffer-size", "100", "--sgld-steps", "1", "--width", "4",
                       "--batch-size", "256", "--verbose", "0", "--workdir", workdir,
                       "--export-dir", str(tmp_path / "served")]) == 0
    metrics = json.load(open(os.path.join(workdir, "metrics.json")))
    assert metrics["export_path"] == str(tmp_path / "served" / "1")
    capsys.readouterr()
    # The memory guard: 1e9 digits samples would be 256 GB; rejected once the model's image shape is known.
    with pytest.raises(SystemExit) as exit_info:
        export_main(["--model", workdir, "--export-dir", str(tmp_path / "served"), "--max-num-samples", "1000000000"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1
    assert "--max-num-samples must be <= 4194304 for images of shape [8, 8, 1] (1 GiB" in err
    assert sorted(os.listdir(tmp_path / "served")) == ["1"]
    with pytest.raises(SystemExit) as exit_info:
        export_main(["--model", workdir, "--export-dir", str(tmp_path / "served"), "--max-batch-size", "0"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1 and "--max-batch-size must be an int in [1, " in err
    assert sorted(os.listdir(tmp_path / "served")) == ["1"]
    assert export_main(["--model", workdir, "--export-dir", str(tmp_path / "served"), "--max-n-steps", "100000",
                        "--max-step-size", "25", "--max-noise-std", "0.5", "--ood-outlier-kinds", "noised", "mosaic",
                        "--ood-accepted-shifts", "blurred", "--max-batch-size", "64"]) == 0
    assert "exported " + str(tmp_path / "served" / "2") in capsys.readouterr().out
    metadata = json.load(open(tmp_path / "served" / "2" / METADATA_FILE))
    assert metadata["sample"]["max_n_steps"] == 100_000 and metadata["sample"]["max_step_size"] == 25.0
    assert metadata["max_batch_size"] == 64
    assert metadata["sample"]["max_noise_std"] == 0.5 and metadata["sample"]["clipped_to_value_range"] is True
    # Chosen and calibrated on the run's validation split (10 % of the 1,437 digits training images), with the
    # training split's feature statistics (so the Mahalanobis candidates were in the running).
    assert metadata["dataset"] == "digits" and metadata["ood"]["num_calibration_images"] == 144
    assert metadata["ood"]["calibration_split"] == "validation"
    selection = metadata["ood"]["selection"]
    assert "mahalanobis" in selection["candidates"] and selection["chosen"] == metadata["ood"]["score"]
    assert selection["outlier_kinds"] == ["noised", "mosaic"] and selection["accepted_shifts"] == ["blurred"]
    assert set(selection["candidates"]["log_px"]["accepted_shifts"]) == {"blurred"}
    first = json.load(open(tmp_path / "served" / "1" / METADATA_FILE))["ood"]["selection"]
    assert first["accepted_shifts"] == ["blurred", "low_contrast", "translated"]
    assert metadata["ood"]["parameters"]["mahalanobis"]["class_means_shape"][0] == 10
    served = json.load(open(tmp_path / "served" / "1" / METADATA_FILE))
    assert metrics["ood_detector"]["score"] == served["ood"]["score"]
    assert "x / 8 - 1" in metadata["input"]["preprocessing"]


@pytest.mark.integration
def test_no_validation_split_means_no_silent_test_calibration(tmp_path, capsys):
    from jem_tf import train

    workdir = str(tmp_path / "run")
    # Training with an export and no validation split is refused before anything runs...
    with pytest.raises(SystemExit):
        train.main(["--validation-fraction", "0", "--export-dir", str(tmp_path / "served"), "--workdir", workdir])
    assert "validation_fraction" in capsys.readouterr().err and not os.path.exists(workdir)
    assert train.main(["--epochs", "1", "--buffer-size", "100", "--sgld-steps", "1", "--width", "4",
                       "--batch-size", "256", "--verbose", "0", "--workdir", workdir,
                       "--validation-fraction", "0"]) == 0
    # ...and exporting it asks for the test split explicitly.
    with pytest.raises(SystemExit):
        export_main(["--model", workdir, "--export-dir", str(tmp_path / "served")])
    assert "--calibration-split test" in capsys.readouterr().err
    assert export_main(["--model", workdir, "--export-dir", str(tmp_path / "served"), "--calibration-split", "test",
                        "--ood-detector", "log_px"]) == 0
    metadata = json.load(open(tmp_path / "served" / "1" / METADATA_FILE))
    assert metadata["ood"]["calibration_split"] == "test" and metadata["ood"]["score"] == "log_px"
    assert metadata["ood"]["num_calibration_images"] == 360


@pytest.mark.integration
@pytest.mark.parametrize("reduce", ["sum", "min"])
def test_every_ood_component_is_served_without_keras(trained, tmp_path, reduce):
    """A detector that uses every component (features, gradients, PNG sizes, a temperature), added or
    "atypical in any" (their minimum), round-trips through the export (formula, threshold, metadata) and
    gives the same scores and flags in a process without Keras or jem_tf."""
    from jem_tf.ood import COMPONENTS, FittedDetector, OODDetector, OODScorer, Term

    model, x, _, _ = trained
    labels = np.arange(len(x)) % 3
    scorer = OODScorer.fit(model, train_images=x, train_labels=labels, val_images=x, val_labels=labels)
    # Centred on each component's median over the served images: every term is below its centre for some images
    # and above for others, so the minimum is reached by different terms (both branches of the min).
    values = scorer.arrays(x[:5], list(COMPONENTS))
    terms = tuple(Term(name, weight=0.1 * (i + 1), center=float(np.median(values[name])), scale=2.0,
                       two_sided=name == "png_bits") for i, name in enumerate(COMPONENTS))
    detector = OODDetector("everything", terms, threshold=0.0, reduce=reduce)
    ood = FittedDetector(scorer, detector, {"calibration_split": "given", "num_calibration_images": 0, "tpr": None})
    path = export_saved_model(model, str(tmp_path / "served"), ood=ood)
    np.savez(tmp_path / "inputs.npz", images=x[:5], **SAMPLE_REQUEST)
    result = subprocess.run([sys.executable, HELPER, path, str(tmp_path / "inputs.npz"), str(tmp_path / "out.npz")],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "IMPORTED: none" in result.stdout
    served = dict(np.load(tmp_path / "out.npz"))
    metadata = json.load(open(os.path.join(path, METADATA_FILE)))
    assert OODDetector.from_dict(metadata["ood"]["detector"]) == detector
    expected = _ood_scores(model, metadata, x[:5], scorer=scorer)
    per_term = np.stack([OODDetector(t.component, (t,)).combine(values) for t in terms])  # [terms, images]
    if reduce == "min":
        np.testing.assert_allclose(expected, per_term.min(axis=0), rtol=1e-5, atol=1e-6)
        assert len(set(per_term.argmin(axis=0).tolist())) >= 2  # the minimum switches between terms
    else:
        np.testing.assert_allclose(expected, per_term.sum(axis=0), rtol=1e-5, atol=1e-5)
    for loader in ("object", "session"):
        np.testing.assert_allclose(served[f"{loader}/energy/ood_score"], expected, rtol=1e-4, atol=1e-3)
        np.testing.assert_array_equal(served[f"{loader}/energy/is_in_distribution"], expected >= 0.0)


@pytest.mark.parametrize("argv, message", [
    (["--model", "/no/such/dir", "--export-dir", "x"], "No model at '/no/such/dir'"),
    (["--export-dir", "x"], "the following arguments are required: --model"),
    # Flag values are checked before anything is loaded (the model path does not exist).
    (["--model", "/no/such/dir", "--export-dir", "x", "--max-num-samples", "0"],
     "--max-num-samples must be >= 1; received 0"),
    (["--model", "/no/such/dir", "--export-dir", "x", "--max-n-steps", "0"],
     "--max-n-steps must be in [1, 100000]; received 0"),
    (["--model", "/no/such/dir", "--export-dir", "x", "--max-n-steps", "100001"],
     "--max-n-steps must be in [1, 100000]; received 100001"),
    (["--model", "/no/such/dir", "--export-dir", "x", "--max-step-size", "nan"],
     "--max-step-size must be finite and > 0; received nan"),
    (["--model", "/no/such/dir", "--export-dir", "x", "--max-noise-std", "-1"],
     "--max-noise-std must be finite and > 0; received -1.0"),
    (["--model", "/no/such/dir", "--export-dir", "x", "--max-step-size", "inf"],
     "--max-step-size must be finite and > 0; received inf"),
    (["--model", "/no/such/dir", "--export-dir", "x", "--tpr", "0"], "--tpr must be in (0, 1]; received 0.0"),
    (["--model", "/no/such/dir", "--export-dir", "x", "--ood-accepted-shifts", "blurred", "noised"],
     "--ood-outlier-kinds and --ood-accepted-shifts both name noised; give each kind one role"),
    (["--model", "/no/such/dir", "--export-dir", "x", "--ood-outlier-kinds", "blurred", "blurred"],
     "--ood-outlier-kinds names blurred more than once; give each kind once"),
    (["--model", "/no/such/dir", "--export-dir", "x", "--ood-accepted-shifts", "noised", "noised"],
     "--ood-accepted-shifts names noised more than once; give each kind once"),
    (["--model", "/no/such/dir", "--export-dir", "x", "--ood-outlier-kinds", "sideways"],
     "argument --ood-outlier-kinds: invalid choice: 'sideways'"),
    (["--model", "/no/such/dir", "--export-dir", "x", "--version", "-1"], "--version must be >= 0; received -1"),
    (["--model", "/no/such/dir", "--export-dir", "x", "--max-num-samples", "many"],
     "argument --max-num-samples: invalid int value: 'many'"),
])
def test_export_cli_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        export_main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_export_cli_rejects_corrupt_model_file(tmp_path, capsys):
    bad = tmp_path / "bad.keras"
    bad.write_bytes(b"PK\x03\x04 definitely not a keras archive")
    with pytest.raises(SystemExit):
        export_main(["--model", str(bad), "--export-dir", str(tmp_path / "out"), "--dataset", "digits"])
    # jem_tf.run.model_files' load_trained_model: "Cannot load ..." or, since it checks the archive first, "... is not a
    # .keras archive (truncated or corrupt: not a zip file)".
    assert re.search(r"Cannot load|is not a \.keras archive", capsys.readouterr().err)
    assert not (tmp_path / "out").exists()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(shutil.which("tensorflow_model_server") is None,
                    reason="tensorflow_model_server is not on PATH (no Debian/PyPI package; install it or use "
                           "the tensorflow/serving Docker image to run this test)")
def test_tensorflow_serving_rest(trained):
    model, x, base, _ = trained
    port = _free_port()
    server = subprocess.Popen(["tensorflow_model_server", f"--rest_api_port={port}", "--port=0",
                               "--model_name=jem", f"--model_base_path={base}"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        rest_client = _load_client("rest_client")
        deadline = time.time() + 60
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models/jem", timeout=2)
                break
            except OSError:
                assert time.time() < deadline, "server did not come up in 60 s"
                time.sleep(0.5)
        result = rest_client.predict(rest_client.images_body("classify", x[:2]), host="127.0.0.1", port=port)
        np.testing.assert_allclose(result["predictions"][0]["logits"], model.predict(x[:1], verbose=0)[0], atol=1e-5)
    finally:
        server.terminate()
        server.wait(timeout=30)


def _computes_in_bfloat16(loaded, signature):
    """Whether the loaded signature's graph (its called functions included) has any bfloat16 tensor."""
    return "DT_BFLOAT16" in str(loaded.signatures[signature].graph.as_graph_def())


@pytest.mark.integration
def test_a_mixed_bfloat16_model_is_served_in_float32_unless_asked(tmp_path):
    import keras

    from jem_tf import JEM, SGLDSampler, small_cnn
    from jem_tf.networks import compute_precision, with_precision
    from jem_tf.serving import serving_model

    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, (64, 8, 8, 1)).astype("float32")
    y = rng.integers(0, 3, 64).astype("int32")
    backbone = with_precision(small_cnn(num_classes=3, input_shape=(8, 8, 1), width=4, stages=1, seed=0),
                              "mixed_bfloat16")
    model = JEM(backbone, sampler=SGLDSampler(n_steps=2), buffer_size=32, seed=0)
    model.compile(optimizer=keras.optimizers.Adam(1e-3))
    model.fit(x, y, batch_size=32, epochs=1, verbose=0)
    assert compute_precision(model.backbone) == "mixed_bfloat16"
    twin = serving_model(model)
    assert compute_precision(twin.backbone) == "float32" and twin.backbone is not model.backbone
    assert serving_model(model, "trained") is model and serving_model(twin) is twin

    base = str(tmp_path / "jem")
    float32_path = export_saved_model(model, base, calibration_images=x, max_num_samples=8, max_n_steps=10)
    trained_path = export_saved_model(model, base, calibration_images=x, max_num_samples=8, max_n_steps=10,
                                      serving_precision="trained")
    float32_export, trained_export = tf.saved_model.load(float32_path), tf.saved_model.load(trained_path)
    for signature in ("classify", "energy", "sample"):
        assert not _computes_in_bfloat16(float32_export, signature)
        assert _computes_in_bfloat16(trained_export, signature)
    assert json.load(open(os.path.join(float32_path, METADATA_FILE)))["precision"] == {
        "serving": "float32", "training": "mixed_bfloat16"}
    assert json.load(open(os.path.join(trained_path, METADATA_FILE)))["precision"] == {
        "serving": "mixed_bfloat16", "training": "mixed_bfloat16"}
    # The float32 graph is the same weights computed in float32: equal to the float32 twin, and within bfloat16's
    # rounding of the model as trained.
    served = float32_export.signatures["classify"](images=tf.constant(x[:16]))["logits"].numpy()
    np.testing.assert_allclose(served, twin.predict(x[:16], verbose=0), atol=1e-5)
    np.testing.assert_allclose(served, model.predict(x[:16], verbose=0), atol=0.05)
    energies = float32_export.signatures["energy"](images=tf.constant(x[:16]))
    np.testing.assert_allclose(energies["energy"].numpy(), energy_lib.energy(served), atol=1e-5)
    # As training and python -m jem_tf.export call it: the OOD detector fitted on the served copy, the trained
    # model exported (the metadata records the precision it trained in).
    from jem_tf.ood import fit_ood_detector

    fitted = fit_ood_detector(twin, x, calibration_split="given")
    path = export_saved_model(model, base, ood=fitted, max_num_samples=8, max_n_steps=10)
    assert json.load(open(os.path.join(path, METADATA_FILE)))["precision"] == {
        "serving": "float32", "training": "mixed_bfloat16"}
    assert not _computes_in_bfloat16(tf.saved_model.load(path), "energy")
    with pytest.raises(ValueError, match="serving_precision"):
        export_saved_model(model, base, calibration_images=x, serving_precision="bfloat16")


def test_a_model_of_8_bit_images_also_serves_classify_uint8(trained, tmp_path, loaded):
    from jem_tf.data.base import UINT8_PREPROCESSING

    model, x, _, _ = trained
    assert "classify_uint8" not in loaded.signatures  # the test data's preprocessing is not 8-bit pixels
    path = export_saved_model(model, str(tmp_path / "jem"), ood_threshold=0.0, preprocessing=UINT8_PREPROCESSING)
    served = tf.saved_model.load(path)
    pixels = np.random.default_rng(0).integers(0, 256, (5, 8, 8, 1)).astype(np.uint8)
    raw = served.signatures["classify_uint8"](images=tf.constant(pixels))
    scaled = served.signatures["classify"](images=tf.constant(pixels.astype(np.float32) / 127.5 - 1.0))
    for name in ("logits", "probabilities", "predicted_class"):
        np.testing.assert_allclose(raw[name].numpy(), scaled[name].numpy(), rtol=1e-6, atol=1e-6)
    metadata = json.load(open(os.path.join(path, METADATA_FILE)))
    assert "classify_uint8" in metadata["signatures"]
    from tensorflow_serving.apis import prediction_log_pb2

    warmed = []
    for record in tf.data.TFRecordDataset(os.path.join(path, WARMUP_FILE)):
        log = prediction_log_pb2.PredictionLog()
        log.ParseFromString(record.numpy())
        warmed.append(log.predict_log.request.model_spec.signature_name)
    assert warmed == ["classify", "energy", "sample", "classify_uint8"]
