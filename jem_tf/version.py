"""jem-tf's version, in one place: ``setup.cfg`` reads it, ``jem_tf.__version__`` and the serving export's metadata
record it. A leaf module."""

__version__ = "0.1.0"
