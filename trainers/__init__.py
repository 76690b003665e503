"""Training recipes for ``python -m jem_tf.train --recipe NAME``, installed as ``jem_tf.recipes``.

Each ``NAME.json`` is a JSON object of :class:`jem_tf.run.config.TrainConfig` fields that override
the defaults; any field can be overridden again on the command line.
"""
