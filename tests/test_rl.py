"""The RL formulas in closed form (gptlab.align.rl, and PPO's rollout terms): GAE on a hand example,
whitening, the clipped losses at ratio 1 and beyond the clip, the k1/k3 estimators, the score on the
last real token, the missing-EOS penalty, padding that gets no reward, value loss or KL, GRPO's group
advantages and loss types."""

from __future__ import annotations

import math

import pytest
import torch

from gptlab.align.ppo import PpoConfig, PpoTrainConfig, ppo_objective, ppo_returns
from gptlab.align.rl import (
    aggregate_token_losses,
    clipped_policy_loss,
    clipped_value_loss,
    gae,
    group_advantages,
    kl_estimate,
    masked_whiten,
    ppo_token_rewards,
)

DOUBLE = torch.float64


def tensor(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=DOUBLE)


def test_gae_equals_a_hand_computed_example():
    """γ = 0.9, λ = 0.8 (γλ = 0.72). Row 0: rewards 0, 0, 1 and values .5, .6, .7:
    δ2 = 1 - .7 = .3, δ1 = .9·.7 - .6 = .03, δ0 = .9·.6 - .5 = .04; A2 = .3, A1 = .03 + .72·.3 = .246,
    A0 = .04 + .72·.246 = .21712. Row 1 ends after two tokens: its third slot is padding, whose
    reward 5 and value 9 must change nothing: δ1 = 2 - .2 = 1.8, δ0 = .9·.2 - .1 = .08, A0 = .08 + .72·1.8."""
    rewards = tensor([[0.0, 0.0, 1.0], [0.0, 2.0, 5.0]])
    values = tensor([[0.5, 0.6, 0.7], [0.1, 0.2, 9.0]])
    mask = tensor([[1, 1, 1], [1, 1, 0]])
    advantages, returns = gae(rewards, values, mask, gamma=0.9, lam=0.8)
    expected = tensor([[0.21712, 0.246, 0.3], [1.376, 1.8, 0.0]])
    torch.testing.assert_close(advantages, expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(returns, expected + values * mask, rtol=0, atol=1e-12)
    # γ = λ = 1: each advantage is the rest of the rewards minus the value (Monte Carlo).
    advantages, _ = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    torch.testing.assert_close(advantages[0], tensor([0.5, 0.4, 0.3]), rtol=0, atol=1e-12)


def test_whitening_uses_the_masked_entries_only():
    """Mean 2 and unbiased variance 1 over 1, 2, 3; the padded 100 is ignored and comes back 0."""
    values, mask = tensor([[1.0, 2.0, 3.0, 100.0]]), tensor([[1, 1, 1, 0]])
    scale = 1 / math.sqrt(1 + 1e-8)
    torch.testing.assert_close(masked_whiten(values, mask), tensor([[-scale, 0.0, scale, 0.0]]), rtol=0, atol=1e-12)
    kept_mean = masked_whiten(values, mask, shift_mean=False)
    torch.testing.assert_close(kept_mean, tensor([[2 - scale, 2.0, 2 + scale, 0.0]]), rtol=0, atol=1e-12)


def test_clipped_policy_loss_at_ratio_one_and_beyond_the_clip():
    old = torch.zeros(4, dtype=DOUBLE)
    advantages = tensor([2.0, -2.0, 2.0, -2.0])
    # At ratio 1 the loss is -A and nothing is clipped.
    loss, ratio, clipped = clipped_policy_loss(old.clone(), old, advantages, 0.2)
    assert loss.tolist() == [-2.0, 2.0, -2.0, 2.0] and ratio.tolist() == [1.0] * 4 and not clipped.any()
    # ratios 1.5, 1.5, 0.5, 0.5 with ε = 0.2: the pessimistic term of each.
    logprobs = torch.log(tensor([1.5, 1.5, 0.5, 0.5]))
    loss, ratio, clipped = clipped_policy_loss(logprobs, old, advantages, 0.2)
    torch.testing.assert_close(loss, tensor([-2 * 1.2, 2 * 1.5, -2 * 0.5, 2 * 0.8]), rtol=0, atol=1e-12)
    assert clipped.tolist() == [True, False, False, True]
    # Where the clipped term is taken, the policy gets no gradient; DAPO's ε_high widens the upper side.
    logprobs.requires_grad_(True)
    clipped_policy_loss(logprobs, old, advantages, 0.2)[0].sum().backward()
    assert logprobs.grad[0] == 0 and logprobs.grad[3] == 0 and logprobs.grad[1] != 0
    loss = clipped_policy_loss(torch.log(tensor([1.5])), old[:1], advantages[:1], 0.2, clip_high=0.28)[0]
    assert loss.item() == pytest.approx(-2 * 1.28, abs=1e-12)


def test_clipped_value_loss():
    """V = 1, V_old = 0, R = 2, cliprange 0.2: (1-2)² = 1 unclipped, (0.2-2)² = 3.24 clipped; half the larger."""
    loss, clipped = clipped_value_loss(tensor([1.0]), tensor([0.0]), tensor([2.0]), 0.2)
    assert loss.item() == pytest.approx(0.5 * 3.24, abs=1e-12) and clipped.item()
    loss, clipped = clipped_value_loss(tensor([0.1]), tensor([0.0]), tensor([2.0]), 0.2)
    assert loss.item() == pytest.approx(0.5 * 1.9**2, abs=1e-12) and not clipped.item()


def test_k1_and_k3_follow_their_definitions_and_k3_is_never_negative():
    generator = torch.Generator().manual_seed(0)
    logprobs = -torch.rand(1000, generator=generator, dtype=DOUBLE) * 8
    ref = -torch.rand(1000, generator=generator, dtype=DOUBLE) * 8
    torch.testing.assert_close(kl_estimate(logprobs, ref, "k1"), logprobs - ref, rtol=0, atol=1e-12)
    r = torch.exp(ref - logprobs)
    torch.testing.assert_close(kl_estimate(logprobs, ref, "k3"), r - 1 - torch.log(r), rtol=0, atol=1e-12)
    assert (kl_estimate(logprobs, ref, "k3") >= 0).all() and (kl_estimate(logprobs, ref, "k1") < 0).any()
    assert kl_estimate(logprobs, logprobs, "k3").abs().max() == 0
    with pytest.raises(ValueError, match="k1, k3"):
        kl_estimate(logprobs, ref, "k2")


def test_the_score_lands_on_the_last_real_token_and_padding_gets_nothing():
    kl = tensor([[0.1, 0.2, 0.3, 7.0], [0.5, 9.0, 9.0, 9.0]])
    mask = tensor([[1, 1, 1, 0], [1, 0, 0, 0]])
    rewards, non_score = ppo_token_rewards(tensor([10.0, 20.0]), kl, mask, kl_coef=0.5)
    expected = tensor([[-0.05, -0.1, -0.15 + 10, 0.0], [-0.25 + 20, 0.0, 0.0, 0.0]])
    torch.testing.assert_close(rewards, expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(
        non_score, tensor([[-0.05, -0.1, -0.15, 0.0], [-0.25, 0.0, 0.0, 0.0]]), rtol=0, atol=1e-12
    )


def ppo_config(**settings) -> PpoConfig:
    return PpoConfig(train=PpoTrainConfig(max_steps=4, save_every=4), **settings)


def test_a_response_without_end_of_turn_loses_the_missing_eos_penalty():
    mask = tensor([[1, 1], [1, 1]])
    zeros = torch.zeros(2, 2, dtype=DOUBLE)
    terms = ppo_returns(
        ppo_config(missing_eos_penalty=1.5), tensor([3.0, 3.0]), torch.tensor([True, False]), zeros, zeros, zeros, mask
    )
    assert terms["scores"].tolist() == [3.0, 1.5]
    terms = ppo_returns(ppo_config(), tensor([3.0, 3.0]), torch.tensor([True, False]), zeros, zeros, zeros, mask)
    assert terms["scores"].tolist() == [3.0, 3.0]


def rollout_rows(padding_value: float) -> dict:
    """Two answers (3 and 1 real tokens) whose padding slots hold ``padding_value``."""
    mask = tensor([[1, 1, 1], [1, 0, 0]])

    def padded(rows):
        return torch.where(mask.bool(), tensor(rows), padding_value)

    return {
        "mask": mask,
        "old": padded([[-1.0, -2.0, -0.5], [-1.5, 0, 0]]),
        "ref": padded([[-1.2, -1.0, -0.7], [-1.0, 0, 0]]),
        "values": padded([[0.3, 0.1, -0.2], [0.4, 0, 0]]),
    }


@pytest.mark.parametrize("estimator", ["k1", "k3"])
def test_padding_gets_no_reward_kl_advantage_or_value_loss(estimator: str):
    cfg = ppo_config(kl_coef=0.1, kl_estimator=estimator, whiten_rewards=True)
    terms = []
    for padding in (0.0, 123.0):
        rows = rollout_rows(padding)
        found = ppo_returns(
            cfg, tensor([1.0, -1.0]), torch.tensor([True, True]), rows["old"], rows["ref"], rows["values"], rows["mask"]
        )
        terms.append(found)
        for name in ("kl", "non_score", "advantages", "returns"):
            assert (found[name][~rows["mask"].bool()] == 0).all(), name
    for name in terms[0]:
        torch.testing.assert_close(terms[0][name], terms[1][name], rtol=0, atol=1e-12)
    # The loss of a batch: garbage in the padding slots of the new log-probs and values changes nothing.
    losses = []
    for padding in (0.0, 55.0):
        rows = rollout_rows(padding)
        logits = torch.randn(2, 3, 5, dtype=DOUBLE, generator=torch.Generator().manual_seed(1))
        batch = {
            "input_ids": torch.tensor([[1, 2, 3, 4], [1, 2, 0, 0]]),
            "prompt_width": 1,
            "response_mask": rows["mask"],
            "old_logprobs": rows["old"],
            "values": rows["values"],
            "advantages": terms[0]["advantages"],
            "returns": terms[0]["returns"],
        }
        values = torch.where(rows["mask"].bool(), tensor([[0.5, 0.2, 0.1], [0.3, 0, 0]]), padding)
        losses.append(ppo_objective(cfg, logits, values, batch))
    assert losses[0][0].item() == pytest.approx(losses[1][0].item(), abs=1e-12)
    for name, value in losses[0][1].items():
        assert value.item() == pytest.approx(losses[1][1][name].item(), abs=1e-12), name


# ----------------------------------------------------------------------------- GRPO


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_group_advantages_sum_to_zero_in_each_group(scale: str):
    rewards = tensor([1.0, 0.0, 0.0, 1.0, 0.2, 0.4, 0.6, 0.8, 3.0, 3.0, 3.0, 3.0])
    advantages = group_advantages(rewards, 4, scale)
    torch.testing.assert_close(advantages.view(3, 4).sum(1), torch.zeros(3, dtype=DOUBLE), rtol=0, atol=1e-12)
    assert advantages[8:].tolist() == [0.0] * 4  # equal rewards: no advantage
    if scale == "group":  # mean 0.5, unbiased std sqrt(1/3)
        expected = 0.5 / (math.sqrt(1 / 3) + 1e-4)
        torch.testing.assert_close(
            advantages[:4], tensor([expected, -expected, -expected, expected]), rtol=0, atol=1e-12
        )
    if scale == "none":
        torch.testing.assert_close(advantages[4:8], tensor([-0.3, -0.1, 0.1, 0.3]), rtol=0, atol=1e-12)


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_a_group_of_equal_rewards_gets_exactly_zero_advantage(scale: str):
    """0.4 is not a float32: the group's mean comes out 0.40000004, and divided by the std's 1e-4 that
    rounding would be an advantage of 3e-4, which AdamW turns into a full-sized step on noise."""
    rewards = torch.tensor([0.4] * 8 + [0.1] * 7 + [0.7])
    advantages = group_advantages(rewards, 8, scale)
    assert advantages[:8].tolist() == [0.0] * 8 and (advantages[8:] != 0).all()


def test_the_loss_types_normalise_as_trl_does():
    losses = tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]])
    mask = tensor([[1, 1, 1], [1, 0, 0]])
    assert aggregate_token_losses(losses, mask, "grpo", 8, None).item() == pytest.approx((2.0 + 4.0) / 2)
    assert aggregate_token_losses(losses, mask, "bnpo", 8, None).item() == pytest.approx(10 / 4)
    assert aggregate_token_losses(losses, mask, "dr_grpo", 8, None).item() == pytest.approx(10 / (2 * 8))
    assert aggregate_token_losses(losses, mask, "dapo", 8, tensor(5.0)).item() == pytest.approx(10 / 5)
