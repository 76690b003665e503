"""jem-tf: Joint Energy-based Models (JEM) for Keras 3 / TensorFlow."""

import os as _os

if _os.environ.get("KERAS_BACKEND", "tensorflow") != "tensorflow":
    # Checked before Keras is imported: Keras would fail to import another backend that is not installed (a
    # ModuleNotFoundError that never names jem-tf's need) or run jem-tf's TensorFlow code on the wrong tensors.
    raise ImportError(f"jem-tf needs Keras's TensorFlow backend, but KERAS_BACKEND={_os.environ['KERAS_BACKEND']!r}: "
                      "unset it or set KERAS_BACKEND=tensorflow.")

try:
    from jem_tf import energy
    from jem_tf.chain_init import ClassGaussian
    from jem_tf.jem import JEM
    from jem_tf.networks import build_backbone, fast_cnn, small_cnn, wide_resnet
    from jem_tf.replay_buffer import BufferDraw, ReplayBuffer
    from jem_tf.schedules import WarmupPiecewiseSchedule
    from jem_tf.sgld import SGLDDiagnostics, SGLDSampler
    from jem_tf.stability import StabilityGuard, TrainingDiverged
except KeyboardInterrupt:
    import sys as _sys

    # `python -m jem_tf.<command>` imports this package (and TensorFlow) while it locates the command, with
    # sys.argv[0] "-m": a Ctrl-C then is the command's interrupt (one line, exit 130), not a library traceback.
    if _sys.argv[:1] != ["-m"]:
        raise
    print("python -m jem_tf: interrupted (while TensorFlow was being imported); nothing was written",
          file=_sys.stderr)
    raise SystemExit(130) from None

__version__ = "0.1.0"

__all__ = [
    "JEM",
    "BufferDraw",
    "ClassGaussian",
    "ReplayBuffer",
    "SGLDDiagnostics",
    "SGLDSampler",
    "StabilityGuard",
    "TrainingDiverged",
    "WarmupPiecewiseSchedule",
    "build_backbone",
    "energy",
    "fast_cnn",
    "small_cnn",
    "wide_resnet",
]
