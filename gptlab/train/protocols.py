"""What the training loop asks of the things a stage hands it: a model and a batch source.

A stage's model need not be a ``GPT``: a reward model (a trunk with a scalar head) or a policy
with a value head trains in the same loop when it answers these few questions.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import torch
from torch import nn

from gptlab.model import ModelConfig


class Trainable(Protocol):
    activation_checkpointing: bool
    config: ModelConfig  # its shape: a resume refuses a checkpoint of another

    def write_files(self, folder: Path, tokenizer=None) -> None:
        """Write the model's files (a Hugging Face folder's) into ``folder``."""

    def read_state(self, folder: Path) -> dict[str, torch.Tensor]:
        """The state dict ``write_files`` wrote into ``folder``."""

    def with_state(self, state: dict[str, torch.Tensor]) -> nn.Module:
        """An unsharded model of the same config holding ``state`` (to write a sharded model's files)."""

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token, for MFU."""

    def num_params(self) -> int: ...

    def shard_units(self) -> list[nn.Module]:
        """The modules FSDP shards one by one before the whole model."""

    def matrix_parameters(self) -> list[nn.Parameter]:
        """The hidden weight matrices an orthogonalising optimizer (Muon) may take."""


class BatchSource(Protocol):
    """Hands out micro-batches; with ``world_size`` ranks, rank ``r`` gets its own part of each
    global batch (see ``gptlab.data.loader.TokenLoader``). Its state resumes it exactly."""

    def next_batch(self): ...
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...
