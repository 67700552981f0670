"""The formulas of RL from feedback, as pure functions on tensors: PPO's and GRPO's losses, the KL
estimators, whitening, GAE and group-normalised advantages (TRL's and OpenRLHF's definitions).

Per-token tensors are (B, L) in *response layout*: column t is the response's t-th token, and a
mask (B, L) is 1 at the response's real tokens (its end-of-turn token included) and 0 at the
padding after it. Masked positions never contribute to a mean, a whitening, a reward, a value
loss or a KL.
"""

from __future__ import annotations

import torch

KL_ESTIMATORS = ("k1", "k3")
SCALE_REWARDS = ("group", "batch", "none")
GRPO_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """The mean of ``values`` where ``mask`` is 1 (over ``dim``, or over everything)."""
    mask = mask.to(values.dtype)
    if dim is None:
        return (values * mask).sum() / mask.sum().clamp(min=1)
    return (values * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def masked_var(values: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """The variance where ``mask`` is 1, with Bessel's correction by default (as TRL's)."""
    mean = masked_mean(values, mask)
    variance = masked_mean((values - mean) ** 2, mask)
    if unbiased:
        count = mask.sum()
        variance = variance * count / (count - 1).clamp(min=1)
    return variance


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """``(values - mean) / sqrt(var + 1e-8)`` over the masked-in entries, mean and variance taken
    there (TRL's ``masked_whiten``); ``shift_mean=False`` adds the mean back (rewards keep their
    sign). Masked-out entries come back as 0."""
    mean, variance = masked_mean(values, mask), masked_var(values, mask)
    whitened = (values - mean) * torch.rsqrt(variance + 1e-8)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask.to(values.dtype)


def kl_estimate(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(π || π_ref) from the log-probs of tokens sampled from π (Schulman's
    estimators): ``k1 = log π - log π_ref`` (unbiased, may be negative), ``k3 = (r - 1) - log r``
    with ``r = π_ref / π`` (unbiased and never negative)."""
    log_ratio = ref_logprobs - logprobs
    if estimator == "k1":
        return -log_ratio
    if estimator == "k3":
        return torch.expm1(log_ratio) - log_ratio
    raise ValueError(f"unknown KL estimator {estimator!r}; one of {', '.join(KL_ESTIMATORS)}")


def clipped_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    clip_low: float,
    clip_high: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PPO's clipped surrogate per token: ``max(-A·r, -A·clip(r, 1-ε_low, 1+ε_high))`` with
    ``r = exp(log π - log π_old)``. Returns (loss, ratio, whether the clipped term was taken)."""
    clip_high = clip_low if clip_high is None else clip_high
    ratio = torch.exp(logprobs - old_logprobs)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1 - clip_low, 1 + clip_high)
    return torch.maximum(unclipped, clipped), ratio, clipped > unclipped


def clipped_value_loss(
    values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, cliprange_value: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's clipped value loss per token: ``0.5 · max((V - R)², (V_clip - R)²)`` with ``V_clip``
    the new value kept within ``cliprange_value`` of the rollout's. Returns (loss, clipped taken)."""
    clipped_values = old_values + torch.clamp(values - old_values, -cliprange_value, cliprange_value)
    unclipped_loss, clipped_loss = (values - returns) ** 2, (clipped_values - returns) ** 2
    return 0.5 * torch.maximum(unclipped_loss, clipped_loss), clipped_loss > unclipped_loss


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016) along each row:
    ``δ_t = r_t + γ V_{t+1} - V_t``, ``A_t = δ_t + γ λ A_{t+1}``, with ``V`` = 0 past the last real
    token (the episode ends there). Returns (advantages, returns = advantages + values), 0 on padding."""
    mask = mask.to(values.dtype)
    rewards, values = rewards * mask, values * mask
    length = rewards.size(-1)
    advantages = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[..., 0])
    for t in reversed(range(length)):
        next_value = values[..., t + 1] if t + 1 < length else torch.zeros_like(running)
        delta = rewards[..., t] + gamma * next_value - values[..., t]
        running = delta + gamma * lam * running
        advantages[..., t] = running
    advantages = advantages * mask
    return advantages, (advantages + values) * mask


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """(B,): each row's last real response token (0 for an empty response)."""
    slots = torch.arange(mask.size(-1), device=mask.device)
    return (slots * mask.bool()).argmax(-1)


def ppo_token_rewards(
    scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """InstructGPT's per-token rewards: ``-kl_coef · KL_t`` at every real token, plus the sequence's
    score on its last real token. Returns (rewards, the KL part alone), both 0 on padding."""
    mask = mask.to(kl.dtype)
    non_score = -kl_coef * kl * mask
    rewards = non_score.clone()
    rows = torch.arange(rewards.size(0), device=rewards.device)
    rewards[rows, last_token_index(mask)] += scores.to(rewards.dtype)
    return rewards * mask, non_score


def group_advantages(rewards: torch.Tensor, group_size: int, scale_rewards: str = "group") -> torch.Tensor:
    """GRPO's advantages (B,) from rewards (B,) in consecutive groups of ``group_size`` answers to one
    prompt: each reward minus its group's mean, divided by the group's standard deviation + 1e-4
    (``scale_rewards="group"``, DeepSeekMath), the whole batch's (``"batch"``) or not at all
    (``"none"``, Dr. GRPO). Standard deviations are unbiased, as ``torch.std`` (TRL's).

    A group whose rewards are all equal gets exactly 0: its mean, rounded (0.4 is no float32), would
    leave a residue of ~1e-8 that the 1e-4 turns into ~1e-3, and AdamW into a full step on noise."""
    grouped = rewards.view(-1, group_size)
    varied = (grouped.amax(dim=1, keepdim=True) > grouped.amin(dim=1, keepdim=True)).to(rewards.dtype)
    centred = ((grouped - grouped.mean(dim=1, keepdim=True)) * varied).view(-1)
    if scale_rewards == "group":
        return centred / (grouped.std(dim=1).repeat_interleave(group_size) + 1e-4)
    if scale_rewards == "batch":
        return centred / (rewards.std() + 1e-4)
    if scale_rewards == "none":
        return centred
    raise ValueError(f"unknown scale_rewards {scale_rewards!r}; one of {', '.join(SCALE_REWARDS)}")


def aggregate_token_losses(
    losses: torch.Tensor, mask: torch.Tensor, loss_type: str, max_new_tokens: int, tokens_share: torch.Tensor | None
) -> torch.Tensor:
    """A micro-batch's loss from per-token losses (B, L), as TRL's GRPO ``loss_type``:

    - ``grpo``: each sequence's mean over its tokens, then the mean over sequences (long answers
      weigh less per token: the length bias Dr. GRPO points out);
    - ``bnpo``: the mean over the micro-batch's tokens;
    - ``dr_grpo``: the sum over tokens divided by ``B · max_new_tokens``, a constant;
    - ``dapo``: the sum divided by this micro-batch's share of the optimizer step's tokens over all
      micro-batches and ranks (``tokens_share``), so the step's loss is the mean over its tokens.
    """
    mask = mask.to(losses.dtype)
    if loss_type == "grpo":
        return ((losses * mask).sum(-1) / mask.sum(-1).clamp(min=1)).mean()
    if loss_type == "bnpo":
        return (losses * mask).sum() / mask.sum().clamp(min=1)
    if loss_type == "dr_grpo":
        return (losses * mask).sum() / (losses.size(0) * max_new_tokens)
    if loss_type == "dapo":
        return (losses * mask).sum() / tokens_share.clamp(min=1)
    raise ValueError(f"unknown loss_type {loss_type!r}; one of {', '.join(GRPO_LOSS_TYPES)}")


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """The entropy of the softmax of each row of logits (..., V) -> (...)."""
    logits = logits.float()
    return torch.logsumexp(logits, dim=-1) - (logits.softmax(-1) * logits).sum(-1)
