"""The names every choice-valued flag and config field takes: plain data, imported by the modules that implement
each choice and by the commands, which parse their flags (and print ``--help``) before TensorFlow is imported.

A leaf module: it imports nothing.
"""

# Training config (jem_tf.run.config_rules checks the fields against these).
OPTIMIZERS = ("adam", "sgd")
STRATEGIES = ("default", "mirrored", "multi_worker", "tpu")  # jem_tf.sampling.distribution
NORMALIZATIONS = ("none", "batch", "layer")  # jem_tf.networks
STEM_INITS = ("default", "whitened")  # jem_tf.networks.whiten_stem
PRECISIONS = ("float32", "mixed_bfloat16", "mixed_float16")  # jem_tf.networks; config also takes "auto"
CHAIN_INITS = ("uniform", "class_gaussian")  # jem_tf.sampling.chain_init
BUFFER_STORAGES = ("float32", "uint8")  # jem_tf.sampling.replay_buffer
AUGMENTATIONS = ("none", "flip", "crop", "crop_flip")  # jem_tf.data.pipelines
TEST_TIME_AUGMENTATIONS = ("none", "flip", "flip_shift")  # jem_tf.model.views
RESIZE_METHODS = ("bilinear", "nearest", "bicubic", "lanczos", "box", "area")  # jem_tf.data.image_files
SERVING_PRECISIONS = ("float32", "trained")  # jem_tf.serving
DENSITY_HEAD_OFFSETS = ("free", "nonpositive")  # jem_tf.model.heads.with_density_head

# Data sets by name (jem_tf.data).
TFDS_DATASETS = ("mnist", "fashion_mnist", "cifar10", "cifar100", "svhn_cropped")
DATASETS = ("digits",) + TFDS_DATASETS
EVALUATION_ONLY_DATASETS = ("mnist_5k",)

# Export (jem_tf.serving, jem_tf.run.splits, jem_tf.ood.outliers).
CALIBRATION_SPLITS = ("validation", "test")
OUTLIER_KINDS = ("inverted", "patch_shuffled", "noised", "outlined", "mosaic", "coarse")
ACCEPTED_SHIFTS = ("blurred", "low_contrast", "translated")
MAX_N_STEPS_LIMIT = 100_000  # the sample signature's hardest bound on n_steps
DEFAULT_MAX_BATCH_SIZE = 1024  # images per classify / energy request

# Evaluation (jem_tf.evaluation).
EVALUATION_MODES = ("accuracy", "calibration", "ood", "samples", "frechet", "robustness")
REFINEMENT_SOURCES = ("model", "choose", "sampler")

# Tuning (jem_tf.training.tuning).
TUNERS = ("random", "hyperband", "bayesian", "grid")
TUNING_OBJECTIVES = ("val_accuracy", "combined")
