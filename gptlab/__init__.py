"""gptlab: the whole life of a decoder-only language model."""
