"""SGLD and where chains live and start: the sampler, the replay buffer, the class-Gaussian start distribution and the
replica-aware random numbers of distributed training. Never sees a model.

Import the modules themselves (e.g. ``from jem_tf.sampling import ...`` of a module name); this package
imports nothing, so that each command loads only what it uses."""
