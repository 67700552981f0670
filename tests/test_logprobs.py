"""The one log-prob room: closed forms, the IGNORE rule, and the masks of rows holding several sequences."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import gptlab.logprobs
from gptlab.logprobs import (
    IGNORE,
    last_real_index,
    linear_cross_entropy,
    mean_cross_entropy,
    padded_inputs,
    scored_targets,
    segment_mask,
    sequence_logprobs,
    token_logprobs,
)


def test_uniform_logits_give_minus_log_vocab_and_ignored_targets_give_zero():
    logits = torch.zeros(2, 3, 5)
    targets = torch.tensor([[1, IGNORE, 4], [IGNORE, IGNORE, 0]])
    expected = torch.tensor([[-math.log(5), 0.0, -math.log(5)], [0.0, 0.0, -math.log(5)]])
    torch.testing.assert_close(token_logprobs(logits, targets), expected)
    torch.testing.assert_close(sequence_logprobs(logits, targets), expected.sum(-1))


def test_log_probs_agree_with_the_mean_loss_and_with_a_softmax_by_hand():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 7, 11, generator=generator, dtype=torch.float64).to(torch.bfloat16)
    tokens = torch.randint(0, 11, (3, 8), generator=generator)
    targets = tokens[:, 1:]  # a non-contiguous slice, the natural way to shift
    targets = torch.where(torch.rand(3, 7, generator=generator) < 0.3, IGNORE, targets)
    probs = logits.double().softmax(-1)
    by_hand = probs.gather(-1, targets.clamp_min(0)[..., None]).squeeze(-1).log() * (targets != IGNORE)
    lp = token_logprobs(logits, targets)
    assert lp.dtype == torch.float32
    torch.testing.assert_close(lp.double(), by_hand, atol=1e-5, rtol=0)
    torch.testing.assert_close(mean_cross_entropy(logits, targets), -lp.sum() / (targets != IGNORE).sum())


def test_greedy_is_true_exactly_where_the_target_is_the_argmax():
    logits = torch.tensor([[0.0, 2.0, 1.0], [3.0, 0.0, 1.0]])
    picked, greedy = scored_targets(logits, torch.tensor([1, 2]))
    assert greedy.tolist() == [True, False]
    torch.testing.assert_close(picked, token_logprobs(logits, torch.tensor([1, 2])))


def test_packed_rows_attend_within_their_segment_only_and_causally():
    segments = torch.tensor([[0, 0, 1, 1, -1]])
    mask = segment_mask(segments)[0, 0]
    expected = torch.tensor(
        [
            [1, 0, 0, 0, 0],
            [1, 1, 0, 0, 0],
            [0, 0, 1, 0, 0],
            [0, 0, 1, 1, 0],
            [0, 0, 0, 0, 1],
        ],
        dtype=torch.bool,
    )
    assert torch.equal(mask, expected)


def test_a_shared_context_is_seen_by_every_continuation_but_continuations_not_by_each_other():
    segments = torch.tensor([[0, 0, 1, 2, 2, -1]])
    mask = segment_mask(segments, shared=0)[0, 0]
    assert mask[3, :2].all() and mask[2, :2].all()  # both continuations read the context
    assert not mask[3, 2] and not mask[4, 2]  # continuation 2 never sees continuation 1
    assert mask[5, :2].all() and not mask[5, 2:5].any()  # padding sees the context and itself
    assert not mask.triu(1).any()
    assert mask.any(-1).all()  # no empty row (NaN in attention)


def test_left_right_and_no_padding_give_the_same_positions_for_the_real_tokens():
    real = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    positions, mask = padded_inputs(real)
    assert positions[0, :3].tolist() == positions[1, 2:].tolist() == [0, 1, 2]
    assert last_real_index(real).tolist() == [2, 4, 4]
    assert mask is not None and not mask[1, 0, 3, :2].any() and mask[1, 0, 3, 2:4].all()
    assert mask.any(-1).all()
    assert padded_inputs(real[[0, 2]])[1] is None  # right padding only: plain causal attention


def head_problem(dtype=torch.float32):
    """Hidden states (3, 50, 16) and a head (37, 16) that need gradients, and targets (a non-contiguous
    slice, as shifted targets are) with some ignored, among them a whole chunk's worth of rows."""
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, 50, 16, generator=generator, dtype=dtype, requires_grad=True)
    weight = torch.randn(37, 16, generator=generator, dtype=dtype, requires_grad=True)
    targets = torch.randint(0, 37, (3, 51), generator=generator)[:, 1:]
    targets[0, :20] = IGNORE
    targets[2, 45:] = IGNORE
    return hidden, weight, targets


@pytest.mark.parametrize("rows_per_chunk", [1, 7, 50, 149])
def test_the_chunked_head_loss_and_its_gradients_equal_the_plain_ones(rows_per_chunk, monkeypatch):
    hidden, weight, targets = head_problem()
    plain = mean_cross_entropy(F.linear(hidden, weight), targets)
    expected = torch.autograd.grad(plain * 3, (hidden, weight))
    monkeypatch.setattr(gptlab.logprobs, "mean_cross_entropy", None)  # the chunks must not fall back on it
    loss = linear_cross_entropy(hidden, weight, targets, chunk_elements=37 * rows_per_chunk)
    got = torch.autograd.grad(loss * 3, (hidden, weight))  # the backward scales by the incoming gradient
    torch.testing.assert_close(loss, plain, rtol=1e-6, atol=0)
    for g, e in zip(got, expected):  # fp32 rounding of sums taken in another order
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-7)
    assert not got[0][0, :20].any()  # ignored targets give their rows no gradient
    with torch.no_grad():
        torch.testing.assert_close(linear_cross_entropy(hidden, weight, targets, 37 * rows_per_chunk), plain)


def test_logits_that_fit_one_chunk_give_the_plain_loss_bit_for_bit():
    hidden, weight, targets = head_problem()
    plain = mean_cross_entropy(F.linear(hidden, weight), targets)
    expected = torch.autograd.grad(plain, (hidden, weight))
    loss = linear_cross_entropy(hidden, weight, targets, chunk_elements=37 * 150)
    assert torch.equal(loss, plain)
    assert all(torch.equal(g, e) for g, e in zip(torch.autograd.grad(loss, (hidden, weight)), expected))


def test_under_bf16_autocast_the_chunks_multiply_in_bf16_and_agree_with_the_plain_loss_to_its_rounding():
    hidden, weight, targets = head_problem()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain = mean_cross_entropy(F.linear(hidden, weight), targets)
        expected = torch.autograd.grad(plain, (hidden, weight))
        loss = linear_cross_entropy(hidden, weight, targets, chunk_elements=37 * 7)
        got = torch.autograd.grad(loss, (hidden, weight))
    assert loss.dtype == torch.float32 and all(g.dtype == torch.float32 for g in got)
    torch.testing.assert_close(loss, plain, rtol=1e-3, atol=0)
    for g, e in zip(got, expected):  # bf16 holds 8 bits of mantissa: relative to each gradient's scale
        assert (g - e).abs().max() <= 2**-7 * e.abs().max()
