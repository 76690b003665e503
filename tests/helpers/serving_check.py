"""Loads a jem-tf export the way serving runtimes do, in a process that cannot import Keras or jem_tf.

usage: python serving_check.py EXPORT_VERSION_DIR INPUTS.npz OUTPUTS.npz

Runs every signature (1) through ``tf.saved_model.load`` and (2) through the TF1 session loader
(``tf.compat.v1.saved_model.loader.load`` + ``sess.run`` on the SignatureDef's tensor names), which is
what TensorFlow Serving's C++ loader does, and writes the outputs as ``<loader>/<signature>/<output>``.
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# Make Keras (3 and 2) and jem_tf unimportable: `import keras` raises ImportError, and TensorFlow's own
# import (which loads Keras for `tf.keras` when it can) treats Keras as not installed. Whatever works
# below therefore depends on the SavedModel and TensorFlow alone, like TensorFlow Serving.
for _name in ("keras", "tf_keras", "jem_tf"):
    sys.modules[_name] = None

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

SAMPLE_KEYS = ("num_samples", "n_steps", "seed", "class_label", "step_size", "noise_std")


def requests(inputs):
    images = {"images": inputs["images"]}
    sample = {k: inputs[k] for k in SAMPLE_KEYS}
    conditional = dict(sample, class_label=np.int32(1))
    start = dict(sample, n_steps=np.int32(0))
    return {"classify": ("classify", images), "serving_default": ("serving_default", images),
            "energy": ("energy", images), "sample": ("sample", sample), "sample_again": ("sample", sample),
            "sample_conditional": ("sample", conditional), "sample_start": ("sample", start)}


def run_object_api(path, inputs):
    loaded = tf.saved_model.load(path)
    out = {}
    for name, (signature, feed) in requests(inputs).items():
        result = loaded.signatures[signature](**{k: tf.constant(v) for k, v in feed.items()})
        out.update({f"object/{name}/{k}": v.numpy() for k, v in result.items()})
    return out


def run_session_api(path, inputs):
    out = {}
    with tf.Graph().as_default(), tf.compat.v1.Session() as sess:
        meta_graph = tf.compat.v1.saved_model.loader.load(sess, ["serve"], path)
        for name, (signature, feed) in requests(inputs).items():
            signature_def = meta_graph.signature_def[signature]
            feed_dict = {signature_def.inputs[k].name: v for k, v in feed.items()}
            fetches = {k: t.name for k, t in signature_def.outputs.items()}
            result = sess.run(fetches, feed_dict)
            out.update({f"session/{name}/{k}": v for k, v in result.items()})
    return out


def main(path, inputs_path, outputs_path):
    inputs = dict(np.load(inputs_path))
    out = run_object_api(path, inputs)
    out.update(run_session_api(path, inputs))
    np.savez(outputs_path, **out)
    leaked = sorted(m for m in sys.modules if sys.modules[m] is not None and m.split(".")[0] in
                    ("keras", "tf_keras", "jem_tf"))
    print("IMPORTED:", ",".join(leaked) if leaked else "none")


if __name__ == "__main__":
    main(*sys.argv[1:4])
