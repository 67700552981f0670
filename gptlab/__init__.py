"""gptlab: the whole life of a decoder-only language model."""

__version__ = "0.1.0"
