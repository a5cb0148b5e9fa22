"""mnist-harness: a distributed data-parallel training harness for MNIST-like data."""

__version__ = "0.1.0"
