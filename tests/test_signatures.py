"""jem_tf.serving.signatures: the served classify, energy and sample graphs, as TF Serving loads them."""

import contextlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest
import tensorflow as tf
from conftest import SAMPLE_REQUEST
from conftest import check_against_signature as _check_against_signature
from conftest import free_port as _free_port
from conftest import ood_scores as _ood_scores
from conftest import run_session as _run_session
from conftest import signature_defs as _signature_defs

from jem_tf.model import energy as energy_lib
from jem_tf.serving import METADATA_FILE, WARMUP_FILE, export_saved_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

HELPER = os.path.join(ROOT, "tests", "helpers", "serving_check.py")

# Images the 8x8x1 test export must reject with an error naming its shape [N, 8, 8, 1].
BAD_IMAGE_SHAPES = [[2, 28, 28, 1], [2, 8, 8, 3], [2, 8, 8], [1, 8, 8, 1, 1], [8, 8, 1], []]

EXPECTED_SHAPE = r"images must have shape \[N, 8, 8, 1\]"


@pytest.fixture(scope="module")
def trained(tiny_export):
    """The tiny trained model these tests share: conftest's ``tiny_export``, trained once per test run."""
    return tiny_export


def _load_client(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "export", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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


@pytest.mark.integration
def test_saved_model_cli_lists_the_signatures(trained):
    result = subprocess.run([sys.executable, "-m", "tensorflow.python.tools.saved_model_cli", "show", "--dir",
                             trained[3], "--all"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    for name in ("classify", "energy", "sample", "serving_default"):
        assert f"signature_def['{name}']" in result.stdout
    assert "is_in_distribution" in result.stdout and "num_samples" in result.stdout


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
