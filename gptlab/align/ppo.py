"""RLHF with PPO (InstructGPT, Ouyang et al. 2022), with TRL PPOTrainer's options, defaults and metric
names, and the pitfalls its users meet handled.

A rollout: the policy answers a batch of prompts (``gptlab.align.rollouts``); the reward model
scores each (prompt, answer) at its **last real token** (a response that never reached its
end-of-turn token loses ``missing_eos_penalty``); the per-token reward is

    r_t = -kl_coef · KL_t   (+ score at the last real token)

with ``KL_t`` the ``k1`` (log π - log π_ref) or ``k3`` estimate against the frozen reference.
Rewards may be whitened (``whiten_rewards``, mean kept); advantages come from GAE (γ = ``gamma``,
λ = ``lam``) on the value model's estimates and are whitened. Then ``ppo_epochs`` passes over the
rollout in ``num_mini_batches`` optimizer steps minimise

    loss = mean_t max(-A_t ρ_t, -A_t clip(ρ_t, 1 ± cliprange))
         + vf_coef · mean_t 0.5 · max((V_t - R_t)², (clip(V_t, V_old ± cliprange_value) - R_t)²)

over the answers' real tokens (padding gets no reward, no KL, no value loss).

The value model is a separate model initialised from the reward model (``value_model``, default
``reward_model``), as TRL and InstructGPT do, not a head on the policy's trunk: it starts out
predicting what the reward model scores instead of noise, and its loss cannot pull the policy's
features. Its head reads every position (``V_t``: the value before answer token t). Policy and
value model train together as one module (TRL's PolicyAndValueWrapper) in the one training loop,
with one optimizer, and both are in every checkpoint (the value model in ``value_model/``), so a
resumed run continues both exactly; ``model/`` holds the policy alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from gptlab.align.rl import (
    KL_ESTIMATORS,
    clipped_policy_loss,
    clipped_value_loss,
    entropy_from_logits,
    gae,
    kl_estimate,
    masked_mean,
    masked_whiten,
    ppo_token_rewards,
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
from gptlab.model import GPT, RewardModel
from gptlab.train.loop import Runtime, TrainConfig, Trainer, cleanup_runtime, setup_runtime

VALUE_FOLDER = "value_model"  # inside each checkpoint


@dataclass
class PpoTrainConfig(TrainConfig):
    """The training loop's config with PPO defaults. ``batch_size`` counts answers per optimizer
    step (TRL's mini-batch); a rollout is ``batch_size x num_mini_batches`` answers. TRL's 3e-6
    suits billion-parameter models; TinyWorld's million-parameter ones need more."""

    max_steps: int = 200
    batch_size: int = 16
    lr: float = 3e-5
    warmup_steps: int = 0
    schedule: str = "linear"
    weight_decay: float = 0.0
    eval_every: int = 0
    save_every: int = 100


@dataclass
class PpoConfig:
    init: str = "runs/sft/model"  # the policy's start: a model folder with its tokenizer
    ref: str | None = None  # the frozen reference of the KL penalty; None: init
    reward_model: str = "runs/reward/model"  # a reward-model folder (gptlab reward) with the policy's tokenizer
    value_model: str | None = None  # where the value model starts; None: reward_model
    data: PromptDataConfig = field(default_factory=PromptDataConfig)
    max_new_tokens: int = 64  # TRL's response_length
    temperature: float = 0.7
    top_p: float = 1.0
    ppo_epochs: int = 4  # passes over each rollout (TRL's num_ppo_epochs)
    num_mini_batches: int = 1  # optimizer steps per pass
    gamma: float = 1.0
    lam: float = 0.95
    cliprange: float = 0.2
    cliprange_value: float = 0.2
    vf_coef: float = 0.1
    kl_coef: float = 0.05
    kl_estimator: str = "k1"  # k1 | k3
    whiten_rewards: bool = False
    missing_eos_penalty: float | None = None  # subtracted from the score of an answer that never ended
    train: PpoTrainConfig = field(default_factory=PpoTrainConfig)

    def __post_init__(self):
        check_sampling(self.max_new_tokens, self.temperature, self.top_p)
        checks = [
            (self.kl_estimator in KL_ESTIMATORS, f"kl_estimator must be one of {', '.join(KL_ESTIMATORS)}"),
            (self.ppo_epochs >= 1, f"ppo_epochs must be >= 1, got {self.ppo_epochs}"),
            (self.num_mini_batches >= 1, f"num_mini_batches must be >= 1, got {self.num_mini_batches}"),
            (0 <= self.gamma <= 1, f"gamma must be in [0, 1], got {self.gamma}"),
            (0 <= self.lam <= 1, f"lam must be in [0, 1], got {self.lam}"),
            (0 < self.cliprange < 1, f"cliprange must be in (0, 1), got {self.cliprange}"),
            (0 < self.cliprange_value < math.inf, f"cliprange_value must be positive, got {self.cliprange_value}"),
            (0 <= self.vf_coef < math.inf, f"vf_coef must be finite and >= 0, got {self.vf_coef}"),
            (0 <= self.kl_coef < math.inf, f"kl_coef must be finite and >= 0, got {self.kl_coef}"),
            (
                self.missing_eos_penalty is None or 0 <= self.missing_eos_penalty < math.inf,
                f"missing_eos_penalty must be finite and >= 0 (or none), got {self.missing_eos_penalty}",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        check_whole_rollouts(
            self.train.max_steps,
            self.train.save_every,
            self.ppo_epochs * self.num_mini_batches,
            "ppo_epochs x num_mini_batches",
        )

    @property
    def reference(self) -> str:
        return self.ref if self.ref is not None else self.init

    @property
    def sampling(self) -> RolloutSampling:
        return RolloutSampling(self.max_new_tokens, self.temperature, self.top_p if self.top_p < 1 else None)


def load_config(config_path: str | None, overrides: list[str], out_dir: Path, resume: bool) -> PpoConfig:
    """Resolve the config as SFT does (``load_stage_config``)."""
    return load_stage_config(PpoConfig, config_path, overrides, out_dir, resume)


# ----------------------------------------------------------------------------- policy and value


class PolicyAndValue(nn.Module):
    """The policy and the value model as one trainable module: one forward gives the policy's
    logits and the value of every position. It answers the training loop's ``Trainable``
    protocol: its files are the policy's (a causal LM folder) plus the value model's in
    ``value_model/``; its config (the shape a resume checks) is the policy's."""

    def __init__(self, policy: GPT, value: RewardModel):
        super().__init__()
        self.policy, self.value = policy, value
        self.config = policy.config

    @property
    def activation_checkpointing(self) -> bool:
        return self.policy.activation_checkpointing

    @activation_checkpointing.setter
    def activation_checkpointing(self, value: bool) -> None:
        self.policy.activation_checkpointing = self.value.activation_checkpointing = value

    def forward(self, input_ids, position_ids=None, attn_mask=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits (B, T, V), values (B, T) in fp32)."""
        logits = self.policy(input_ids, position_ids=position_ids, attn_mask=attn_mask)
        return logits, token_values(self.value, input_ids, position_ids, attn_mask)

    def write_files(self, folder, tokenizer=None) -> None:
        self.policy.write_files(folder, tokenizer=tokenizer)
        (Path(folder) / VALUE_FOLDER).mkdir()
        self.value.write_files(Path(folder) / VALUE_FOLDER, tokenizer=tokenizer)

    def read_state(self, folder) -> dict[str, torch.Tensor]:
        policy = {f"policy.{k}": v for k, v in self.policy.read_state(folder).items()}
        return {**policy, **{f"value.{k}": v for k, v in self.value.read_state(Path(folder) / VALUE_FOLDER).items()}}

    def with_state(self, state: dict[str, torch.Tensor]) -> PolicyAndValue:
        def part(prefix):
            return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}

        return PolicyAndValue(self.policy.with_state(part("policy.")), self.value.with_state(part("value.")))

    def flops_per_token(self, seq_len: int | None = None) -> float:
        return self.policy.flops_per_token(seq_len) + self.value.flops_per_token(seq_len)

    def num_params(self) -> int:
        return self.policy.num_params() + self.value.num_params()

    def shard_units(self) -> list[nn.Module]:
        return self.policy.shard_units() + self.value.shard_units()

    def matrix_parameters(self) -> list[nn.Parameter]:
        return self.policy.matrix_parameters() + self.value.matrix_parameters()


def token_values(value: RewardModel, input_ids, position_ids=None, attn_mask=None) -> torch.Tensor:
    """The value model's head read at every position (B, T), in fp32."""
    hidden = value.trunk.hidden(input_ids, position_ids=position_ids, attn_mask=attn_mask)
    return value.score(hidden).squeeze(-1).float()


def response_values(values: torch.Tensor, batch: dict) -> torch.Tensor:
    """(B, L): the value before each answer token (at the position that predicts it), 0 on padding."""
    start = batch["prompt_width"] - 1
    return values[:, start : start + batch["response_mask"].size(1)] * batch["response_mask"]


# ----------------------------------------------------------------------------- the loss


def ppo_objective(cfg: PpoConfig, logits: torch.Tensor, values: torch.Tensor, batch: dict) -> tuple[torch.Tensor, dict]:
    """(loss, metrics) of a micro-batch from the logits predicting its answer tokens (B, L, V),
    divided by the temperature, and the values before them (B, L)."""
    mask = batch["response_mask"]
    logprobs = response_logprobs(logits, batch)
    policy_losses, ratio, policy_clipped = clipped_policy_loss(
        logprobs, batch["old_logprobs"], batch["advantages"], cfg.cliprange
    )
    value_losses, value_clipped = clipped_value_loss(values, batch["values"], batch["returns"], cfg.cliprange_value)
    policy_loss, value_loss = masked_mean(policy_losses, mask), masked_mean(value_losses, mask)
    return policy_loss + cfg.vf_coef * value_loss, {
        "policy/approxkl_avg": 0.5 * masked_mean((logprobs - batch["old_logprobs"]).detach() ** 2, mask),
        "policy/clipfrac_avg": masked_mean(policy_clipped.float(), mask),
        "policy/entropy_avg": masked_mean(entropy_from_logits(logits.detach()), mask),
        "loss/policy_avg": policy_loss.detach(),
        "loss/value_avg": value_loss.detach(),
        "val/clipfrac_avg": masked_mean(value_clipped.float(), mask),
        "val/ratio": masked_mean(ratio.detach(), mask),
    }


def ppo_loss(cfg: PpoConfig):
    """The training loop's loss function: (loss, this micro-batch's and its rollout's metrics)."""

    def loss_fn(model: nn.Module, batch: dict):
        positions, mask = forward_inputs(batch)
        logits, values = model(batch["input_ids"], position_ids=positions, attn_mask=mask)
        loss, metrics = ppo_objective(
            cfg, response_logits(logits, batch, cfg.temperature), response_values(values, batch), batch
        )
        return loss, {**batch["metrics"], **metrics}

    return loss_fn


# ----------------------------------------------------------------------------- rollouts


def ppo_returns(cfg: PpoConfig, scores, ended, old, ref, values, mask) -> dict[str, torch.Tensor]:
    """What a rollout's answers are trained on: the scores after the missing-EOS penalty, the per-token
    KL and rewards, and GAE's whitened advantages and returns (the formulas of the module docstring)."""
    if cfg.missing_eos_penalty is not None:
        scores = scores - cfg.missing_eos_penalty * (~ended).to(scores.dtype)
    kl = kl_estimate(old, ref, cfg.kl_estimator) * mask
    rewards, non_score = ppo_token_rewards(scores, kl, mask, cfg.kl_coef)
    if cfg.whiten_rewards:
        rewards = masked_whiten(rewards, mask, shift_mean=False)
    advantages, returns = gae(rewards, values, mask, cfg.gamma, cfg.lam)
    return {
        "scores": scores,
        "kl": kl,
        "non_score": non_score,
        "advantages": masked_whiten(advantages, mask),
        "returns": returns,
    }


def rollout_metrics(terms: dict, old: torch.Tensor, mask: torch.Tensor, ended: torch.Tensor) -> dict[str, float]:
    """TRL's rollout metrics: sums over each answer's tokens, averaged over answers."""
    non_score = terms["non_score"].sum(1).mean()
    return {
        "objective/kl": terms["kl"].sum(1).mean().item(),
        "objective/entropy": (-old * mask).sum(1).mean().item(),
        "objective/non_score_reward": non_score.item(),
        "objective/rlhf_reward": (terms["scores"].mean() + non_score).item(),
        "objective/scores": terms["scores"].mean().item(),
        "val/num_eos_tokens": ended.sum().item(),
        "completions/mean_length": mask.sum(1).mean().item(),
    }


def ppo_collector(cfg: PpoConfig, model: PolicyAndValue, tokenizer, reward_model, reference, runtime: Runtime):
    """``collect(prompts, rollout index)`` for ``RolloutBatches``: answer, score, and compute the
    advantages and returns with the current policy and value model."""
    engine, stop_ids = Engine(model.policy, tokenizer), stop_ids_of(tokenizer)

    def collect(prompts: list[Prompt], index: int) -> dict:
        seed = rollout_seed(cfg.train.seed, index, runtime.rank)
        with torch.no_grad(), runtime.autocast():
            rollout = sample_rollout(engine, prompts, 1, cfg.sampling, seed, stop_ids)
            batch = rollout.batch()
            old = rollout.logprobs if cfg.temperature == 1 else policy_logprobs(model.policy, batch, cfg.temperature)
            ref = reference.logprobs(batch, cfg.temperature)
            positions, attn_mask = forward_inputs(batch)
            values = response_values(token_values(model.value, batch["input_ids"], positions, attn_mask), batch)
            scores = reward_model(batch["input_ids"], batch["attention_mask"])
        mask = batch["response_mask"]
        terms = ppo_returns(cfg, scores.float(), rollout.ended, old.float(), ref.float(), values.float(), mask)
        rows = {
            "input_ids": batch["input_ids"],
            "attention_mask": batch["attention_mask"],
            "response_mask": mask,
            "old_logprobs": old.float(),
            "values": values.float(),
            "advantages": terms["advantages"],
            "returns": terms["returns"],
        }
        metrics = rollout_metrics(terms, old.float(), mask, rollout.ended)
        return {"rows": rows, "prompt_width": rollout.prompt_width, "metrics": metrics}

    return collect


# ----------------------------------------------------------------------------- the stage


def ppo(cfg: PpoConfig, out_dir: str | Path, resume: bool = False, overwrite: bool = False) -> PolicyAndValue:
    """Train ``cfg.init`` with PPO against ``cfg.reward_model`` on the prompts of ``cfg.data`` into
    ``out_dir`` (run.json, metrics.jsonl, checkpoints/, model/); returns the policy and value model."""
    out_dir = Path(out_dir)
    tcfg = cfg.train
    refuse_fsdp(tcfg.parallelism, "ppo")
    policy, tokenizer, prompt_tokens = load_policy(
        cfg.init, tcfg.seq_len, cfg.max_new_tokens, cfg.data.max_prompt_length
    )
    reward_model = load_frozen(cfg.reward_model, "reward model", tokenizer, RewardModel).eval().requires_grad_(False)
    value = load_frozen(cfg.value_model or cfg.reward_model, "value model", tokenizer, RewardModel)
    reference = FrozenPolicy(load_frozen(cfg.reference, "reference", tokenizer))
    model = PolicyAndValue(policy, value)
    runtime = setup_runtime(tcfg)
    try:
        micro, _ = runtime.micro_batching(tcfg)
        prompts_per_rollout = check_rollout_shape(tcfg.batch_size, runtime.world_size, cfg.num_mini_batches, 1)
        prompts, stats = load_prompts(
            cfg.data.prompts, tokenizer, prompt_tokens, cfg.data.families, warn=runtime.is_main
        )
        for part in (model, reward_model, reference.model):
            part.to(runtime.device)
        batches = RolloutBatches(
            prompts,
            ppo_collector(cfg, model, tokenizer, reward_model, reference, runtime),
            prompts_per_rollout=prompts_per_rollout,
            rows_per_step=tcfg.batch_size,
            micro_batch_size=micro,
            minibatches=cfg.num_mini_batches,
            epochs=cfg.ppo_epochs,
            seed=tcfg.seed,
            runtime=runtime,
        )
        torch.manual_seed(tcfg.seed)
        trainer = Trainer(
            model,
            tcfg,
            runtime,
            out_dir,
            ppo_loss(cfg),
            batches,
            tokenizer=tokenizer,
            progress_metrics=("objective/scores", "objective/kl"),
        )
        return trainer.run("ppo", to_dict(cfg), resume, overwrite, data={"prompts": stats.to_dict()})
    finally:
        cleanup_runtime(runtime)
