"""nettester: prove where packets get lost between two ends of a network path.

``__version__`` is the one source of the version (setup.cfg reads it).
"""

__version__ = "0.1.0"
