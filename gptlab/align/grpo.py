"""Group Relative Policy Optimization (DeepSeekMath, Shao et al. 2024) with TRL GRPOTrainer's
options, defaults and metric names.

For each prompt the policy samples a group of ``num_generations`` (G) answers; each answer's reward
is the weighted sum of the reward functions (``gptlab.align.reward_functions``) and its advantage
compares it with its group: ``A_i = (r_i - mean(r_group)) / (std(r_group) + 1e-4)`` (``scale_rewards``
"group"; "batch" divides by the batch's std, "none" does not divide, as Dr. GRPO advises). No value
model: every token of an answer gets its answer's advantage. The loss per token is PPO's clipped
surrogate

    l_t = -min(ρ_t A, clip(ρ_t, 1 - ε, 1 + ε_high) A) + β · k3_t,   ρ_t = π(o_t) / π_old(o_t)

with ``k3_t = π_ref/π - log(π_ref/π) - 1``, the KL estimate that is never negative (only when
``beta`` > 0; then a frozen reference is held), aggregated over tokens as ``loss_type`` says
(``gptlab.align.rl.aggregate_token_losses``). Log-probs are of the logits divided by the sampling
temperature. ``π_old`` is the policy that sampled: the engine's log-probs at temperature 1, else one
forward pass of the policy before the rollout's first update. Each rollout is trained on for
``num_iterations`` passes of ``steps_per_generation`` optimizer steps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from gptlab.align.reward_functions import RewardFunction, load_reward_functions
from gptlab.align.rl import (
    GRPO_LOSS_TYPES,
    SCALE_REWARDS,
    aggregate_token_losses,
    clipped_policy_loss,
    entropy_from_logits,
    group_advantages,
    kl_estimate,
    masked_mean,
)
from gptlab.align.rollouts import (
    FrozenPolicy,
    Prompt,
    PromptDataConfig,
    RolloutBatches,
    RolloutSampling,
    check_rollout_shape,
    check_sampling,
    check_whole_rollouts,
    completion_texts,
    forward_inputs,
    load_frozen,
    load_policy,
    load_prompts,
    policy_logprobs,
    refuse_fsdp,
    response_logits,
    response_logprobs,
    rollout_seed,
    sample_rollout,
    stop_ids_of,
)
from gptlab.align.sft import load_stage_config
from gptlab.config import to_dict
from gptlab.engine import Engine
from gptlab.model import GPT
from gptlab.train.loop import Runtime, TrainConfig, Trainer, cleanup_runtime, setup_runtime


@dataclass
class GrpoTrainConfig(TrainConfig):
    """The training loop's config with GRPO defaults. ``batch_size`` counts answers (completions)
    per optimizer step, ``num_generations`` of them per prompt. TRL's 1e-6 suits billion-parameter
    models; TinyWorld's million-parameter ones need far more to move in a few hundred steps."""

    max_steps: int = 200
    batch_size: int = 64
    lr: float = 1e-4
    warmup_steps: int = 0
    schedule: str = "linear"
    weight_decay: float = 0.0
    eval_every: int = 0
    save_every: int = 100


@dataclass
class GrpoConfig:
    init: str = "runs/sft/model"  # the policy's start: a model folder with its tokenizer
    ref: str | None = None  # the reference for the KL term (beta > 0); None: init
    reward: list[str] = field(default_factory=lambda: ["arith"])  # arith | oracle | a reward-model folder | f.py:name
    reward_weights: list[float] | None = None  # one per reward; None: all 1
    world: str | None = None  # the TinyWorld folder the 'oracle' reward judges with
    num_generations: int = 8  # G: answers per prompt
    max_new_tokens: int = 64  # TRL's max_completion_length
    temperature: float = 1.0
    top_p: float = 1.0
    beta: float = 0.0  # the KL coefficient; 0: no reference is held
    epsilon: float = 0.2  # clip range ε
    epsilon_high: float | None = None  # upper clip range; None: epsilon (DAPO advises 0.28)
    loss_type: str = "dapo"  # grpo | bnpo | dr_grpo | dapo
    scale_rewards: str = "group"  # group | batch | none
    num_iterations: int = 1  # μ: passes over each rollout
    steps_per_generation: int = 1  # optimizer steps each pass over a rollout takes
    mask_truncated_completions: bool = False  # answers that never ended take no part in the loss
    data: PromptDataConfig = field(default_factory=PromptDataConfig)
    train: GrpoTrainConfig = field(default_factory=GrpoTrainConfig)

    def __post_init__(self):
        if self.num_generations < 2:
            raise ValueError(
                f"num_generations must be at least 2, got {self.num_generations}: GRPO compares each answer with "
                "the others to the same prompt"
            )
        if not self.reward:
            raise ValueError("reward names no reward function; e.g. reward=arith")
        if self.reward_weights is not None and len(self.reward_weights) != len(self.reward):
            raise ValueError(f"reward_weights has {len(self.reward_weights)} weights for {len(self.reward)} rewards")
        if self.reward_weights is not None and not all(map(math.isfinite, self.reward_weights)):
            # a NaN weight would silently drop its reward from the sum (nansum), an infinite one make advantages NaN
            raise ValueError(f"reward_weights must be finite numbers, got {self.reward_weights}")
        check_sampling(self.max_new_tokens, self.temperature, self.top_p)
        checks = [
            (self.loss_type in GRPO_LOSS_TYPES, f"loss_type must be one of {', '.join(GRPO_LOSS_TYPES)}"),
            (self.scale_rewards in SCALE_REWARDS, f"scale_rewards must be one of {', '.join(SCALE_REWARDS)}"),
            (0 <= self.beta < math.inf, f"beta must be finite and >= 0, got {self.beta}"),
            (0 < self.epsilon < 1, f"epsilon must be in (0, 1), got {self.epsilon}"),
            (self.epsilon_high is None or self.epsilon_high > 0, "epsilon_high must be > 0"),
            (self.num_iterations >= 1, f"num_iterations must be >= 1, got {self.num_iterations}"),
            (self.steps_per_generation >= 1, f"steps_per_generation must be >= 1, got {self.steps_per_generation}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        check_whole_rollouts(
            self.train.max_steps,
            self.train.save_every,
            self.num_iterations * self.steps_per_generation,
            "num_iterations x steps_per_generation",
        )

    @property
    def reference(self) -> str:
        return self.ref if self.ref is not None else self.init

    @property
    def sampling(self) -> RolloutSampling:
        return RolloutSampling(self.max_new_tokens, self.temperature, self.top_p if self.top_p < 1 else None)


def load_config(config_path: str | None, overrides: list[str], out_dir: Path, resume: bool) -> GrpoConfig:
    """Resolve the config as SFT does (``load_stage_config``)."""
    return load_stage_config(GrpoConfig, config_path, overrides, out_dir, resume)


# ----------------------------------------------------------------------------- the loss


def grpo_objective(cfg: GrpoConfig, logits: torch.Tensor, batch: dict) -> tuple[torch.Tensor, dict]:
    """(loss, metrics) of a micro-batch, from the logits that predict its answer tokens (B, L, V),
    already divided by the temperature (``rollouts.response_logits``)."""
    mask = batch["response_mask"]
    logprobs = response_logprobs(logits, batch)
    losses, ratio, _ = clipped_policy_loss(
        logprobs, batch["old_logprobs"], batch["advantages"][:, None], cfg.epsilon, cfg.epsilon_high
    )
    metrics = {}
    if cfg.beta > 0:
        kl = kl_estimate(logprobs, batch["ref_logprobs"], "k3")
        losses = losses + cfg.beta * kl
        metrics["kl"] = masked_mean(kl.detach(), mask)
    loss = aggregate_token_losses(losses, mask, cfg.loss_type, cfg.max_new_tokens, batch["tokens_share"])
    advantages = batch["advantages"][:, None]
    high = 1 + (cfg.epsilon if cfg.epsilon_high is None else cfg.epsilon_high)
    low_clipped = (ratio < 1 - cfg.epsilon) & (advantages < 0)
    high_clipped = (ratio > high) & (advantages > 0)
    metrics["entropy"] = masked_mean(entropy_from_logits(logits.detach()), mask)
    metrics["clip_ratio/low_mean"] = masked_mean(low_clipped.float(), mask)
    metrics["clip_ratio/high_mean"] = masked_mean(high_clipped.float(), mask)
    metrics["clip_ratio/region_mean"] = masked_mean((low_clipped | high_clipped).float(), mask)
    return loss, metrics


def grpo_loss(cfg: GrpoConfig):
    """The training loop's loss function: (loss, this micro-batch's and its rollout's metrics)."""

    def loss_fn(model: torch.nn.Module, batch: dict):
        positions, mask = forward_inputs(batch)
        logits = response_logits(
            model(batch["input_ids"], position_ids=positions, attn_mask=mask), batch, cfg.temperature
        )
        loss, metrics = grpo_objective(cfg, logits, batch)
        return loss, {**batch["metrics"], **metrics}

    return loss_fn


# ----------------------------------------------------------------------------- rollouts


def score_rollout(functions: list[RewardFunction], prompts: list[Prompt], completions: list, ids: list) -> torch.Tensor:
    """(N, F): each reward function's value of each completion (NaN where it does not apply)."""
    keys = sorted({key for prompt in prompts for key in prompt.columns})
    columns = {key: [prompt.columns.get(key) for prompt in prompts] for key in keys}
    columns["completion_ids"] = ids
    prompt_values = [prompt.prompt for prompt in prompts]
    return torch.tensor([f(prompt_values, completions, columns) for f in functions], dtype=torch.float32).T


def rollout_metrics(cfg: GrpoConfig, functions, per_function, rewards, lengths, ended) -> dict[str, float]:
    """TRL's rollout metrics: the reward and its spread within groups, each function's mean and
    std, the answers' lengths and the share that never ended (cut at max_new_tokens)."""
    grouped = rewards.view(-1, cfg.num_generations)
    metrics = {"reward": rewards.mean().item(), "reward_std": grouped.std(dim=1).mean().item()}
    for i, function in enumerate(functions):
        values = per_function[:, i]
        applies = values[~values.isnan()]
        metrics[f"rewards/{function.name}/mean"] = applies.mean().item() if applies.numel() else math.nan
        metrics[f"rewards/{function.name}/std"] = applies.std().item() if applies.numel() > 1 else math.nan
    lengths = lengths.float()
    metrics.update(
        {
            "completions/mean_length": lengths.mean().item(),
            "completions/min_length": lengths.min().item(),
            "completions/max_length": lengths.max().item(),
            "completions/clipped_ratio": 1 - ended.float().mean().item(),
            "frac_reward_zero_std": (grouped.std(dim=1) == 0).float().mean().item(),
        }
    )
    return metrics


def grpo_collector(cfg, engine, tokenizer, functions, reference, runtime: Runtime):
    """``collect(prompts, rollout index)`` for ``RolloutBatches``: sample G answers per prompt with the
    current weights, score them, and compute the group advantages."""
    stop_ids = stop_ids_of(tokenizer)
    weights = torch.tensor(cfg.reward_weights or [1.0] * len(functions))

    def collect(prompts: list[Prompt], index: int) -> dict:
        seed = rollout_seed(cfg.train.seed, index, runtime.rank)
        with torch.no_grad(), runtime.autocast():
            rollout = sample_rollout(engine, prompts, cfg.num_generations, cfg.sampling, seed, stop_ids)
            batch = rollout.batch()
            old = rollout.logprobs if cfg.temperature == 1 else policy_logprobs(engine.model, batch, cfg.temperature)
            ref = reference.logprobs(batch, cfg.temperature) if reference is not None else None
        texts = completion_texts(tokenizer, rollout, stop_ids)
        completions = [
            [{"role": "assistant", "content": t}] if p.conversational else t for p, t in zip(rollout.prompts, texts)
        ]
        per_function = score_rollout(functions, rollout.prompts, completions, rollout.responses)
        rewards = (per_function * weights).nansum(dim=1)
        advantages = group_advantages(rewards, cfg.num_generations, cfg.scale_rewards)
        lengths = torch.tensor([len(r) for r in rollout.responses])
        metrics = rollout_metrics(cfg, functions, per_function, rewards, lengths, rollout.ended.cpu())
        mask = batch["response_mask"]
        if cfg.mask_truncated_completions:
            mask = mask * rollout.ended[:, None]
        rows = {
            "input_ids": batch["input_ids"],
            "attention_mask": batch["attention_mask"],
            "response_mask": mask,
            "old_logprobs": old.float(),
            "advantages": advantages.to(mask.device),
        }
        if ref is not None:
            rows["ref_logprobs"] = ref.float()
        return {"rows": rows, "prompt_width": rollout.prompt_width, "metrics": metrics}

    return collect


# ----------------------------------------------------------------------------- the stage


def grpo(cfg: GrpoConfig, out_dir: str | Path, resume: bool = False, overwrite: bool = False) -> GPT:
    """Train ``cfg.init`` with GRPO on the prompts of ``cfg.data`` into ``out_dir`` (run.json,
    metrics.jsonl, checkpoints/, model/); returns the trained model."""
    out_dir = Path(out_dir)
    tcfg = cfg.train
    refuse_fsdp(tcfg.parallelism, "grpo")
    model, tokenizer, prompt_tokens = load_policy(
        cfg.init, tcfg.seq_len, cfg.max_new_tokens, cfg.data.max_prompt_length
    )
    reference = FrozenPolicy(load_frozen(cfg.reference, "reference", tokenizer)) if cfg.beta > 0 else None
    runtime = setup_runtime(tcfg)
    try:
        micro, _ = runtime.micro_batching(tcfg)
        prompts_per_rollout = check_rollout_shape(
            tcfg.batch_size, runtime.world_size, cfg.steps_per_generation, cfg.num_generations
        )
        functions = load_reward_functions(cfg.reward, cfg.world, runtime.device)
        prompts, stats = load_prompts(
            cfg.data.prompts, tokenizer, prompt_tokens, cfg.data.families, warn=runtime.is_main
        )
        model.to(runtime.device)
        if reference is not None:
            reference.model.to(runtime.device)
        collect = grpo_collector(cfg, Engine(model, tokenizer), tokenizer, functions, reference, runtime)
        batches = RolloutBatches(
            prompts,
            collect,
            prompts_per_rollout=prompts_per_rollout,
            rows_per_step=tcfg.batch_size,
            micro_batch_size=micro,
            minibatches=cfg.steps_per_generation,
            epochs=cfg.num_iterations,
            seed=tcfg.seed,
            runtime=runtime,
        )
        torch.manual_seed(tcfg.seed)
        trainer = Trainer(
            model,
            tcfg,
            runtime,
            out_dir,
            grpo_loss(cfg),
            batches,
            tokenizer=tokenizer,
            progress_metrics=("reward", "completions/mean_length"),
        )
        return trainer.run("grpo", to_dict(cfg), resume, overwrite, data={"prompts": stats.to_dict()})
    finally:
        cleanup_runtime(runtime)
