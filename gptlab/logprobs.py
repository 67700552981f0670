"""Log-probabilities of targets under a model's logits, and the attention masks of rows that hold
several sequences: the one place that training losses, the evaluation scorer, the engine and the
preference stages compute them, so they agree to the bit.

Targets equal to ``IGNORE`` (-100, PyTorch's and Hugging Face's convention) are skipped. Logits are
read in fp32 whatever the model's dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE = -100  # the target value the log-probs and the losses skip


def mean_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The mean next-token cross-entropy over the targets that are not ``IGNORE``."""
    return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=IGNORE)


# The most logits ``linear_cross_entropy`` holds at once: 2**26 is 256 MiB in fp32, where GPT-2's
# 50,304-token vocabulary over a batch of 16 x 1,024 tokens would hold 3.3 GB, and as much again for
# their gradient.
LOGITS_CHUNK_ELEMENTS = 2**26


def linear_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_elements: int | None = None
) -> torch.Tensor:
    """``mean_cross_entropy(F.linear(hidden, weight), targets)`` without ever holding all the logits:
    a language-model head's loss over hidden states (..., d) and its weight (V, d).

    When all the logits fit in ``chunk_elements`` (default ``LOGITS_CHUNK_ELEMENTS``) this is that
    plain loss. Otherwise the rows of ``hidden`` meet the head a chunk at a time, and each chunk's
    gradients (of the hidden states and the head) are taken while its logits exist, so that
    neither all the fp32 logits nor their gradient are ever held, and the backward pass has no
    logits to recompute: the FLOPs are the plain loss's. Under autocast the matmuls run in its
    dtype and the softmax in fp32, as the plain loss's do; the loss and gradients equal the plain
    ones to rounding.
    """
    vocab, width = weight.shape
    rows_per_chunk = max(1, (chunk_elements or LOGITS_CHUNK_ELEMENTS) // vocab)
    if hidden.numel() // width <= rows_per_chunk:
        return mean_cross_entropy(F.linear(hidden, weight), targets)
    device = hidden.device.type
    if torch.is_autocast_enabled(device):
        dtype = torch.get_autocast_dtype(device)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
    rows, targets = hidden.reshape(-1, width), targets.reshape(-1)
    with torch.autocast(device, enabled=False):
        if torch.is_grad_enabled() and (rows.requires_grad or weight.requires_grad):
            return _LinearCrossEntropy.apply(rows, weight, targets, rows_per_chunk)
        loss_sum, count, _, _ = _chunked_loss(rows, weight, targets, rows_per_chunk, False, False)
        return loss_sum / count


class _LinearCrossEntropy(torch.autograd.Function):
    """``linear_cross_entropy``'s chunks, whose gradients are computed in the forward pass and only
    scaled in the backward (the loss is the last op before the backward, so nothing is wasted)."""

    @staticmethod
    def forward(ctx, rows, weight, targets, rows_per_chunk):
        loss_sum, count, grad_rows, grad_weight = _chunked_loss(
            rows, weight, targets, rows_per_chunk, ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        )
        ctx.save_for_backward(count, grad_rows, grad_weight)
        ctx.weight_dtype = weight.dtype
        return loss_sum / count

    @staticmethod
    def backward(ctx, grad_loss):
        count, grad_rows, grad_weight = ctx.saved_tensors
        scale = grad_loss / count
        rows = (grad_rows * scale).to(grad_rows.dtype) if ctx.needs_input_grad[0] else None
        weight = (grad_weight * scale).to(ctx.weight_dtype) if ctx.needs_input_grad[1] else None
        return rows, weight, None, None


def _chunked_loss(rows, weight, targets, rows_per_chunk: int, grad_of_rows: bool, grad_of_weight: bool):
    """(the summed cross-entropy over kept targets, their count, and the sum's gradients of the
    rows and, in fp32, of the weight, each None when not asked for), a chunk of rows at a time."""
    kept = targets != IGNORE
    loss_sum = torch.zeros((), dtype=torch.float32, device=rows.device)
    grad_rows = []
    grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if grad_of_weight else None
    for start in range(0, rows.size(0), rows_per_chunk):
        chunk = rows[start : start + rows_per_chunk]
        chunk_kept = kept[start : start + rows_per_chunk]
        picked = torch.where(chunk_kept, targets[start : start + rows_per_chunk], 0)[:, None]
        logits = (chunk @ weight.T).float()
        log_norm = logits.logsumexp(-1, keepdim=True)
        losses = log_norm - logits.gather(-1, picked)
        loss_sum = loss_sum + torch.where(chunk_kept[:, None], losses, 0.0).sum()
        if not (grad_of_rows or grad_of_weight):
            continue
        # d(loss)/d(logits) = softmax - one-hot of the target, on kept rows only.
        grad = logits.sub_(log_norm).exp_()
        grad.scatter_add_(-1, picked, torch.full_like(losses, -1.0))
        grad = torch.where(chunk_kept[:, None], grad, 0.0).to(rows.dtype)
        if grad_of_rows:
            grad_rows.append(grad @ weight)
        if grad_of_weight:
            grad_weight += grad.T @ chunk
    count = kept.sum()
    return loss_sum, count, torch.cat(grad_rows) if grad_of_rows else None, grad_weight


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(target) at every position (the shape of ``targets``), 0 where the target is ``IGNORE``."""
    return _picked(logits.float().log_softmax(-1), targets)


def scored_targets(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``token_logprobs`` and whether each target is the most likely token (lm-eval's
    ``is_greedy``, taken on the log-probs as lm-eval takes it, so that ties break alike)."""
    logprobs = logits.float().log_softmax(-1)
    return _picked(logprobs, targets), logprobs.argmax(-1) == targets


def top_logprobs(logits: torch.Tensor, targets: torch.Tensor, k: int) -> tuple[torch.Tensor, ...]:
    """``token_logprobs`` of ``targets``, with the ``k`` largest log-probs at every position and
    their token ids, most likely first (OpenAI's ``top_logprobs``): (picked, values, ids)."""
    logprobs = logits.float().log_softmax(-1)
    top = logprobs.topk(k, dim=-1)
    return _picked(logprobs, targets), top.values, top.indices


def _picked(logprobs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    kept = targets != IGNORE
    picked = logprobs.gather(-1, torch.where(kept, targets, 0).unsqueeze(-1)).squeeze(-1)
    return torch.where(kept, picked, 0.0)


def sequence_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p of each row's kept targets together (B,): the sum of their token log-probs."""
    return token_logprobs(logits, targets).sum(-1)


def padded_inputs(attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(position_ids, attention mask or None) for rows padded on either side, ``attention_mask``
    (B, T) being 1 at real tokens (Hugging Face's convention). Positions count real tokens from 0,
    so a sequence reads the same whatever its padding. None when no row has padding before a
    real token: plain causal attention never sees right padding, so no mask tensor is built."""
    real = attention_mask.bool()
    positions = (real.long().cumsum(-1) - 1).clamp(min=0)
    left_padded = (real[:, 1:] & ~real[:, :-1]).any()
    return positions, segment_mask(real.long()) if bool(left_padded) else None


def last_real_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B,): the index of each row's last real token, with padding on either side."""
    slots = torch.arange(attention_mask.size(-1), device=attention_mask.device)
    return (slots * attention_mask.bool()).argmax(-1)


def segment_mask(segment_ids: torch.Tensor, shared: int | None = None) -> torch.Tensor:
    """The (B, 1, T, T) attention mask, True where a query may attend a key, of rows whose
    positions carry segment ids (B, T): causal, and a query sees the keys of its own segment and,
    when ``shared`` is given, of that segment too (a context that several continuations read).
    Padding is a segment of its own (e.g. -1), so no query's row of the mask is empty (an empty
    row gives NaN in attention)."""
    slot = torch.arange(segment_ids.size(1), device=segment_ids.device)
    causal = slot[None, :] <= slot[:, None]
    query, key = segment_ids[:, :, None], segment_ids[:, None, :]
    visible = key == query
    if shared is not None:
        visible = visible | (key == shared)
    return (visible & causal)[:, None]
