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
