"""The one training loop. Every stage (pretraining, SFT, reward model, DPO, RL) brings a batch
source and a loss function; the loop owns everything else: device and precision, DDP/FSDP2 under
``torchrun``, gradient accumulation, clipping, the learning-rate schedule, AdamW, periodic
evaluation, atomic checkpoints, exact resume, the NaN guard, ``metrics.jsonl`` and the progress bar.

A batch source has ``next_batch()``, ``state_dict()`` and ``load_state_dict()``; with
``world_size`` ranks it must hand rank ``r`` its own part of each global batch (see
``gptlab.data.loader.TokenLoader``). ``loss_fn(model, batch)`` returns the mean loss of a
micro-batch.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import resource
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

import torch
import torch.distributed as dist
from tqdm import tqdm

from gptlab.checkpoint import atomic_folder, load_pretrained, write_model_files
from gptlab.config import run_info
from gptlab.data.documents import read_metrics
from gptlab.errors import UserError
from gptlab.fileio import write_json_atomic, write_text_atomic
from gptlab.model import GPT

CHECKPOINT_PATTERN = re.compile(r"^step-(\d{7,})$")


@dataclass
class TrainConfig:
    max_steps: int = 1000
    batch_size: int = 32  # global: sequences per optimizer step, over all ranks and micro-steps
    micro_batch_size: int | None = None  # per rank and forward pass; None: batch_size / world_size
    seq_len: int = 256
    lr: float = 1e-3
    min_lr: float | None = None  # None: lr / 10
    warmup_steps: int = 50
    schedule: str = "cosine"  # cosine | linear (constant, then a linear warmdown to min_lr)
    warmdown_fraction: float = 0.2  # the share of steps the linear schedule spends decaying
    optimizer: str = "adamw"  # adamw | muon (the blocks' weight matrices on Muon, the rest on AdamW)
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # 0 disables clipping
    eval_every: int = 250  # 0 disables periodic evaluation (the final step is still evaluated)
    eval_batches: int = 20
    log_every: int = 10
    save_every: int = 500  # 0: save only at the end
    keep_checkpoints: int = 2
    seed: int = 1337
    device: str = "auto"  # auto | cpu | cuda | mps
    dtype: str = "auto"  # auto (bf16 autocast on CUDA, fp32 elsewhere) | fp32 | bf16
    compile: bool = False
    activation_checkpointing: bool = False
    parallelism: str = "ddp"  # ddp | fsdp (FSDP2 fully_shard; only under torchrun)

    def __post_init__(self):
        checks = [
            (self.max_steps >= 1, "train.max_steps must be at least 1"),
            (self.batch_size >= 1, "train.batch_size must be at least 1"),
            (self.seq_len >= 1, "train.seq_len must be at least 1"),
            (self.lr > 0, "train.lr must be positive"),
            (self.warmup_steps >= 0, "train.warmup_steps must be >= 0"),
            (self.schedule in ("cosine", "linear"), "train.schedule must be 'cosine' or 'linear'"),
            (0 <= self.warmdown_fraction <= 1, "train.warmdown_fraction must be in [0, 1]"),
            (self.device in ("auto", "cpu", "cuda", "mps"), "train.device must be auto, cpu, cuda or mps"),
            (self.dtype in ("auto", "fp32", "bf16"), "train.dtype must be auto, fp32 or bf16"),
            (self.parallelism in ("ddp", "fsdp"), "train.parallelism must be ddp or fsdp"),
            (self.optimizer in ("adamw", "muon"), "train.optimizer must be adamw or muon"),
            (
                self.optimizer == "adamw" or self.parallelism == "ddp",
                "train.optimizer=muon needs train.parallelism=ddp: Muon orthogonalises whole matrices, "
                "which FSDP shards",
            ),
            (self.log_every >= 1, "train.log_every must be at least 1"),
            (self.keep_checkpoints >= 1, "train.keep_checkpoints must be at least 1"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        if self.min_lr is None:
            self.min_lr = self.lr / 10


def learning_rate(cfg: TrainConfig, step: int) -> float:
    """Learning rate for optimizer step ``step`` (0-based): linear warmup, then cosine or a
    constant phase followed by a linear warmdown, ending at ``min_lr``."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "cosine":
        span = max(1, cfg.max_steps - cfg.warmup_steps)
        progress = min(1.0, (step - cfg.warmup_steps) / span)
        return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * progress))
    warmdown = int(cfg.warmdown_fraction * cfg.max_steps)
    start = cfg.max_steps - warmdown
    if step < start or warmdown == 0:
        return cfg.lr
    return cfg.lr + (cfg.min_lr - cfg.lr) * (step - start + 1) / warmdown


@dataclass
class Runtime:
    """Where and how this process trains: device, precision, and its place among the ranks."""

    device: torch.device
    autocast_dtype: torch.dtype | None
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        """The mean of a tensor over ranks (identity on one process)."""
        if self.distributed:
            value = value.clone()
            dist.all_reduce(value, op=dist.ReduceOp.SUM)
            value /= self.world_size
        return value

    def micro_batching(self, cfg: TrainConfig) -> tuple[int, int]:
        """(micro_batch_size per rank, gradient-accumulation steps) for the global batch."""
        micro = cfg.micro_batch_size or cfg.batch_size // self.world_size
        per_step = micro * self.world_size
        if micro < 1 or cfg.batch_size % per_step:
            raise UserError(
                f"train.batch_size {cfg.batch_size} is not a multiple of micro_batch_size {micro} x "
                f"{self.world_size} ranks; choose a batch size divisible by {per_step}"
            )
        return micro, cfg.batch_size // per_step


def setup_runtime(cfg: TrainConfig) -> Runtime:
    """Pick the device and precision; join the process group when launched by torchrun."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    kind = cfg.device
    if kind == "auto":
        kind = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    if kind == "cuda" and not torch.cuda.is_available():
        raise UserError("train.device=cuda but no CUDA device is visible; use train.device=cpu or auto")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise UserError("train.device=mps but MPS is not available; use train.device=cpu or auto")
    device = torch.device(kind, local_rank) if kind == "cuda" else torch.device(kind)
    if kind == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    dtype = cfg.dtype if cfg.dtype != "auto" else ("bf16" if kind == "cuda" else "fp32")
    runtime = Runtime(device, torch.bfloat16 if dtype == "bf16" else None, rank, local_rank, world_size)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if kind == "cuda" else "gloo", device_id=device if kind == "cuda" else None)
    return runtime


def cleanup_runtime(runtime: Runtime) -> None:
    if runtime.distributed and dist.is_initialized():
        dist.barrier()  # rank 0 may still be writing files; a peer leaving early aborts gloo
        dist.destroy_process_group()


# Dense bf16 tensor-core peaks (FLOP/s) for MFU, from NVIDIA's data sheets; other GPUs report no
# MFU. Matched against the device name in this order, so the PCIe and NVL boards (lower clocks)
# are found before the SXM default of their family.
GPU_PEAK_FLOPS = {
    "H100 PCIe": 756e12, "H100 NVL": 835e12, "H200 NVL": 835e12, "H100": 989e12, "H200": 989e12,
    "A100": 312e12, "L4": 121e12, "4090": 165e12,
}


def peak_flops(device: torch.device) -> float | None:
    """The device's peak matmul throughput: a table for GPUs, a quick measurement on CPU."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return next((v for k, v in GPU_PEAK_FLOPS.items() if k in name), None)
    if device.type == "cpu":
        return measure_matmul_flops()
    return None


def measure_matmul_flops(n: int = 1024, repeats: int = 10) -> float:
    """Best-of-repeats fp32 matmul throughput of this CPU with torch's thread count, after a
    warm-up (a cold thread pool reads low and would inflate MFU)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(3):
        a @ b
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


class ChainedOptimizer:
    """Optimizers stepped as one, for parameters that need different ones (Muon and AdamW); the
    loop sets each group's learning rate through ``param_groups`` as for a single optimizer."""

    def __init__(self, *optimizers: torch.optim.Optimizer):
        self.optimizers = optimizers

    @property
    def param_groups(self) -> list[dict]:
        return [group for optimizer in self.optimizers for group in optimizer.param_groups]

    def step(self) -> None:
        for optimizer in self.optimizers:
            optimizer.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {"chained": [optimizer.state_dict() for optimizer in self.optimizers]}

    def load_state_dict(self, state: dict) -> None:
        if len(state.get("chained", ())) != len(self.optimizers):
            raise ValueError(f"the state is not that of {len(self.optimizers)} chained optimizers")
        for optimizer, own in zip(self.optimizers, state["chained"]):
            optimizer.load_state_dict(own)


def build_optimizer(model: GPT, cfg: TrainConfig, device: torch.device) -> torch.optim.Optimizer | ChainedOptimizer:
    """AdamW with weight decay on matrices only (not on norms, biases or, by nanoGPT's habit,
    embeddings counted as matrices too); fused on CUDA.

    ``train.optimizer=muon`` moves the blocks' weight matrices to torch's Muon (momentum
    orthogonalised by Newton-Schulz), as nanochat and modded-nanogpt train. Its update is scaled
    to AdamW's RMS (Moonshot's rule, ``adjust_lr_fn="match_rms_adamw"``), so ``train.lr`` and
    ``train.weight_decay`` serve both; embeddings, head, norms and biases stay on AdamW.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    on_muon: set[int] = set()
    if cfg.optimizer == "muon":
        if not hasattr(torch.optim, "Muon"):
            raise UserError(f"train.optimizer=muon needs torch>=2.9 (this is {torch.__version__}); use adamw")
        on_muon = {
            id(module.weight) for block in model.blocks for module in block.modules()
            if isinstance(module, torch.nn.Linear) and module.weight.requires_grad
        }
    decay = [p for p in params if p.dim() >= 2 and id(p) not in on_muon]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    adamw = torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=device.type == "cuda")
    if not on_muon:
        return adamw
    muon = torch.optim.Muon(
        [p for p in params if id(p) in on_muon], lr=cfg.lr, weight_decay=cfg.weight_decay,
        adjust_lr_fn="match_rms_adamw",
    )
    return ChainedOptimizer(adamw, muon)


class BatchSource(Protocol):
    def next_batch(self): ...
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...


def list_checkpoints(out_dir: Path) -> list[Path]:
    """Complete checkpoints under out_dir/checkpoints, oldest first (atomic writes mean a folder
    with the final name is complete; temp folders never match the pattern)."""
    folder = out_dir / "checkpoints"
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.is_dir() and CHECKPOINT_PATTERN.match(p.name)]
    return sorted(found, key=lambda p: int(CHECKPOINT_PATTERN.match(p.name).group(1)))


class Trainer:
    """Runs ``cfg.max_steps`` optimizer steps of ``loss_fn`` over ``batches``, writing into out_dir."""

    def __init__(
        self,
        model: GPT,
        cfg: TrainConfig,
        runtime: Runtime,
        out_dir: str | Path,
        loss_fn: Callable[[torch.nn.Module, object], torch.Tensor],
        batches: BatchSource,
        evaluate: Callable[[torch.nn.Module], dict] | None = None,
        tokenizer=None,
    ):
        self.cfg, self.runtime, self.out_dir = cfg, runtime, Path(out_dir)
        self.loss_fn, self.batches, self.evaluate, self.tokenizer = loss_fn, batches, evaluate, tokenizer
        self.micro_batch_size, self.grad_accum = runtime.micro_batching(cfg)
        self.tokens_per_step = cfg.batch_size * cfg.seq_len
        self.model = model.to(runtime.device)
        self.model.activation_checkpointing = cfg.activation_checkpointing
        self.wrapped = self._wrap(self.model)
        self.optimizer = build_optimizer(self.model, cfg, runtime.device)
        self.step = 0
        self.metrics_path = self.out_dir / "metrics.jsonl"

    def _wrap(self, model: GPT) -> torch.nn.Module:
        wrapped: torch.nn.Module = torch.compile(model) if self.cfg.compile else model
        if not self.runtime.distributed:
            return wrapped
        if self.cfg.parallelism == "fsdp":
            from torch.distributed.fsdp import fully_shard

            for block in model.blocks:
                fully_shard(block)
            fully_shard(model)
            return wrapped
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.runtime.local_rank] if self.runtime.device.type == "cuda" else None
        return DistributedDataParallel(wrapped, device_ids=ids)

    @property
    def sharded(self) -> bool:
        return self.runtime.distributed and self.cfg.parallelism == "fsdp"

    # ---- checkpoints -------------------------------------------------------------------------

    def _full_state(self) -> tuple[dict, dict]:
        """(model state, optimizer state) as full, unsharded CPU tensors (collective under FSDP)."""
        if self.sharded:
            from torch.distributed.checkpoint.state_dict import (
                StateDictOptions,
                get_model_state_dict,
                get_optimizer_state_dict,
            )

            options = StateDictOptions(full_state_dict=True, cpu_offload=True)
            return (
                get_model_state_dict(self.model, options=options),
                get_optimizer_state_dict(self.model, self.optimizer, options=options),
            )
        return self.model.state_dict(), self.optimizer.state_dict()

    def save_checkpoint(self) -> None:
        model_state, optim_state = self._full_state()
        if not self.runtime.is_main:
            return
        target = self.out_dir / "checkpoints" / f"step-{self.step:07d}"
        with atomic_folder(target) as folder:
            snapshot = self.model
            if self.sharded:
                with torch.device("meta"):
                    snapshot = GPT(self.model.config)
                snapshot.load_state_dict(model_state, assign=True)
                snapshot.init_rope()
            write_model_files(snapshot, folder, tokenizer=self.tokenizer)
            state_dir = folder / "trainer_state"
            state_dir.mkdir()
            rng = {"torch": torch.get_rng_state()}
            if torch.cuda.is_available():
                rng["cuda"] = torch.cuda.get_rng_state_all()
            torch.save({"optimizer": optim_state, "rng": rng}, state_dir / "state.pt")
            trainer_state = {"step": self.step, "optimizer": self.cfg.optimizer, "batches": self.batches.state_dict()}
            (state_dir / "state.json").write_text(json.dumps(trainer_state, indent=1))
        for old in list_checkpoints(self.out_dir)[: -self.cfg.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)

    def load_checkpoint(self) -> Path | None:
        """Restore the newest checkpoint that loads; a broken one is skipped with a warning.
        None when there is no checkpoint at all; a UserError when none of them loads."""
        found = list_checkpoints(self.out_dir)
        for folder in reversed(found):
            try:
                state = json.loads((folder / "trainer_state" / "state.json").read_text())
                extra = torch.load(folder / "trainer_state" / "state.pt", weights_only=True, map_location="cpu")
                weights = load_pretrained(folder).state_dict()
            except (UserError, OSError, ValueError, RuntimeError, KeyError) as e:
                self._warn(f"checkpoint {folder} cannot be loaded ({str(e).splitlines()[0]}); trying an older one")
                continue
            # Checkpoints from before train.optimizer existed hold AdamW's state.
            saved_with = state.get("optimizer", "adamw")
            if saved_with != self.cfg.optimizer:
                raise UserError(
                    f"checkpoint {folder} holds {saved_with}'s state, but train.optimizer={self.cfg.optimizer}; "
                    f"resume with train.optimizer={saved_with}"
                )
            self._restore(weights, extra["optimizer"])
            torch.set_rng_state(extra["rng"]["torch"])
            if "cuda" in extra["rng"] and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(extra["rng"]["cuda"])
            self.batches.load_state_dict(state["batches"])
            self.step = state["step"]
            return folder
        if found:
            raise UserError(
                f"no checkpoint in {self.out_dir / 'checkpoints'} can be loaded ({len(found)} tried, all broken); "
                "they are left untouched: train afresh into another --out folder"
            )
        return None

    def _restore(self, weights: dict, optim_state: dict) -> None:
        if self.sharded:
            from torch.distributed.checkpoint.state_dict import (
                StateDictOptions,
                set_model_state_dict,
                set_optimizer_state_dict,
            )

            options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=False)
            set_model_state_dict(self.model, weights, options=options)
            set_optimizer_state_dict(self.model, self.optimizer, self._keyed_by_name(optim_state), options=options)
        else:
            self.model.load_state_dict(weights)
            self.optimizer.load_state_dict(optim_state)

    def _keyed_by_name(self, optim_state: dict) -> dict:
        """The optimizer state keyed by parameter name, as FSDP's loader needs. A one-process or DDP
        run saves it keyed by index in the optimizer's parameter order, which ``build_optimizer``
        makes the same in every run of the same model; names pass through."""
        names = {id(p): name for name, p in self.model.named_parameters()}
        order = [names[id(p)] for group in self.optimizer.param_groups for p in group["params"]]

        def key(k):
            return order[k] if isinstance(k, int) else k

        return {
            "state": {key(k): v for k, v in optim_state["state"].items()},
            "param_groups": [{**g, "params": [key(k) for k in g["params"]]} for g in optim_state["param_groups"]],
        }

    # ---- the loop ----------------------------------------------------------------------------

    def _warn(self, message: str) -> None:
        if self.runtime.is_main:
            print(f"gptlab: warning: {message}", file=sys.stderr)

    def _log(self, record: dict) -> None:
        if self.runtime.is_main:
            with self.metrics_path.open("a") as f:
                f.write(json.dumps(record) + "\n")

    def _run_eval(self) -> dict:
        self.model.eval()
        with torch.no_grad(), self.runtime.autocast():
            result = self.evaluate(self.wrapped)
        self.model.train()
        return result

    def _train_step(self) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimizer step over grad_accum micro-batches; returns the loss averaged over ranks
        and the gradient norm before clipping."""
        for group in self.optimizer.param_groups:
            group["lr"] = learning_rate(self.cfg, self.step)
        total = torch.zeros((), device=self.runtime.device)
        ddp = isinstance(self.wrapped, torch.nn.parallel.DistributedDataParallel)
        for micro in range(self.grad_accum):
            batch = self.batches.next_batch()
            # DDP all-reduces gradients on every backward unless told to wait for the last micro-step.
            skip_sync = ddp and micro < self.grad_accum - 1
            with self.wrapped.no_sync() if skip_sync else contextlib.nullcontext():
                with self.runtime.autocast():
                    loss = self.loss_fn(self.wrapped, batch) / self.grad_accum
                loss.backward()
            total += loss.detach()
        total = self.runtime.mean(total)
        # An infinite max_norm measures without clipping: a finite norm scales the gradients by
        # exactly 1, and a non-finite one stops the run below, before any update.
        grad_norm = _whole(torch.nn.utils.clip_grad_norm_(
            self.model.parameters(), self.cfg.grad_clip if self.cfg.grad_clip > 0 else math.inf
        ))
        if not torch.isfinite(total + grad_norm):  # one sync for both
            self.optimizer.zero_grad(set_to_none=True)
            kept = list_checkpoints(self.out_dir)
            what = f"loss became {total.item()}"
            if torch.isfinite(total):
                what = f"gradient norm became {grad_norm.item()}"
            raise UserError(
                f"{what} at step {self.step + 1}; the run stopped and "
                f"{'the last good checkpoint ' + str(kept[-1]) + ' is kept' if kept else 'no checkpoint was written'}"
                "; lower train.lr, raise train.warmup_steps or check the data"
            )
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return total, grad_norm

    def resume(self) -> None:
        """Continue from the newest checkpoint that loads (from step 0 when there is none)."""
        restored = self.load_checkpoint()
        if restored is None:
            self._warn(f"no checkpoint to resume from in {self.out_dir / 'checkpoints'}; starting from step 0")
        else:
            self._warn(f"resumed from {restored} (step {self.step})")

    def fit(self) -> GPT:
        """Train from the current step to cfg.max_steps; returns the model."""
        cfg = self.cfg
        if self.runtime.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        self._truncate_metrics()
        peak = peak_flops(self.runtime.device)
        flops_per_step = self.model.flops_per_token(cfg.seq_len) * self.tokens_per_step
        self.model.train()
        bar = tqdm(
            total=cfg.max_steps, initial=self.step, disable=not self.runtime.is_main, unit="step", dynamic_ncols=True,
            mininterval=0.5 if sys.stderr.isatty() else 30.0,  # a log file gets a line every 30 s, not every step
        )
        window_time, window_steps, window_loss = 0.0, 0, torch.zeros((), device=self.runtime.device)
        try:
            while self.step < cfg.max_steps:
                start = time.perf_counter()
                loss, grad_norm = self._train_step()
                window_loss += loss
                window_time += time.perf_counter() - start
                self.step += 1
                window_steps += 1
                last = self.step == cfg.max_steps
                record = {}
                if self.step % cfg.log_every == 0 or last:
                    record = {
                        "step": self.step,
                        "loss": round(window_loss.item() / window_steps, 6),  # mean since the last log
                        "lr": learning_rate(cfg, self.step - 1),
                        "grad_norm": round(grad_norm.item(), 6),  # the window's last step, before clipping
                        "tokens": self.step * self.tokens_per_step,
                        "tok_per_s": round(window_steps * self.tokens_per_step / window_time, 1),
                        "mfu": round(window_steps * flops_per_step / window_time / (peak * self.runtime.world_size), 4)
                        if peak
                        else None,
                        "peak_mem_mb": round(peak_memory_mb(self.runtime.device), 1),
                    }
                    shown = {"loss": f"{record['loss']:.4f}", "tok_s": f"{record['tok_per_s']:.0f}"}
                    if record["mfu"] is not None:
                        shown["mfu"] = f"{record['mfu']:.1%}"
                    bar.set_postfix(shown)
                    window_time, window_steps, window_loss = 0.0, 0, torch.zeros_like(window_loss)
                if self.evaluate and (cfg.eval_every and self.step % cfg.eval_every == 0 or last):
                    record = {"step": self.step, **record, **self._run_eval()}
                if record:
                    self._log(record)
                if cfg.save_every and self.step % cfg.save_every == 0 or last:
                    self.save_checkpoint()
                bar.update(1)
        finally:
            bar.close()
        return self.model

    def run(self, config: dict, resume: bool = False, overwrite: bool = False, **info) -> GPT:
        """A stage's whole run: run.json (its config and ``info``), training, and the exported
        model in ``out_dir/model``; returns the trained model. ``overwrite`` lets a fresh run
        replace an earlier run's checkpoints and model in ``out_dir``."""
        if resume:  # before run.json is written: a checkpoint that does not fit this config leaves it as it was
            self.resume()
        else:
            self._claim_out_dir(overwrite)
        if self.runtime.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            write_json_atomic(
                self.out_dir / "run.json",
                run_info(config, seed=self.cfg.seed, device=str(self.runtime.device),
                         world_size=self.runtime.world_size, params=self.model.num_params(), **info),
            )
        model = self.fit()
        self.export(self.out_dir / "model")
        return model

    def _claim_out_dir(self, overwrite: bool) -> None:
        """A fresh run may not train over an earlier one: checkpoint rotation would keep the
        earlier run's higher-numbered checkpoints and export its model as this run's. Rank 0
        decides and deletes, so every rank refuses or proceeds together."""
        holds_run = [self.runtime.is_main and bool(list_checkpoints(self.out_dir) or (self.out_dir / "model").exists())]
        if self.runtime.distributed:
            dist.broadcast_object_list(holds_run, src=0)
        if not holds_run[0]:
            return
        earlier = [p for p in (self.out_dir / "checkpoints", self.out_dir / "model") if p.exists()]
        if not overwrite:
            raise UserError(
                f"{self.out_dir} already holds a training run ({', '.join(p.name + '/' for p in earlier)}); "
                "pass --resume to continue it, --overwrite to replace it, or choose another --out"
            )
        if self.runtime.is_main:
            for path in earlier:
                shutil.rmtree(path)
            for card in ("report.md", "loss.png"):  # `gptlab report`'s, of the run being replaced
                (self.out_dir / card).unlink(missing_ok=True)
        if self.runtime.distributed:
            dist.barrier()

    def export(self, path: str | Path) -> None:
        """Publish the final checkpoint's model folder (weights and tokenizer, no trainer state)."""
        if not self.runtime.is_main:
            return
        final = list_checkpoints(self.out_dir)[-1]
        with atomic_folder(Path(path)) as folder:
            for item in final.iterdir():
                if item.is_file():
                    shutil.copy2(item, folder / item.name)

    def _truncate_metrics(self) -> None:
        """Drop records past the current step: a resumed run rewrites what the killed one logged."""
        if not self.runtime.is_main or not self.metrics_path.exists():
            return
        kept = [record for record in read_metrics(self.metrics_path) if record["step"] <= self.step]
        write_text_atomic(self.metrics_path, "".join(json.dumps(record) + "\n" for record in kept))


def _whole(value: torch.Tensor) -> torch.Tensor:
    """A plain tensor: under FSDP the gradient norm is a DTensor."""
    return value.full_tensor() if hasattr(value, "full_tensor") else value
