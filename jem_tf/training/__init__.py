"""Training: the run behind `python -m jem_tf.train` (:mod:`~jem_tf.training.pipeline`), what a config builds
(:mod:`~jem_tf.training.factories`), its callbacks, divergence guard, schedules and precision probe, and the keras-
tuner search (:mod:`~jem_tf.training.tuning`).

Import the modules themselves (e.g. ``from jem_tf.training import ...`` of a module name); this package
imports nothing, so that each command loads only what it uses."""
