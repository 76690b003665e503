"""A run's files and settings: the config and its rules, recipes, the work directory's layout and lock, model files
(loading a trained model or a classifier to convert) and the data splits.

Import the modules themselves (e.g. ``from jem_tf.run import ...`` of a module name); this package
imports nothing, so that each command loads only what it uses."""
