"""Batches of token windows from memory-mapped shards: deterministic, resumable, rank-aware.

A split's token stream (its shards concatenated in order) is cut into ``num_windows``
non-overlapping windows of ``seq_len + 1`` tokens; a window may cross a shard boundary, and the
stream's last ``< seq_len + 1`` tokens are never used. Window ``w`` gives ``x = w[:-1]`` and
``y = w[1:]``.

Training order is one endless sequence: epoch ``e`` visits every window once, in the order of
``permute(., num_windows, seed, e)``. Call ``k`` on rank ``r`` takes positions
``k*B*W + r*B .. + B`` of that sequence (``B`` the batch size, ``W`` the world size), so the
windows a step sees do not depend on how they are split over ranks. The permutation is computed
per index (a Feistel network), so memory does not grow with the corpus.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gptlab.data.shards import mix64, open_shard, read_meta
from gptlab.errors import UserError

_ROUNDS = 6
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def to_device(batch, device: torch.device):
    """A batch (a tensor, or a tuple or dict of them; None stays None) moved to ``device``,
    without making the host wait for a copy to CUDA: the copy starts from pinned memory, so it is
    queued behind the device's work while the host goes on."""
    if isinstance(batch, dict):
        return {key: to_device(value, device) for key, value in batch.items()}
    if isinstance(batch, tuple):
        return tuple(to_device(value, device) for value in batch)
    if batch is None:
        return None
    if device.type == "cuda" and batch.device.type == "cpu":
        return batch.pin_memory().to(device, non_blocking=True)
    return batch.to(device)


def permute(index: np.ndarray, n: int, seed: int, epoch: int = 0) -> np.ndarray:
    """A seeded bijection of ``range(n)`` evaluated at ``index`` (1-d), in O(len(index)) memory.

    A balanced Feistel network permutes the smallest domain of ``4**h >= n`` values; "cycle
    walking" re-applies it to any value ``>= n`` until it lands in range, which keeps it a
    bijection of ``range(n)``. The domain is less than ``4 * n``, so few walks are needed.
    """
    index = np.atleast_1d(np.asarray(index, dtype=np.uint64))  # arrays: numpy wraps uint64 silently
    if n < 1 or (index.size and int(index.max()) >= n):
        raise ValueError(f"indices must lie in range({n})")
    half = max(1, ((n - 1).bit_length() + 1) // 2)
    mask = np.uint64((1 << half) - 1)
    state = mix64(np.array([seed % 2**64], dtype=np.uint64)) ^ mix64(
        np.array([epoch % 2**64], dtype=np.uint64) + _GOLDEN
    )
    keys = mix64(mix64(state) + np.arange(1, _ROUNDS + 1, dtype=np.uint64) * _GOLDEN)

    def feistel(x: np.ndarray) -> np.ndarray:
        left, right = x >> np.uint64(half), x & mask
        for key in keys:
            left, right = right, left ^ (mix64(right ^ key) & mask)
        return (left << np.uint64(half)) | right

    out = feistel(index)
    outside = out >= np.uint64(n)
    while outside.any():
        out[outside] = feistel(out[outside])
        outside = out >= np.uint64(n)
    return out.astype(np.int64)


class TokenLoader:
    """Batches ``(x, y)`` of shape ``(batch_size, seq_len)``, int64, from a shards folder."""

    def __init__(
        self,
        shards_dir: str | os.PathLike,
        split: str = "train",
        *,
        seq_len: int,
        batch_size: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ):
        if seq_len < 1 or batch_size < 1:
            raise UserError(f"seq_len and batch_size must be positive, got {seq_len} and {batch_size}")
        if not 0 <= rank < world_size:
            raise UserError(f"rank {rank} is outside world_size {world_size}: check the launcher's settings")
        shards_dir = Path(shards_dir)
        meta = read_meta(shards_dir)
        if split not in meta["splits"]:
            raise UserError(f"{shards_dir} has no split {split!r} (it has {', '.join(meta['splits'])})")
        info = meta["splits"][split]
        self._shards = [open_shard(shards_dir / name) for name in info["shards"]]
        if any(s.dtype.name != meta["dtype"] for s in self._shards) or sum(map(len, self._shards)) != info["tokens"]:
            raise UserError(f"the {split} shards in {shards_dir} do not match its meta.json: re-run `gptlab prepare`")
        self._starts = np.cumsum([0] + [len(s) for s in self._shards])  # stream offset of each shard
        self.split, self.seq_len, self.batch_size = split, seq_len, batch_size
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.tokens = int(info["tokens"])
        self.tokenizer_fingerprint: str = meta["tokenizer_fingerprint"]
        self.num_windows = self.tokens // (seq_len + 1)
        if self.num_windows == 0:
            raise UserError(
                f"the {split} split of {shards_dir} holds {self.tokens} tokens, fewer than one window of "
                f"seq_len+1 = {seq_len + 1}: lower seq_len or prepare more data (a larger val_fraction for val)"
            )
        self.position = 0  # index in the endless window sequence of the next global batch

    @property
    def epoch(self) -> int:
        return self.position // self.num_windows

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's share of the next global batch of ``batch_size * world_size`` windows."""
        positions = self.position + self.rank * self.batch_size + np.arange(self.batch_size)
        epochs, offsets = np.divmod(positions, self.num_windows)
        windows = np.empty(self.batch_size, dtype=np.int64)
        for epoch in np.unique(epochs):
            here = epochs == epoch
            windows[here] = permute(offsets[here], self.num_windows, self.seed, int(epoch))
        self.position += self.batch_size * self.world_size
        return self._batch(windows)

    def val_batches(self, max_batches: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Windows for evaluation, unshuffled and spread evenly over the whole split (so a few
        batches sample every part of the corpus, not just its first files); only whole global
        batches, so every rank gets the same number. Does not move the training position."""
        per_step = self.batch_size * self.world_size
        count = self.num_windows // per_step
        if count == 0:
            raise UserError(
                f"the {self.split} split holds {self.num_windows} windows of {self.seq_len + 1} tokens, fewer "
                f"than batch_size*world_size = {per_step}: lower the eval batch size or seq_len"
            )
        if max_batches is not None:
            count = min(count, max_batches)
        windows = np.arange(count * per_step) * self.num_windows // (count * per_step)
        for k in range(count):
            start = k * per_step + self.rank * self.batch_size
            yield self._batch(windows[start : start + self.batch_size])

    def state_dict(self) -> dict[str, Any]:
        return {
            "split": self.split,
            "seed": self.seed,
            "seq_len": self.seq_len,
            "num_windows": self.num_windows,
            "tokenizer_fingerprint": self.tokenizer_fingerprint,
            "epoch": self.epoch,
            "position": self.position,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue the saved sequence. ``position`` counts windows globally, so the batch size
        and world size may differ from the run that saved it; the seed is taken from the state."""
        for key in ("split", "seq_len", "num_windows", "tokenizer_fingerprint"):
            if state[key] != getattr(self, key):
                raise UserError(
                    f"the saved data position does not fit these shards ({key} was {state[key]!r}, now "
                    f"{getattr(self, key)!r}): resume with the same shards and seq_len, or start afresh"
                )
        self.seed = state["seed"]
        self.position = state["position"]

    def _batch(self, windows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        span = self.seq_len + 1
        rows = np.stack([self._read(int(w) * span, span) for w in windows])
        return torch.from_numpy(rows[:, :-1].copy()), torch.from_numpy(rows[:, 1:].copy())

    def _read(self, start: int, length: int) -> np.ndarray:
        """Tokens ``[start, start + length)`` of the split's stream, across shards if needed."""
        out = np.empty(length, dtype=np.int64)
        shard = int(np.searchsorted(self._starts, start, side="right")) - 1
        done = 0
        while done < length:
            begin = start + done - int(self._starts[shard])
            part = self._shards[shard][begin : begin + length - done]
            out[done : done + part.size] = part
            done += part.size
            shard += 1
        return out
