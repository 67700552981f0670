"""Chat data for supervised fine-tuning: JSONL records -> token ids + loss mask -> batches.

Records, one JSON object per line (TRL's dataset formats):

- ``{"messages": [{"role": ..., "content": ...}, ...]}``: rendered with the chat template; the
  loss covers every assistant reply and its ``<|end|>``.
- ``{"prompt": [messages], "completion": [messages]}`` (conversational prompt-completion): the
  same template over prompt + completion; the loss covers the completion's assistant replies only.
- ``{"prompt": "text", "completion": "text"}`` (standard prompt-completion): plain text,
  ``<|bos|> prompt completion <|eos|>`` as TRL does, with the loss on the completion and EOS.

The loss mask is built from these explicit spans, never from the pad id. A conversation longer
than ``max_len`` tokens is cut after its last assistant reply that fits (``truncation="turn"``)
or dropped (``"drop"``); one with nothing to train on is skipped. Both are counted in
``ChatStats`` so the caller can report them once.

Batches: a conversation of n tokens fills n - 1 slots of a row (inputs ``ids[:-1]``, targets
``ids[1:]``). With packing, several conversations share a row; position ids restart at 0 for
each and a block-diagonal causal mask keeps them from attending to one another, so a packed
row computes exactly what its conversations would alone. Without packing, each row holds one
conversation, right-padded: padding comes after every real token, so plain causal attention
never sees it, and its targets are ignored (-100).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from gptlab.data.documents import jsonl_records
from gptlab.data.loader import to_device
from gptlab.errors import UserError
from gptlab.logprobs import IGNORE, segment_mask
from gptlab.tokenizer import Tokenizer

TRUNCATION = ("turn", "drop")


@dataclass
class Example:
    """A rendered record: ``mask[i] == 1`` where ``ids[i]`` is a target the loss trains on;
    ``cuts`` are the lengths at which it may be truncated (after a trained reply)."""

    ids: list[int]
    mask: list[int]
    cuts: list[int]


@dataclass
class ChatStats:
    """What became of the records of one file."""

    records: int = 0
    kept: int = 0
    truncated: int = 0  # kept, cut after the last assistant reply that fits
    no_assistant: int = 0  # skipped: no assistant reply to train on
    too_long: int = 0  # skipped: longer than max_len (or no reply fits, with truncation="turn")

    def to_dict(self) -> dict:
        return asdict(self)

    def warning(self, path: str | os.PathLike, max_len: int) -> str | None:
        """One line about skipped and truncated records, or None when every record was used whole."""
        parts = []
        if self.no_assistant:
            parts.append(f"skipped {self.no_assistant} with no assistant reply")
        if self.too_long:
            parts.append(f"skipped {self.too_long} longer than {max_len} tokens")
        if self.truncated:
            parts.append(f"truncated {self.truncated} after the last reply within {max_len} tokens")
        if not parts:
            return None
        return f"{path}: of {self.records} conversations, " + "; ".join(parts) + f"; {self.kept} used"


def read_records(path: str | os.PathLike) -> Iterator[tuple[int, dict]]:
    """Yield (line number, record) for each non-blank line of a JSONL file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"chat data file {path} does not exist; check the data.train / data.val paths")
    yield from jsonl_records(path)


def encode_record(tokenizer: Tokenizer, record: dict) -> Example:
    """Render one record (see the module docstring) to ids, loss mask and allowed cuts."""
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list):
            raise UserError("'messages' must be a list of {'role', 'content'} objects")
        return _encode_messages(tokenizer, messages, trained_from=0)
    if "prompt" in record and "completion" in record:
        prompt, completion = record["prompt"], record["completion"]
        if isinstance(prompt, str) and isinstance(completion, str):
            return _encode_text(tokenizer, prompt, completion)
        if isinstance(prompt, list) and isinstance(completion, list):
            return _encode_messages(tokenizer, prompt + completion, trained_from=len(prompt))
        raise UserError("'prompt' and 'completion' must both be strings or both be lists of messages")
    raise UserError("expected a 'messages' list, or 'prompt' and 'completion'")


def _encode_messages(tokenizer: Tokenizer, messages: list, trained_from: int) -> Example:
    """Messages through the chat template; replies before message ``trained_from`` are context."""
    chat = tokenizer.render_chat(messages)
    start = chat.message_ends[trained_from - 1] if trained_from else 0
    mask = [0] * start + chat.assistant_mask[start:]
    cuts = [end for k, end in enumerate(chat.message_ends) if k >= trained_from and messages[k]["role"] == "assistant"]
    return Example(chat.ids, mask, cuts)


def _encode_text(tokenizer: Tokenizer, prompt: str, completion: str) -> Example:
    # Encoded apart and joined, so the prompt/completion boundary is a token boundary by construction.
    bos = [tokenizer.bos_id] if tokenizer.bos_id is not None else []
    eos = [tokenizer.eos_id] if tokenizer.eos_id is not None else []
    head = bos + tokenizer.encode(prompt, add_special_tokens=False)
    tail = tokenizer.encode(completion, add_special_tokens=False) + eos
    ids = head + tail
    return Example(ids, [0] * len(head) + [1] * len(tail), [len(ids)])


def fit(example: Example, max_len: int, truncation: str) -> tuple[Example | None, str]:
    """(the example as trained, what happened: "kept" | "truncated" | "no_assistant" | "too_long")."""
    if not any(example.mask[1:]):  # the first token is never a target: nothing comes before it
        return None, "no_assistant"
    if len(example.ids) <= max_len:
        return example, "kept"
    if truncation == "turn":
        cuts = [c for c in example.cuts if c <= max_len]  # each cut ends a trained reply
        if cuts:
            end = cuts[-1]
            return Example(example.ids[:end], example.mask[:end], cuts), "truncated"
    return None, "too_long"


def load_chat_data(
    path: str | os.PathLike, tokenizer: Tokenizer, max_len: int, truncation: str = "turn"
) -> tuple[list[Example], ChatStats]:
    """Every usable record of a JSONL file, rendered and fitted to ``max_len`` tokens.

    A malformed record is a UserError naming the file and line; skipped ones are only counted.
    """
    if truncation not in TRUNCATION:
        raise UserError(f"truncation must be 'turn' or 'drop', got {truncation!r}")
    examples, stats = [], ChatStats()
    for number, record in read_records(path):
        stats.records += 1
        try:
            example = encode_record(tokenizer, record)
        except UserError as e:
            raise UserError(f"{path}:{number}: {e}") from None
        example, outcome = fit(example, max_len, truncation)
        if outcome == "truncated":
            stats.truncated += 1
        elif outcome != "kept":
            setattr(stats, outcome, getattr(stats, outcome) + 1)
            continue
        stats.kept += 1
        examples.append(example)
    return examples, stats


def pack(lengths: Sequence[int], order: Sequence[int], capacity: int, packing: bool = True) -> list[list[int]]:
    """Rows of example indices, visiting ``order``: each example in turn joins the current row if its
    ``length - 1`` slots still fit, else starts the next one (no packing: one example per row)."""
    if not packing:
        return [[int(i)] for i in order]
    rows: list[list[int]] = []
    used = capacity  # forces a new row for the first example
    for i in order:
        need = lengths[i] - 1
        if used + need > capacity:
            rows.append([])
            used = 0
        rows[-1].append(int(i))
        used += need
    return rows


def collate(
    examples: Sequence[Example], rows: Sequence[Sequence[int]], seq_len: int, pad_id: int, packing: bool
) -> dict:
    """Tensors for ``rows`` of examples: ``input_ids`` and ``labels`` (B, T), and, when packing,
    ``position_ids`` and ``segment_ids`` (B, T), the index of each slot's conversation in its row
    (-1 for the padding tail); otherwise those are None (default positions and causal attention
    are right for one right-padded example per row). ``packed_attention_mask`` turns segment ids
    into the mask on the batch's device, so (B, T) ids travel instead of a (B, 1, T, T) mask."""
    B = len(rows)
    x = np.full((B, seq_len), pad_id, dtype=np.int64)
    y = np.full((B, seq_len), IGNORE, dtype=np.int64)
    positions = np.zeros((B, seq_len), dtype=np.int64)
    segment = np.full((B, seq_len), -1, dtype=np.int64)  # the padding tail is a segment of its own
    for b, row in enumerate(rows):
        at = 0
        for s, i in enumerate(row):
            ids, trained = np.asarray(examples[i].ids), np.asarray(examples[i].mask, dtype=bool)
            n = len(ids) - 1
            x[b, at : at + n] = ids[:-1]
            y[b, at : at + n] = np.where(trained[1:], ids[1:], IGNORE)
            positions[b, at : at + n] = np.arange(n)
            segment[b, at : at + n] = s
            at += n
        positions[b, at:] = np.arange(seq_len - at)
    batch = {"input_ids": torch.from_numpy(x), "labels": torch.from_numpy(y), "position_ids": None, "segment_ids": None}
    if packing:
        batch["position_ids"] = torch.from_numpy(positions)
        batch["segment_ids"] = torch.from_numpy(segment)
    return batch


def packed_attention_mask(segment_ids: torch.Tensor | None) -> torch.Tensor | None:
    """The block-diagonal causal mask (B, 1, T, T) of packed rows, True where a query may attend a
    key: earlier slots of its own conversation. None (plain causal attention) without packing."""
    return None if segment_ids is None else segment_mask(segment_ids)


class ChatBatches:
    """The SFT batch source: endless, deterministic, exactly resumable, rank-aware.

    Epoch ``e`` shuffles the examples with ``(seed, e)`` and packs them into rows. Call ``k``
    reads the next ``micro_batch_size * world_size`` rows of that endless sequence (crossing
    into the next epoch when one ends) and rank ``r`` keeps its own ``micro_batch_size`` of them,
    so what a step sees does not depend on the number of ranks. The state is (epoch, row).
    """

    def __init__(
        self,
        examples: list[Example],
        *,
        seq_len: int,
        micro_batch_size: int,
        pad_id: int,
        packing: bool = True,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        device: torch.device | str = "cpu",
    ):
        if not examples:
            raise UserError("no conversation to train on: give at least one that ends with an assistant reply")
        longest = max(len(e.ids) for e in examples)
        if longest > seq_len:
            raise ValueError(f"an example of {longest} tokens does not fit seq_len {seq_len}: fit() them first")
        self.examples, self.seq_len, self.micro, self.pad_id = examples, seq_len, micro_batch_size, pad_id
        self.packing, self.seed, self.rank, self.world_size = packing, seed, rank, world_size
        self.device = torch.device(device)
        self.lengths = [len(e.ids) for e in examples]
        self.epoch = self.row = 0
        self._rows: tuple[int, list[list[int]]] | None = None

    def rows_of(self, epoch: int) -> list[list[int]]:
        if self._rows is None or self._rows[0] != epoch:
            order = np.random.default_rng([self.seed, epoch]).permutation(len(self.examples))
            self._rows = (epoch, pack(self.lengths, order, self.seq_len, self.packing))
        return self._rows[1]

    def next_batch(self) -> dict:
        taken = []
        for _ in range(self.micro * self.world_size):
            rows = self.rows_of(self.epoch)
            taken.append(rows[self.row])
            self.row += 1
            if self.row == len(rows):
                self.epoch, self.row = self.epoch + 1, 0
        mine = taken[self.rank * self.micro : (self.rank + 1) * self.micro]
        return to_device(collate(self.examples, mine, self.seq_len, self.pad_id, self.packing), self.device)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "row": self.row}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.row = int(state["epoch"]), int(state["row"])


def eval_batches(
    examples: list[Example],
    *,
    seq_len: int,
    micro_batch_size: int,
    pad_id: int,
    packing: bool,
    max_batches: int,
    rank: int = 0,
    world_size: int = 1,
) -> list[dict]:
    """Up to ``max_batches`` batches for this rank over the examples in file order (no shuffle),
    so a validation loss compares across steps and runs. Every rank gets as many batches (a
    sharded model's forward is collective), so a remainder of rows is left out."""
    rows = pack([len(e.ids) for e in examples], range(len(examples)), seq_len, packing)
    rows = rows[: len(rows) // world_size * world_size]
    mine = rows[rank::world_size][: max_batches * micro_batch_size]
    return [
        collate(examples, mine[i : i + micro_batch_size], seq_len, pad_id, packing)
        for i in range(0, len(mine), micro_batch_size)
    ]
