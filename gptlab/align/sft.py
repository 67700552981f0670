"""Supervised fine-tuning (instruction tuning): next-token prediction on the assistant's tokens only.

The stage brings what the training loop needs and nothing more: a batch source of rendered
conversations (``gptlab.data.chat``: chat template, loss mask, packing), the loss (mean
cross-entropy over the masked-in targets) and a validation loss over the held-out file. It
starts from a model folder (a pretrained model and its tokenizer) and ends with one that carries
the chat template, so ``gptlab chat`` and transformers' ``apply_chat_template`` work on it.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from gptlab.config import build, get_dotted, read_run_raw, set_dotted, to_dict
from gptlab.data.chat import TRUNCATION, ChatBatches, eval_batches, load_chat_data, packed_attention_mask
from gptlab.data.loader import to_device
from gptlab.errors import UserError
from gptlab.logprobs import IGNORE, token_logprobs
from gptlab.model import GPT, ModelConfig
from gptlab.tokenizer import Tokenizer
from gptlab.train.loop import Runtime, TrainConfig, Trainer, cleanup_runtime, setup_runtime


@dataclass
class SftDataConfig:
    train: str = "data/world/sft/train.jsonl"
    val: str | None = None  # a held-out JSONL file for val_loss; None: no validation
    packing: bool = True  # several conversations per row, without attention across them
    truncation: str = "turn"  # over-long conversation: turn (cut after the last reply that fits) | drop

    def __post_init__(self):
        if self.truncation not in TRUNCATION:
            raise ValueError(f"data.truncation must be 'turn' or 'drop', got {self.truncation!r}")


@dataclass
class SftTrainConfig(TrainConfig):
    """The training loop's config with fine-tuning defaults: a short run at a tenth of a small
    model's pretraining learning rate, held constant and then decayed linearly, no weight decay."""

    max_steps: int = 500
    batch_size: int = 16
    lr: float = 3e-4
    warmup_steps: int = 20
    schedule: str = "linear"
    weight_decay: float = 0.0
    eval_every: int = 100
    save_every: int = 250


@dataclass
class SftConfig:
    init: str = "runs/base/model"  # the model folder to start from; its tokenizer comes with it
    data: SftDataConfig = field(default_factory=SftDataConfig)
    train: SftTrainConfig = field(default_factory=SftTrainConfig)


def load_config(config_path: str | None, overrides: list[str], out_dir: Path, resume: bool) -> SftConfig:
    """Resolve the config (see ``load_stage_config``)."""
    return load_stage_config(SftConfig, config_path, overrides, out_dir, resume)


def load_stage_config(config_class, config_path: str | None, overrides: list[str], out_dir: Path, resume: bool):
    """A fine-tuning stage's config (``config_class`` has ``init`` and ``train``): run.json's when
    resuming without --config, else file + overrides. train.seq_len defaults to the init model's
    block_size: sequences are as long as the model can read."""
    raw = read_run_raw(config_path, overrides, out_dir, resume)
    cfg = build(config_class, raw)  # refuses unknown keys before any file is read
    if get_dotted(raw, "train.seq_len") is None:
        block_size = init_block_size(Path(cfg.init))
        if block_size is not None:
            set_dotted(raw, "train.seq_len", block_size)
            cfg = build(config_class, raw)
    return cfg


def init_block_size(folder: Path) -> int | None:
    """The block_size of the model folder a run starts from, or None when it cannot be read yet."""
    try:
        return ModelConfig.from_hf(json.loads((folder / "config.json").read_text())).block_size
    except (OSError, ValueError):
        return None  # sft() loads the folder and says what is wrong with it


def sft_loss(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    """Mean next-token cross-entropy over the targets the mask keeps (labels != -100)."""
    mask = packed_attention_mask(batch["segment_ids"])
    return model(batch["input_ids"], batch["labels"], position_ids=batch["position_ids"], attn_mask=mask)


def token_losses(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    """Cross-entropy of every target (B, T); 0 where the label is ignored."""
    mask = packed_attention_mask(batch["segment_ids"])
    logits = model(batch["input_ids"], position_ids=batch["position_ids"], attn_mask=mask)
    return -token_logprobs(logits, batch["labels"])


def validation(batches: list[dict], runtime: Runtime):
    """The mean loss per trained token of the validation batches (all ranks together)."""

    def evaluate(model: torch.nn.Module) -> dict:
        total = torch.zeros((), device=runtime.device)
        count = torch.zeros((), device=runtime.device)
        for batch in batches:
            batch = to_device(batch, runtime.device)
            total += token_losses(model, batch).sum()
            count += (batch["labels"] != IGNORE).sum()
        # Means of sums over ranks divide to the ratio of totals.
        return {"val_loss": round((runtime.mean(total) / runtime.mean(count.float())).item(), 6)}

    return evaluate


def sft(cfg: SftConfig, out_dir: str | Path, resume: bool = False, overwrite: bool = False) -> GPT:
    """Fine-tune ``cfg.init`` on ``cfg.data`` into ``out_dir`` (run.json, metrics.jsonl,
    checkpoints/, model/); returns the trained model."""
    out_dir = Path(out_dir)
    tcfg = cfg.train
    model = GPT.from_pretrained(cfg.init, dtype=torch.float32)
    tokenizer = Tokenizer.from_pretrained(cfg.init)
    if tcfg.seq_len > model.config.block_size:
        raise UserError(
            f"train.seq_len {tcfg.seq_len} is longer than the model's block_size {model.config.block_size}; "
            f"lower train.seq_len to at most {model.config.block_size}"
        )
    if tokenizer.vocab_size > model.config.vocab_size:
        raise UserError(
            f"the tokenizer in {cfg.init} has {tokenizer.vocab_size} tokens but the model only "
            f"{model.config.vocab_size}: the folder mixes files from different runs"
        )
    runtime = setup_runtime(tcfg)
    try:
        micro, _ = runtime.micro_batching(tcfg)
        stats = {}
        train, stats["train"] = load_chat_data(cfg.data.train, tokenizer, tcfg.seq_len, cfg.data.truncation)
        val = []
        if cfg.data.val is not None:
            val, stats["val"] = load_chat_data(cfg.data.val, tokenizer, tcfg.seq_len, cfg.data.truncation)
        if not train:
            why = stats["train"].warning(cfg.data.train, tcfg.seq_len) or f"{cfg.data.train} holds no conversations"
            raise UserError(f"no conversation to train on ({why}); give conversations that end with an assistant reply")
        for split, path in (("train", cfg.data.train), ("val", cfg.data.val)):
            warning = stats[split].warning(path, tcfg.seq_len) if split in stats else None
            if warning and runtime.is_main:
                print(f"gptlab: warning: {warning}", file=sys.stderr, flush=True)
        pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else 0  # any id: padding is never a target
        batches = ChatBatches(
            train,
            seq_len=tcfg.seq_len,
            micro_batch_size=micro,
            pad_id=pad_id,
            packing=cfg.data.packing,
            seed=tcfg.seed,
            rank=runtime.rank,
            world_size=runtime.world_size,
            device=runtime.device,
        )
        val_batches = eval_batches(
            val,
            seq_len=tcfg.seq_len,
            micro_batch_size=micro,
            pad_id=pad_id,
            packing=cfg.data.packing,
            max_batches=tcfg.eval_batches,
            rank=runtime.rank,
            world_size=runtime.world_size,
        )
        evaluate = validation(val_batches, runtime) if val_batches else None
        torch.manual_seed(tcfg.seed)
        trainer = Trainer(model, tcfg, runtime, out_dir, sft_loss, batches, evaluate=evaluate, tokenizer=tokenizer)
        return trainer.run(
            "sft", to_dict(cfg), resume, overwrite, data={split: s.to_dict() for split, s in stats.items()}
        )
    finally:
        cleanup_runtime(runtime)
