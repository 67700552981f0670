"""Pretraining: next-token prediction on 100% of the tokens of a sharded corpus.

The stage brings what the training loop needs and nothing more: a batch source (random
windows of the token shards), the loss (mean cross-entropy of the next token) and a validation
loss over the held-out split.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from gptlab.config import build, get_dotted, read_run_raw, set_dotted, to_dict
from gptlab.data import TokenLoader, read_meta
from gptlab.data.loader import to_device
from gptlab.errors import UserError
from gptlab.model import GPT, ModelConfig
from gptlab.tokenizer import Tokenizer
from gptlab.train.loop import Runtime, TrainConfig, Trainer, cleanup_runtime, setup_runtime


@dataclass
class DataConfig:
    shards: str = "shards"  # a folder written by `gptlab prepare`
    tokenizer: str | None = None  # None: the tokenizer `gptlab prepare` saved beside the shards


@dataclass
class PretrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


def load_config(config_path: str | None, overrides: list[str], out_dir: Path, resume: bool) -> PretrainConfig:
    """Resolve the config: run.json's when resuming without --config, else file + overrides.

    model.vocab_size defaults to the shards' vocabulary, so a user never has to copy it by hand.
    """
    raw = read_run_raw(config_path, overrides, out_dir, resume)
    cfg = build(PretrainConfig, raw)  # refuses unknown keys before any file is read
    if get_dotted(raw, "model.vocab_size") is None:
        set_dotted(raw, "model.vocab_size", read_meta(cfg.data.shards)["vocab_size"])
        cfg = build(PretrainConfig, raw)
    return cfg


def tokenizer_for(cfg: PretrainConfig, meta: dict) -> Tokenizer:
    folder = Path(cfg.data.tokenizer) if cfg.data.tokenizer else Path(cfg.data.shards) / "tokenizer"
    tokenizer = Tokenizer.from_pretrained(folder)
    if tokenizer.fingerprint != meta["tokenizer_fingerprint"]:
        raise UserError(
            f"shards in {cfg.data.shards} were made with another tokenizer than {folder}; "
            "run `gptlab prepare` again with this tokenizer or point data.tokenizer at the one used"
        )
    return tokenizer


def check_compatible(cfg: PretrainConfig, meta: dict) -> None:
    if cfg.model.vocab_size < meta["vocab_size"]:
        raise UserError(
            f"model.vocab_size {cfg.model.vocab_size} is smaller than the shards' vocabulary {meta['vocab_size']} "
            f"({cfg.data.shards} was made with another tokenizer); set model.vocab_size >= {meta['vocab_size']}"
        )
    if cfg.train.seq_len > cfg.model.block_size:
        raise UserError(
            f"train.seq_len {cfg.train.seq_len} is longer than model.block_size {cfg.model.block_size}; "
            "lower train.seq_len or raise model.block_size"
        )


def next_token_loss(model: torch.nn.Module, batch) -> torch.Tensor:
    x, y = batch
    return model(x, y)


def validation(cfg: PretrainConfig, runtime: Runtime):
    """The mean next-token loss over the first eval_batches windows of the val split, in order."""
    micro, _ = runtime.micro_batching(cfg.train)
    loader = TokenLoader(
        cfg.data.shards,
        split="val",
        seq_len=cfg.train.seq_len,
        batch_size=micro,
        rank=runtime.rank,
        world_size=runtime.world_size,
    )

    def evaluate(model: torch.nn.Module) -> dict:
        total, count = torch.zeros((), device=runtime.device), 0
        for x, y in loader.val_batches(cfg.train.eval_batches):
            total += model(*to_device((x, y), runtime.device)).float()
            count += 1
        return {"val_loss": round(runtime.mean(total / count).item(), 6)}

    return evaluate


class DeviceBatches:
    """A TokenLoader whose batches land on the training device."""

    def __init__(self, loader: TokenLoader, device: torch.device):
        self.loader, self.device = loader, device

    def next_batch(self):
        return to_device(self.loader.next_batch(), self.device)

    def state_dict(self) -> dict:
        return self.loader.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.loader.load_state_dict(state)


def pretrain(cfg: PretrainConfig, out_dir: str | Path, resume: bool = False, overwrite: bool = False) -> GPT:
    out_dir = Path(out_dir)
    meta = read_meta(cfg.data.shards)
    check_compatible(cfg, meta)
    tokenizer = tokenizer_for(cfg, meta)
    runtime = setup_runtime(cfg.train)
    try:
        micro, _ = runtime.micro_batching(cfg.train)
        torch.manual_seed(cfg.train.seed)
        model = GPT(cfg.model)
        loader = TokenLoader(
            cfg.data.shards,
            split="train",
            seq_len=cfg.train.seq_len,
            batch_size=micro,
            seed=cfg.train.seed,
            rank=runtime.rank,
            world_size=runtime.world_size,
        )
        has_val = meta["splits"]["val"]["tokens"] >= (cfg.train.seq_len + 1) * micro * runtime.world_size
        trainer = Trainer(
            model,
            cfg.train,
            runtime,
            out_dir,
            next_token_loss,
            DeviceBatches(loader, runtime.device),
            evaluate=validation(cfg, runtime) if has_val and cfg.train.eval_batches > 0 else None,
            tokenizer=tokenizer,
        )
        return trainer.run("pretrain", to_dict(cfg), resume, overwrite)
    finally:
        cleanup_runtime(runtime)
