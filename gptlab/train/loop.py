"""The one training loop. Every stage (pretraining, SFT, reward model, DPO, RL) brings a model, a
batch source and a loss function; the loop owns everything else: device and precision, DDP/FSDP2
under ``torchrun``, gradient accumulation, clipping, the learning-rate schedule, AdamW, periodic
evaluation, checkpoints (``gptlab.train.checkpoints``), exact resume, the NaN guard,
``metrics.jsonl`` and the progress bar.

The model and the batch source answer the protocols of ``gptlab.train.protocols``.
``loss_fn(model, batch)`` returns the mean loss of a micro-batch, or ``(loss, metrics)`` with
``metrics`` a dict of scalar tensors (TRL's names, such as ``rewards/margins``): the loop averages
each over micro-steps, ranks and the log window, as it does the loss, and logs it beside ``loss``.
"""

from __future__ import annotations

import contextlib
import math
import os
import resource
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from gptlab.errors import UserError
from gptlab.runs import RunFolder
from gptlab.train.checkpoints import Checkpoints, export_model
from gptlab.train.mfu import peak_flops
from gptlab.train.protocols import BatchSource, Trainable

LossFn = Callable[[torch.nn.Module, object], "torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]"]
# What the loop itself logs; a stage's metrics take other names. ``mfu``: the model's training FLOPs
# per second over the device's peak (``gptlab.train.mfu``), clamped to 1: more means only that the
# peak was measured low; None where the peak is unknown.
LOOP_METRICS = ("step", "loss", "lr", "grad_norm", "tokens", "tok_per_s", "mfu", "peak_mem_mb")


# The most sequences in a batch, or tokens in a sequence: beyond any real run (GPT-3's batch was 1,600
# sequences); a larger number only exhausts memory, or numpy's index range, deep in the loader.
MAX_SIZE = 2**20


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
        if self.min_lr is None:
            self.min_lr = self.lr / 10
        checks = [
            (self.max_steps >= 1, f"train.max_steps must be at least 1, got {self.max_steps}"),
            (
                1 <= self.batch_size <= MAX_SIZE,
                f"train.batch_size must be in [1, 2**20] sequences, got {self.batch_size}",
            ),
            (
                self.micro_batch_size is None or 1 <= self.micro_batch_size <= MAX_SIZE,
                f"train.micro_batch_size must be in [1, 2**20] sequences (or none), got {self.micro_batch_size}",
            ),
            (1 <= self.seq_len <= MAX_SIZE, f"train.seq_len must be in [1, 2**20] tokens, got {self.seq_len}"),
            (0 < self.lr < math.inf, f"train.lr must be a positive finite number, got {self.lr}"),
            (
                0 <= self.min_lr <= self.lr,
                f"train.min_lr must be in [0, train.lr = {self.lr:g}] (the rate decays to it), got {self.min_lr}",
            ),
            (self.warmup_steps >= 0, f"train.warmup_steps must be >= 0, got {self.warmup_steps}"),
            (self.schedule in ("cosine", "linear"), "train.schedule must be 'cosine' or 'linear'"),
            (
                0 <= self.warmdown_fraction <= 1,
                f"train.warmdown_fraction must be in [0, 1], got {self.warmdown_fraction}",
            ),
            (0 <= self.weight_decay < math.inf, f"train.weight_decay must be finite and >= 0, got {self.weight_decay}"),
            (0 <= self.beta1 < 1, f"train.beta1 must be in [0, 1), got {self.beta1}"),
            (0 <= self.beta2 < 1, f"train.beta2 must be in [0, 1), got {self.beta2}"),
            (
                0 <= self.grad_clip < math.inf,
                f"train.grad_clip must be finite and >= 0 (0 turns clipping off), got {self.grad_clip}",
            ),
            (self.eval_every >= 0, f"train.eval_every must be >= 0 (0: only the final step), got {self.eval_every}"),
            (self.eval_batches >= 0, f"train.eval_batches must be >= 0, got {self.eval_batches}"),
            (self.log_every >= 1, f"train.log_every must be at least 1, got {self.log_every}"),
            (self.save_every >= 0, f"train.save_every must be >= 0 (0: only at the end), got {self.save_every}"),
            (self.keep_checkpoints >= 1, f"train.keep_checkpoints must be at least 1, got {self.keep_checkpoints}"),
            (0 <= self.seed < 2**63, f"train.seed must be in [0, 2**63), got {self.seed}"),
            (self.device in ("auto", "cpu", "cuda", "mps"), "train.device must be auto, cpu, cuda or mps"),
            (self.dtype in ("auto", "fp32", "bf16"), "train.dtype must be auto, fp32 or bf16"),
            (self.parallelism in ("ddp", "fsdp"), "train.parallelism must be ddp or fsdp"),
            (self.optimizer in ("adamw", "muon"), "train.optimizer must be adamw or muon"),
            (
                self.optimizer == "adamw" or self.parallelism == "ddp",
                "train.optimizer=muon needs train.parallelism=ddp: Muon orthogonalises whole matrices, "
                "which FSDP shards",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)


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


def build_optimizer(
    model: Trainable, cfg: TrainConfig, device: torch.device
) -> torch.optim.Optimizer | ChainedOptimizer:
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
        on_muon = {id(p) for p in model.matrix_parameters()}
    decay = [p for p in params if p.dim() >= 2 and id(p) not in on_muon]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    adamw = torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=device.type == "cuda")
    if not on_muon:
        return adamw
    muon = torch.optim.Muon(
        [p for p in params if id(p) in on_muon],
        lr=cfg.lr,
        weight_decay=cfg.weight_decay,
        adjust_lr_fn="match_rms_adamw",
    )
    return ChainedOptimizer(adamw, muon)


class Trainer:
    """Runs ``cfg.max_steps`` optimizer steps of ``loss_fn`` over ``batches``, writing into the run
    folder ``out_dir``. ``progress_metrics``: the stage's metrics the progress bar shows."""

    def __init__(
        self,
        model: Trainable,
        cfg: TrainConfig,
        runtime: Runtime,
        out_dir: str | Path,
        loss_fn: LossFn,
        batches: BatchSource,
        evaluate: Callable[[torch.nn.Module], dict] | None = None,
        tokenizer=None,
        progress_metrics: tuple[str, ...] = (),
    ):
        self.cfg, self.runtime, self.run_folder = cfg, runtime, RunFolder(out_dir)
        self.loss_fn, self.batches, self.evaluate = loss_fn, batches, evaluate
        self.progress_metrics = progress_metrics
        self.micro_batch_size, self.grad_accum = runtime.micro_batching(cfg)
        self.tokens_per_step = cfg.batch_size * cfg.seq_len
        self.model = model.to(runtime.device)
        self.model.activation_checkpointing = cfg.activation_checkpointing
        self.ddp: torch.nn.parallel.DistributedDataParallel | None = None  # set by _wrap under DDP
        self.wrapped = self._wrap(self.model)
        self.optimizer = build_optimizer(self.model, cfg, runtime.device)
        self.checkpoints = Checkpoints(
            self.run_folder,
            self.model,
            self.optimizer,
            batches,
            optimizer_kind=cfg.optimizer,
            keep=cfg.keep_checkpoints,
            sharded=self.sharded,
            is_main=runtime.is_main,
            warn=self._warn,
            tokenizer=tokenizer,
        )
        self.step = 0
        self.resumed_from: Path | None = None
        self.updated = False  # whether this process has stepped the optimizer yet
        self.pending: _PendingCheck | None = None  # a step whose update was queued before it was checked

    def _wrap(self, model: Trainable) -> torch.nn.Module:
        """The module the steps call: compiled as PyTorch advises for each kind of run. Under DDP the
        wrapped model is compiled, so that its gradient buckets split the graph and their all-reduces
        overlap the backward; under FSDP2 each block is compiled in place, its all-gathers staying
        outside the graphs, with bf16 parameters and fp32 gradient reductions in a bf16 run."""
        if not self.runtime.distributed:
            return torch.compile(model) if self.cfg.compile else model
        if self.cfg.parallelism == "fsdp":
            from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

            policy = MixedPrecisionPolicy()
            if self.runtime.autocast_dtype == torch.bfloat16:
                policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
            for unit in model.shard_units():
                fully_shard(unit, mp_policy=policy)
                if self.cfg.compile:
                    unit.compile()
            fully_shard(model, mp_policy=policy)
            return model
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.runtime.local_rank] if self.runtime.device.type == "cuda" else None
        self.ddp = DistributedDataParallel(model, device_ids=ids)
        return torch.compile(self.ddp) if self.cfg.compile else self.ddp

    @property
    def sharded(self) -> bool:
        return self.runtime.distributed and self.cfg.parallelism == "fsdp"

    def save_checkpoint(self) -> None:
        self.checkpoints.save(self.step)

    def resume(self) -> None:
        """Continue from the newest checkpoint that loads; a UserError when there is none."""
        self.resumed_from, self.step = self.checkpoints.restore()
        self._warn(f"resumed from {self.resumed_from} (step {self.step})")

    # ---- the loop ----------------------------------------------------------------------------

    def _warn(self, message: str) -> None:
        if self.runtime.is_main:
            print(f"gptlab: warning: {message}", file=sys.stderr)

    def _log(self, record: dict) -> None:
        if self.runtime.is_main:
            self.run_folder.append_metrics(record)

    def _run_eval(self) -> dict:
        self.model.eval()
        with torch.no_grad(), self.runtime.autocast():
            result = self.evaluate(self.wrapped)
        self.model.train()
        return result

    def _train_step(self) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
        """One optimizer step over grad_accum micro-batches; returns the loss and the stage's
        metrics, each averaged over micro-steps and ranks, and the gradient norm before clipping."""
        for group in self.optimizer.param_groups:
            group["lr"] = learning_rate(self.cfg, self.step)
        total = torch.zeros((), device=self.runtime.device)
        stage: dict[str, torch.Tensor] = {}
        for micro in range(self.grad_accum):
            batch = self.batches.next_batch()
            # DDP all-reduces gradients on every backward unless told to wait for the last micro-step.
            skip_sync = self.ddp is not None and micro < self.grad_accum - 1
            with self.ddp.no_sync() if skip_sync else contextlib.nullcontext():
                with self.runtime.autocast():
                    loss, metrics = _loss_and_metrics(self.loss_fn(self.wrapped, batch))
                    loss = loss / self.grad_accum
                loss.backward()
            if micro == 0:  # this step's first batch and backward are queued: the device stays busy while we wait
                self._check_pending()
            total += loss.detach()
            for name, value in metrics.items():
                stage[name] = stage.get(name, 0.0) + value.detach().float() / self.grad_accum
        # One all-reduce for the loss and every stage metric.
        averaged = self.runtime.mean(torch.stack([total, *stage.values()]))
        total, stage = averaged[0], dict(zip(stage, averaged[1:]))
        # An infinite max_norm measures without clipping: a finite norm scales the gradients by
        # exactly 1, and a non-finite one stops the run, before any update.
        grad_norm = _whole(
            torch.nn.utils.clip_grad_norm_(
                self.model.parameters(), self.cfg.grad_clip if self.cfg.grad_clip > 0 else math.inf
            )
        )
        if self._skips_non_finite_on_device:
            self._queue_update(total, grad_norm)
        else:
            if not torch.isfinite(total + grad_norm):  # one sync for both
                self._stop_on_non_finite(self.step + 1, total, grad_norm, not self.updated)
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.updated = True
        return total, stage, grad_norm

    @property
    def _skips_non_finite_on_device(self) -> bool:
        """Whether the optimizer can leave a non-finite step out on the device, so that the host need not
        wait for the check before queuing the update: a fused AdamW (the default on CUDA) reads
        ``found_inf`` as it does under GradScaler. Not under FSDP: the flag is no DTensor as its shards are."""
        fused = isinstance(self.optimizer, torch.optim.AdamW) and self.optimizer.defaults.get("fused")
        return bool(fused) and not self.sharded

    def _queue_update(self, total: torch.Tensor, grad_norm: torch.Tensor) -> None:
        """Queue the optimizer step, left out on the device when the loss or the gradient norm is not
        finite, and the host's copy of that verdict, which ``_check_pending`` reads a step later."""
        finite = torch.isfinite(total + grad_norm)
        self.optimizer.found_inf = (~finite).float()
        try:
            self.optimizer.step()
        finally:
            del self.optimizer.found_inf
        ready = None
        if finite.device.type == "cuda":
            finite = finite.to("cpu", non_blocking=True)
            ready = torch.cuda.Event()
            ready.record()
        self.pending = _PendingCheck(self.step + 1, total, grad_norm, finite, ready, not self.updated)

    def _check_pending(self) -> None:
        """Stop the run if the step whose update was queued unchecked had a non-finite loss or gradient
        norm (its update was left out). Waits only for that step's verdict, not for later work."""
        pending, self.pending = self.pending, None
        if pending is None:
            return
        if pending.ready is not None:
            pending.ready.synchronize()
        if not bool(pending.finite):
            self._stop_on_non_finite(pending.step, pending.total, pending.grad_norm, pending.before_first_update)

    def _stop_on_non_finite(
        self, step: int, total: torch.Tensor, grad_norm: torch.Tensor, before_first_update: bool
    ) -> None:
        """Stop with one line. Before this process's first update the learning rate has had no say:
        the weights it started from (a damaged checkpoint, a broken init) or the data are at fault."""
        self.optimizer.zero_grad(set_to_none=True)
        what = f"loss became {total.item()}"
        if torch.isfinite(total):
            what = f"gradient norm became {grad_norm.item()}"
        if before_first_update:
            start, fix = "the starting weights", "check the init model and the data"
            if self.resumed_from:
                start = f"the weights resumed from {self.resumed_from}"
                fix = f"move {self.resumed_from} aside to resume from an older checkpoint, or check the data"
            raise UserError(
                f"{what} at step {step}, before this run's first update, so not through the learning "
                f"rate: {start} or the data are broken; the run stopped and its checkpoints are as they were: {fix}"
            )
        kept = self.run_folder.checkpoints()
        raise UserError(
            f"{what} at step {step}; the run stopped and "
            f"{'its newest checkpoint ' + str(kept[-1]) + ' is kept' if kept else 'no checkpoint was written'}"
            "; lower train.lr, raise train.warmup_steps or check the data"
        )

    def fit(self) -> Trainable:
        """Train from the current step to cfg.max_steps; returns the model."""
        cfg = self.cfg
        if self.runtime.is_main:
            self.run_folder.path.mkdir(parents=True, exist_ok=True)
            self.run_folder.keep_metrics_until(self.step)
        window = _LogWindow(
            self.model.flops_per_token(cfg.seq_len) * self.tokens_per_step,
            self.tokens_per_step,
            peak_flops(self.runtime.device),
            self.runtime,
        )
        if cfg.warmup_steps > cfg.max_steps:
            self._warn(
                f"train.warmup_steps {cfg.warmup_steps} > train.max_steps {cfg.max_steps}: the run ends before its "
                "learning rate reaches train.lr"
            )
        self.model.train()
        bar = tqdm(
            total=cfg.max_steps,
            initial=self.step,
            disable=not self.runtime.is_main,
            unit="step",
            dynamic_ncols=True,
            mininterval=0.5 if sys.stderr.isatty() else 30.0,  # a log file gets a line every 30 s, not every step
        )
        try:
            while self.step < cfg.max_steps:
                start = time.perf_counter()
                loss, stage, grad_norm = self._train_step()
                window.add(loss, stage, time.perf_counter() - start)
                self.step += 1
                last = self.step == cfg.max_steps
                logs = self.step % cfg.log_every == 0 or last
                evaluates = self.evaluate and (cfg.eval_every and self.step % cfg.eval_every == 0 or last)
                saves = cfg.save_every and self.step % cfg.save_every == 0 or last
                if logs or evaluates or saves:
                    self._check_pending()  # nothing of a step is logged or kept before it is known to be finite
                record = {}
                if logs:
                    record = window.close(self.step, learning_rate(cfg, self.step - 1), grad_norm)
                    bar.set_postfix(window.shown(record, self.progress_metrics))
                if evaluates:
                    record = {"step": self.step, **record, **self._run_eval()}
                if record:
                    self._log(record)
                if saves:
                    self.save_checkpoint()
                bar.update(1)
        finally:
            bar.close()
        return self.model

    def run(self, kind: str, config: dict, resume: bool = False, overwrite: bool = False, **info) -> Trainable:
        """A stage's whole run: run.json (its kind, config and ``info``), training, and the exported
        model in ``out_dir/model``; returns the trained model. ``overwrite`` lets a fresh run
        replace an earlier run's checkpoints and model in ``out_dir``."""
        if resume:  # before run.json is written: a checkpoint that does not fit this config leaves it as it was
            self.resume()
        else:
            self._claim_out_dir(overwrite)
        if self.runtime.is_main:
            self.run_folder.write_record(
                kind,
                config,
                seed=self.cfg.seed,
                device=str(self.runtime.device),
                world_size=self.runtime.world_size,
                params=self.model.num_params(),
                **info,
            )
        model = self.fit()
        if self.runtime.is_main:
            export_model(self.run_folder)
        return model

    def _claim_out_dir(self, overwrite: bool) -> None:
        """A fresh run may not train over an earlier one: checkpoint rotation would keep the
        earlier run's higher-numbered checkpoints and export its model as this run's. Rank 0
        decides and deletes, so every rank refuses or proceeds together."""
        run = self.run_folder
        holds_run = [self.runtime.is_main and run.holds_training()]
        if self.runtime.distributed:
            dist.broadcast_object_list(holds_run, src=0)
        if not holds_run[0]:
            return
        earlier = [p for p in (run.checkpoints_dir, run.model_dir) if p.exists()]
        if not overwrite:
            raise UserError(
                f"{run.path} already holds a training run ({', '.join(p.name + '/' for p in earlier)}); "
                "pass --resume to continue it, --overwrite to replace it, or choose another --out"
            )
        if self.runtime.is_main:
            for path in earlier:
                shutil.rmtree(path)
            for card in (run.report_path, run.path / "loss.png"):  # `gptlab report`'s, of the run being replaced
                card.unlink(missing_ok=True)
        if self.runtime.distributed:
            dist.barrier()


@dataclass
class _PendingCheck:
    """A step whose update was queued before its loss and gradient norm were known to be finite."""

    step: int  # counted from 1, as the messages name steps
    total: torch.Tensor
    grad_norm: torch.Tensor
    finite: torch.Tensor  # on the host, once ``ready`` has passed
    ready: torch.cuda.Event | None
    before_first_update: bool


class _LogWindow:
    """The steps since the last log: their mean loss and stage metrics, and their speed."""

    def __init__(self, flops_per_step: float, tokens_per_step: int, peak: float | None, runtime: Runtime):
        self.flops_per_step, self.tokens_per_step, self.peak, self.runtime = (
            flops_per_step,
            tokens_per_step,
            peak,
            runtime,
        )
        self._reset()

    def _reset(self) -> None:
        self.seconds, self.steps = 0.0, 0
        self.loss = torch.zeros((), device=self.runtime.device)
        self.stage: dict[str, torch.Tensor] = {}

    def add(self, loss: torch.Tensor, stage: dict[str, torch.Tensor], seconds: float) -> None:
        self.loss += loss
        for name, value in stage.items():
            self.stage[name] = self.stage.get(name, 0.0) + value
        self.seconds += seconds
        self.steps += 1

    def close(self, step: int, lr: float, grad_norm: torch.Tensor) -> dict:
        """The record of the window ending at ``step``; the window starts afresh."""
        start = time.perf_counter()
        means = [total / self.steps for total in torch.stack([self.loss, *self.stage.values()]).tolist()]  # one sync
        self.seconds += time.perf_counter() - start  # the device's work still queued for the window's steps
        record = {
            "step": step,
            "loss": round(means[0], 6),
            **{name: round(value, 6) for name, value in zip(self.stage, means[1:])},
            "lr": lr,
            "grad_norm": round(grad_norm.item(), 6),  # the window's last step, before clipping
            "tokens": step * self.tokens_per_step,
            "tok_per_s": round(self.steps * self.tokens_per_step / self.seconds, 1),
            "mfu": self._mfu(),
            "peak_mem_mb": round(peak_memory_mb(self.runtime.device), 1),
        }
        self._reset()
        return record

    def _mfu(self) -> float | None:
        if not self.peak:
            return None
        utilisation = self.steps * self.flops_per_step / self.seconds / (self.peak * self.runtime.world_size)
        return round(min(1.0, utilisation), 4)

    @staticmethod
    def shown(record: dict, stage_metrics: tuple[str, ...]) -> dict:
        """What the progress bar shows of a record: loss, the stage's chosen metrics, speed, MFU."""
        shown = {"loss": f"{record['loss']:.4f}"}
        shown.update({name: f"{record[name]:.4g}" for name in stage_metrics if name in record})
        shown["tok_s"] = f"{record['tok_per_s']:.0f}"
        if record["mfu"] is not None:
            shown["mfu"] = f"{record['mfu']:.1%}"
        return shown


def _loss_and_metrics(output) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """A loss function's output as (loss, metrics): it may return the loss alone."""
    if not isinstance(output, tuple):
        return output, {}
    loss, metrics = output
    clash = [name for name in metrics if name in LOOP_METRICS]
    if clash:
        raise ValueError(f"a stage metric may not be named like the loop's own: {', '.join(clash)}")
    return loss, metrics


def _whole(value: torch.Tensor) -> torch.Tensor:
    """A plain tensor: under FSDP the gradient norm is a DTensor."""
    return value.full_tensor() if hasattr(value, "full_tensor") else value
