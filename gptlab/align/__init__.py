"""Alignment stages: supervised fine-tuning (``sft``); ``gptlab.chat`` talks to the models they make."""
