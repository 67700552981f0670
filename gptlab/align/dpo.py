"""Direct Preference Optimization: the policy learns from preference pairs directly, with no reward
model and no RL (Rafailov et al. 2023), with TRL DPOTrainer's losses, defaults and metric names.

For a pair (prompt x, chosen y_c, rejected y_r), log π(y|x) is summed over the answer's own tokens
(never the prompt's, never padding). With the same sums under a frozen reference model,
``logits = [log π(y_c) - log π(y_r)] - [log π_ref(y_c) - log π_ref(y_r)]`` and, with β = ``beta``
and ε = ``label_smoothing``:

- ``sigmoid`` (DPO; cDPO when ε > 0): ``-(1-ε) log σ(β logits) - ε log σ(-β logits)``
- ``robust`` (Robust DPO, unbiased under ε label noise): ``[-(1-ε) log σ(β logits) + ε log σ(-β logits)] / (1-2ε)``
- ``hinge`` (SLiC): ``max(0, 1 - β logits)``
- ``ipo``: ``(logits - 1/(2β))²``, with each log-prob divided by its answer's token count first, as
  TRL does (its authors confirmed the IPO paper's results use this per-token form).

The implicit rewards ``β (log π(y) - log π_ref(y))`` (summed log-probs for every loss type) give the
logged metrics ``rewards/chosen``, ``rewards/rejected``, ``rewards/accuracies`` (share of pairs with
the chosen reward higher), ``rewards/margins``; also ``logps/chosen``, ``logps/rejected`` (the
policy's summed log-probs) and ``logits/chosen``, ``logits/rejected`` (the policy's logits averaged
over vocabulary and answer tokens). On the held-out file they carry TRL's ``eval_`` prefix.

The reference's log-probs are either computed in one pass before training and stored in the run
folder (``precompute_ref``: the reference model is not held while training, and a resumed run
reads them back) or taken from a frozen copy of the reference at every step. The stage starts from
an SFT model folder and ends with one like it, chat template included.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import safe_open, save_file

from gptlab.align.sft import load_stage_config
from gptlab.config import to_dict
from gptlab.data.loader import to_device
from gptlab.data.prefs import Pair, PairBatches, PrefDataConfig, collate_pairs, eval_pair_batches, load_preferences
from gptlab.errors import UserError
from gptlab.fileio import give_umask_permissions, remove_stale, write_error
from gptlab.logprobs import IGNORE, padded_inputs, sequence_logprobs
from gptlab.model import GPT, disable_dropout
from gptlab.runs import RunFolder
from gptlab.tokenizer import Tokenizer
from gptlab.train.loop import Runtime, TrainConfig, Trainer, cleanup_runtime, setup_runtime

LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust")
SMOOTHED_LOSS_TYPES = ("sigmoid", "robust")  # the losses label_smoothing enters


@dataclass
class DpoTrainConfig(TrainConfig):
    """The training loop's config with DPO defaults. ``batch_size`` counts pairs (each two
    sequences). TRL's 1e-6 suits billion-parameter models; TinyWorld's models of about a million
    parameters, fine-tuned at 3e-4, barely move at that rate in a few hundred steps, so the default
    is a tenth of their SFT rate, held constant and then decayed linearly, without weight decay."""

    max_steps: int = 300
    batch_size: int = 16
    lr: float = 3e-5
    warmup_steps: int = 20
    schedule: str = "linear"
    weight_decay: float = 0.0
    eval_every: int = 100
    save_every: int = 300


@dataclass
class DpoConfig:
    init: str = "runs/sft/model"  # the policy's start: a model folder with its tokenizer
    ref: str | None = None  # the reference model folder; None: init
    data: PrefDataConfig = field(default_factory=PrefDataConfig)
    beta: float = 0.1
    loss_type: str = "sigmoid"  # sigmoid | ipo | hinge | robust
    label_smoothing: float = 0.0  # ε of cDPO (sigmoid) and Robust DPO (robust), in [0, 0.5)
    precompute_ref: bool = True  # TRL's precompute_ref_log_probs: one reference pass before training
    rpo_alpha: float | None = None  # TRL's: weight of the chosen answers' NLL added to the loss (RPO)
    train: DpoTrainConfig = field(default_factory=DpoTrainConfig)

    def __post_init__(self):
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {', '.join(LOSS_TYPES)}, got {self.loss_type!r}")
        if not 0 < self.beta < math.inf:
            raise ValueError(f"beta must be a positive finite number, got {self.beta}")
        if not 0 <= self.label_smoothing < 0.5:
            raise ValueError(f"label_smoothing must be in [0, 0.5), got {self.label_smoothing}")
        if self.label_smoothing and self.loss_type not in SMOOTHED_LOSS_TYPES:
            raise ValueError(f"label_smoothing applies to the sigmoid and robust losses, not to {self.loss_type!r}")
        if self.rpo_alpha is not None and not 0 <= self.rpo_alpha < math.inf:
            raise ValueError(f"rpo_alpha must be a finite number >= 0 or unset, got {self.rpo_alpha}")

    @property
    def reference(self) -> str:
        return self.ref if self.ref is not None else self.init


def load_config(config_path: str | None, overrides: list[str], out_dir: Path, resume: bool) -> DpoConfig:
    """Resolve the config as SFT does (``load_stage_config``)."""
    return load_stage_config(DpoConfig, config_path, overrides, out_dir, resume)


# ----------------------------------------------------------------------------- the losses


def dpo_losses(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """Each pair's loss (B,) from the policy's and the reference's log-probs of its two answers
    (see the module docstring; for ``ipo`` the caller passes per-token log-probs)."""
    logits = (chosen_logps - rejected_logps) - (ref_chosen_logps - ref_rejected_logps)
    eps = label_smoothing
    if loss_type == "sigmoid":
        return -F.logsigmoid(beta * logits) * (1 - eps) - F.logsigmoid(-beta * logits) * eps
    if loss_type == "robust":
        return (-F.logsigmoid(beta * logits) * (1 - eps) + F.logsigmoid(-beta * logits) * eps) / (1 - 2 * eps)
    if loss_type == "hinge":
        return torch.relu(1 - beta * logits)
    if loss_type == "ipo":
        return (logits - 1 / (2 * beta)) ** 2
    raise ValueError(f"unknown loss_type {loss_type!r}; one of {', '.join(LOSS_TYPES)}")


def completion_logps(model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per row (2B,) of a pair batch: the log-prob of its answer tokens (summed), their count, and
    the sum over them of the mean logit. Positions count real tokens, so padding changes nothing."""
    positions, mask = padded_inputs(batch["attention_mask"])
    logits = model(batch["input_ids"], position_ids=positions, attn_mask=mask)[:, :-1]  # position t predicts t+1
    scored = batch["completion_mask"][:, 1:].bool()
    targets = torch.where(scored, batch["input_ids"][:, 1:], IGNORE)
    mean_logits = (logits.detach().float().mean(-1) * scored).sum(-1)
    return sequence_logprobs(logits, targets), scored.sum(-1), mean_logits


def by_pair(rows: torch.Tensor) -> torch.Tensor:
    """(2B,) rows of a pair batch (chosen answers, then rejected) as (B, 2): [chosen, rejected]."""
    return torch.stack(rows.chunk(2), dim=-1)


def pair_scores(model: torch.nn.Module, batch: dict, reference, split: str) -> dict[str, torch.Tensor]:
    """What the objective needs of a batch, each (B, 2) [chosen, rejected]: the policy's and the
    reference's log-probs, answer tokens and summed mean logits."""
    logps, tokens, logits = completion_logps(model, batch)
    return {
        "policy": by_pair(logps),
        "reference": reference(batch, split),
        "tokens": by_pair(tokens),
        "logits": by_pair(logits),
    }


def dpo_objective(cfg: DpoConfig, scores: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(mean loss, TRL's metrics) over the pairs of ``scores`` (see ``pair_scores``)."""
    policy, reference, tokens = scores["policy"], scores["reference"].to(scores["policy"].dtype), scores["tokens"]
    scale = tokens.clamp(min=1) if cfg.loss_type == "ipo" else 1  # IPO compares per-token log-probs
    p, r = policy / scale, reference / scale
    loss = dpo_losses(p[:, 0], p[:, 1], r[:, 0], r[:, 1], cfg.beta, cfg.loss_type, cfg.label_smoothing).mean()
    rewards = cfg.beta * (policy - reference).detach()
    logits = scores["logits"].sum(0) / tokens.sum(0).clamp(min=1)
    metrics = {
        "rewards/chosen": rewards[:, 0].mean(),
        "rewards/rejected": rewards[:, 1].mean(),
        "rewards/accuracies": (rewards[:, 0] > rewards[:, 1]).float().mean(),
        "rewards/margins": (rewards[:, 0] - rewards[:, 1]).mean(),
        "logps/chosen": policy[:, 0].detach().mean(),
        "logps/rejected": policy[:, 1].detach().mean(),
        "logits/chosen": logits[0],
        "logits/rejected": logits[1],
    }
    if cfg.rpo_alpha is not None:
        nll = -policy[:, 0].sum() / tokens[:, 0].sum().clamp(min=1)  # per chosen answer token, as TRL
        loss = loss + cfg.rpo_alpha * nll
        metrics["nll_loss"] = nll.detach()
    return loss, metrics


def dpo_loss(cfg: DpoConfig, reference):
    """The training loop's loss function: (mean loss, metrics) of a micro-batch of pairs."""

    def loss_fn(model: torch.nn.Module, batch: dict):
        return dpo_objective(cfg, pair_scores(model, batch, reference, "train"))

    return loss_fn


def validation(batches: list[dict], runtime: Runtime, cfg: DpoConfig, reference):
    """eval_loss and the eval_ metrics over the held-out pairs (all ranks: each holds as many)."""

    def evaluate(model: torch.nn.Module) -> dict:
        parts = [pair_scores(model, to_device(batch, runtime.device), reference, "val") for batch in batches]
        scores = {name: torch.cat([part[name] for part in parts]) for name in parts[0]}
        loss, metrics = dpo_objective(cfg, scores)
        means = runtime.mean(torch.stack([loss, *metrics.values()]).float()).tolist()
        return {f"eval_{name}": round(value, 6) for name, value in zip(["loss", *metrics], means)}

    return evaluate


# ----------------------------------------------------------------------------- the reference


class FrozenReference:
    """The reference model held beside the policy: eval mode, no gradients, never updated."""

    def __init__(self, model: GPT):
        self.model = model.eval().requires_grad_(False)

    def __call__(self, batch: dict, split: str) -> torch.Tensor:
        with torch.no_grad():
            return by_pair(completion_logps(self.model, batch)[0])


class PrecomputedReference:
    """The reference's log-probs read from a table per split, (records, 2) by pair index."""

    def __init__(self, tables: dict[str, torch.Tensor]):
        self.tables = tables

    def __call__(self, batch: dict, split: str) -> torch.Tensor:
        return self.tables[split][batch["index"]]


def reference_logps(
    model: GPT, pairs: list[Pair], micro_batch_size: int, pad_id: int, runtime: Runtime
) -> torch.Tensor:
    """(len(pairs), 2) [chosen, rejected]: the model's log-probs of each pair's answers, in eval
    mode and in the precision training runs in (so they equal what a live reference gives)."""
    model.eval()
    logps = []
    with torch.no_grad(), runtime.autocast():
        for start in range(0, len(pairs), micro_batch_size):
            batch = to_device(collate_pairs(pairs[start : start + micro_batch_size], pad_id), runtime.device)
            logps.append(by_pair(completion_logps(model, batch)[0]).float())
    return torch.cat(logps) if logps else torch.zeros(0, 2)


def reference_table(
    model: GPT, pairs: list[Pair], micro_batch_size: int, pad_id: int, runtime: Runtime
) -> torch.Tensor:
    """(records, 2) on the CPU: row ``pair.index`` holds that pair's reference log-probs (NaN for a
    record that was dropped). Each rank computes its share of the pairs; the shares are gathered.
    Pairs of similar lengths share a batch, so little of it is padding."""
    mine = sorted(pairs, key=lambda pair: pair.length)[runtime.rank :: runtime.world_size]
    share = ([p.index for p in mine], reference_logps(model, mine, micro_batch_size, pad_id, runtime).cpu())
    shares = [share]
    if runtime.distributed:
        shares = [None] * runtime.world_size
        dist.all_gather_object(shares, share)
    table = torch.full((max((p.index for p in pairs), default=-1) + 1, 2), float("nan"))
    for indices, logps in shares:
        table[torch.tensor(indices, dtype=torch.long)] = logps
    return table


def pairs_fingerprint(pairs: list[Pair]) -> str:
    """sha256 of the pairs' indices, token ids and masks: stored reference log-probs belong to it."""
    digest = hashlib.sha256()
    for p in pairs:
        digest.update(json.dumps([p.index, p.prompt, p.chosen, p.rejected, p.chosen_mask, p.rejected_mask]).encode())
    return digest.hexdigest()


def stored_identity(ref: str, fingerprints: dict[str, str]) -> dict[str, str]:
    """What the stored log-probs were computed from: the reference folder and each split's pairs."""
    return {"ref": str(ref), **{f"data.{split}": fingerprint for split, fingerprint in fingerprints.items()}}


def save_reference(path: Path, tables: dict[str, torch.Tensor], identity: dict[str, str]) -> None:
    """Write the tables atomically (temp file, then rename): a killed run never leaves half of one,
    and the next write removes what a killed one left."""
    remove_stale(path.parent, rf"\.{re.escape(path.name)}\.tmp-(?P<pid>\d+)")
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        save_file({split: table.contiguous() for split, table in tables.items()}, tmp, metadata=identity)
        give_umask_permissions(tmp)
        os.replace(tmp, path)
    except BaseException as e:
        error = write_error(e, path)
        tmp.unlink(missing_ok=True)
        if error is not None:
            raise error from e
        raise


def read_reference(path: Path, identity: dict[str, str]) -> dict[str, torch.Tensor]:
    """The tables ``save_reference`` wrote, when they were computed from ``identity``."""
    try:
        with safe_open(path, framework="pt") as f:
            stored = f.metadata() or {}
            tables = {split: f.get_tensor(split) for split in f.keys()}  # noqa: SIM118 (a safetensors handle has keys(), no __iter__)
    except (OSError, SafetensorError) as e:
        raise UserError(f"{path} cannot be read ({e}); delete it and resume to compute it again") from None
    differs = [key for key in identity.keys() | stored.keys() if identity.get(key) != stored.get(key)]
    if differs:
        raise UserError(
            f"{path} holds reference log-probs of another {', '.join(sorted(differs))} than this run's; resume "
            "with the run's own ref and data, or delete the file to compute them again"
        )
    return tables


# ----------------------------------------------------------------------------- the stage


def check_policy(cfg: DpoConfig, model: GPT, tokenizer: Tokenizer) -> None:
    block_size = model.config.block_size
    if cfg.train.seq_len > block_size:
        raise UserError(
            f"train.seq_len {cfg.train.seq_len} is longer than the model's block_size {block_size}; "
            f"lower train.seq_len to at most {block_size}"
        )
    if tokenizer.vocab_size > model.config.vocab_size:
        raise UserError(
            f"the tokenizer in {cfg.init} has {tokenizer.vocab_size} tokens but the model only "
            f"{model.config.vocab_size}: the folder mixes files from different runs"
        )


def check_reference(cfg: DpoConfig, tokenizer: Tokenizer, model: GPT, reference: GPT | None = None) -> None:
    """The reference reads the same token ids as the policy: the same tokenizer and output size."""
    ref_tokenizer = Tokenizer.from_pretrained(cfg.reference)
    if ref_tokenizer.fingerprint != tokenizer.fingerprint:
        sizes = f"{ref_tokenizer.vocab_size} vs {tokenizer.vocab_size} tokens"
    elif reference is not None and reference.config.vocab_size != model.config.vocab_size:
        sizes = f"{reference.config.vocab_size} vs {model.config.vocab_size} logits"
    else:
        return
    raise UserError(
        f"the reference {cfg.reference} has another vocabulary than the policy {cfg.init} ({sizes}): DPO compares "
        "both models' log-probs of the same token ids; give a ref trained with the policy's tokenizer"
    )


def load_reference(cfg: DpoConfig, tokenizer: Tokenizer, model: GPT) -> GPT:
    reference = GPT.from_pretrained(cfg.reference, dtype=torch.float32)
    check_reference(cfg, tokenizer, model, reference)
    return reference


def precomputed_reference(
    cfg: DpoConfig,
    policy: GPT,
    tokenizer: Tokenizer,
    splits: dict[str, list[Pair]],
    micro_batch_size: int,
    pad_id: int,
    runtime: Runtime,
    run: RunFolder,
    resume: bool,
    overwrite: bool,
) -> PrecomputedReference:
    """The reference's log-probs of every pair: read back when resuming (never recomputed), else
    computed in one pass, by the policy itself while it still holds ``init`` when ref is init, and
    stored in the run folder."""
    identity = stored_identity(cfg.reference, {split: pairs_fingerprint(pairs) for split, pairs in splits.items()})
    if resume and run.ref_logps_path.is_file():
        tables = read_reference(run.ref_logps_path, identity)
    else:
        same = Path(cfg.reference).resolve() == Path(cfg.init).resolve()
        model = (policy if same else load_reference(cfg, tokenizer, policy)).to(runtime.device)
        tables = {
            split: reference_table(model, pairs, micro_batch_size, pad_id, runtime) for split, pairs in splits.items()
        }
        # A fresh run into another run's folder writes nothing: the trainer refuses it next.
        if runtime.is_main and (resume or overwrite or not run.holds_training()):
            run.path.mkdir(parents=True, exist_ok=True)
            save_reference(run.ref_logps_path, tables, identity)
    return PrecomputedReference({split: table.to(runtime.device) for split, table in tables.items()})


def dpo(cfg: DpoConfig, out_dir: str | Path, resume: bool = False, overwrite: bool = False) -> GPT:
    """Train ``cfg.init`` with DPO on ``cfg.data`` into ``out_dir`` (run.json, metrics.jsonl,
    the reference log-probs, checkpoints/, model/); returns the trained model."""
    out_dir = Path(out_dir)
    tcfg = cfg.train
    model = disable_dropout(GPT.from_pretrained(cfg.init, dtype=torch.float32))
    tokenizer = Tokenizer.from_pretrained(cfg.init)
    check_policy(cfg, model, tokenizer)
    check_reference(cfg, tokenizer, model)
    runtime = setup_runtime(tcfg)
    try:
        micro, _ = runtime.micro_batching(tcfg)
        train, val, stats = load_preferences(cfg.data, tokenizer, tcfg.seq_len, warn=runtime.is_main)
        splits = {"train": train, **({"val": val} if val else {})}
        pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else 0  # any id: padding is never scored
        if cfg.precompute_ref:
            reference = precomputed_reference(
                cfg, model, tokenizer, splits, micro, pad_id, runtime, RunFolder(out_dir), resume, overwrite
            )
        else:
            reference = FrozenReference(load_reference(cfg, tokenizer, model).to(runtime.device))
        batches = PairBatches(
            train,
            micro_batch_size=micro,
            pad_id=pad_id,
            seed=tcfg.seed,
            rank=runtime.rank,
            world_size=runtime.world_size,
            device=runtime.device,
        )
        val_batches = eval_pair_batches(
            val,
            micro_batch_size=micro,
            pad_id=pad_id,
            max_batches=tcfg.eval_batches,
            rank=runtime.rank,
            world_size=runtime.world_size,
        )
        evaluate = validation(val_batches, runtime, cfg, reference) if val_batches else None
        torch.manual_seed(tcfg.seed)
        trainer = Trainer(
            model,
            tcfg,
            runtime,
            out_dir,
            dpo_loss(cfg, reference),
            batches,
            evaluate=evaluate,
            tokenizer=tokenizer,
            progress_metrics=("rewards/accuracies", "rewards/margins"),
        )
        return trainer.run("dpo", to_dict(cfg), resume, overwrite, data={s: st.to_dict() for s, st in stats.items()})
    finally:
        cleanup_runtime(runtime)
