"""Alignment stages: supervised fine-tuning (``sft``), and the terminal chat that talks to its models."""
