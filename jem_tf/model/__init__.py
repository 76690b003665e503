"""The JEM model: :class:`~jem_tf.model.jem.JEM`, its objective, energy, training chains, generation (sampling and
refinement), refinement settings and classifier conversion.

Import the modules themselves (e.g. ``from jem_tf.model import ...`` of a module name); this package
imports nothing, so that each command loads only what it uses."""
