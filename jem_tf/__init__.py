"""jem-tf: Joint Energy-based Models (JEM) for Keras 3 / TensorFlow."""

from jem_tf import energy
from jem_tf.chain_init import ClassGaussian
from jem_tf.jem import JEM
from jem_tf.networks import build_backbone, fast_cnn, small_cnn, wide_resnet
from jem_tf.replay_buffer import BufferDraw, ReplayBuffer
from jem_tf.schedules import WarmupPiecewiseSchedule
from jem_tf.sgld import SGLDDiagnostics, SGLDSampler
from jem_tf.stability import StabilityGuard, TrainingDiverged

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
