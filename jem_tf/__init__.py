"""jem-tf: Joint Energy-based Models (JEM) for Keras 3 / TensorFlow."""

import os as _os

if _os.environ.get("KERAS_BACKEND", "tensorflow") != "tensorflow":
    # Checked before Keras is imported: Keras would fail to import another backend that is not installed (a
    # ModuleNotFoundError that never names jem-tf's need) or run jem-tf's TensorFlow code on the wrong tensors.
    raise ImportError(f"jem-tf needs Keras's TensorFlow backend, but KERAS_BACKEND={_os.environ['KERAS_BACKEND']!r}: "
                      "unset it or set KERAS_BACKEND=tensorflow.")

import sys as _sys


def _run_as_a_command() -> bool:
    """Whether this import is Python locating ``python -m jem_tf.<command>`` (sys.argv[0] is "-m" until the
    command's module runs, and the interpreter's own command line names a jem_tf module)."""
    if _sys.argv[:1] != ["-m"]:
        return False
    argv = list(getattr(_sys, "orig_argv", ()))
    target = argv[argv.index("-m") + 1] if "-m" in argv[:-1] else ""
    return target == "jem_tf" or target.startswith("jem_tf.")


_COMMAND = _run_as_a_command()

if _COMMAND:
    # The package is the program: a Ctrl-C before the command's own handling starts (while the command's modules
    # import) is one line and exit 130, not a traceback. Library imports (also those of another `python -m`
    # program's package) leave SIGINT alone.
    from jem_tf.cli import handle_ctrl_c_while_starting

    handle_ctrl_c_while_starting()

_PUBLIC = {  # name -> the module that defines it
    "JEM": "jem_tf.model.jem", "energy": "jem_tf.model.energy", "BufferDraw": "jem_tf.sampling.replay_buffer",
    "ReplayBuffer": "jem_tf.sampling.replay_buffer", "ClassGaussian": "jem_tf.sampling.chain_init",
    "SGLDDiagnostics": "jem_tf.sampling.sgld", "SGLDSampler": "jem_tf.sampling.sgld",
    "StabilityGuard": "jem_tf.training.stability", "TrainingDiverged": "jem_tf.training.stability",
    "WarmupPiecewiseSchedule": "jem_tf.training.schedules", "build_backbone": "jem_tf.networks",
    "fast_cnn": "jem_tf.networks", "small_cnn": "jem_tf.networks", "wide_resnet": "jem_tf.networks",
}

if _COMMAND:
    # A command (python -m jem_tf.<command>) imports what it needs itself, after parsing its flags: importing
    # TensorFlow here would make `--help` and a bad flag wait seconds for it. The public names load on first use.
    def __getattr__(name):
        import importlib

        if name not in _PUBLIC:
            raise AttributeError(f"module 'jem_tf' has no attribute {name!r}")
        module = importlib.import_module(_PUBLIC[name])
        return module if module.__name__.endswith(f".{name}") else getattr(module, name)
else:
    # A library import: every public name at once (importing jem_tf.model.jem also registers JEM and its layers with
    # Keras, which keras.models.load_model needs).
    from jem_tf.model import energy  # noqa: E402, F401
    from jem_tf.model.jem import JEM  # noqa: E402, F401
    from jem_tf.networks import build_backbone, fast_cnn, small_cnn, wide_resnet  # noqa: E402, F401
    from jem_tf.sampling.chain_init import ClassGaussian  # noqa: E402, F401
    from jem_tf.sampling.replay_buffer import BufferDraw, ReplayBuffer  # noqa: E402, F401
    from jem_tf.sampling.sgld import SGLDDiagnostics, SGLDSampler  # noqa: E402, F401
    from jem_tf.training.schedules import WarmupPiecewiseSchedule  # noqa: E402, F401
    from jem_tf.training.stability import StabilityGuard, TrainingDiverged  # noqa: E402, F401

from jem_tf.version import __version__  # noqa: E402, F401

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
