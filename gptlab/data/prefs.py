"""Preference data for the reward model and DPO: JSONL pairs -> token ids + completion masks -> batches.

Records, one JSON object per line (TRL's preference formats):

- conversational, explicit prompt: ``{"prompt": [messages], "chosen": [messages], "rejected": [messages]}``
  (what TinyWorld's ``prefs/*.jsonl`` holds);
- standard: ``{"prompt": "text", "chosen": "text", "rejected": "text"}``;
- implicit prompt: ``{"chosen": [messages], "rejected": [messages]}`` (or two strings), the two
  full conversations sharing a prefix, which is the prompt.

An optional ``margin`` (a number) is the reward model's required margin for the pair; other
scalar fields (TinyWorld's ``kind`` and ``family``) travel along as ``Pair.meta``.

Each answer is rendered after its prompt exactly as SFT renders a prompt-completion record
(``gptlab.data.chat.encode_record``): through the chat template for messages, as
``<|bos|> prompt completion <|eos|>`` for strings. The prompt is every token before the first
trained one (for a chat, up to and including the ``<|assistant|>`` header, as TRL's generation
prompt), so only the answer's own tokens count in its log-prob, and the two answers share the
prompt's ids by construction.

A pair longer than ``max_length`` has its prompt cut from the left (``truncation="keep_end"``,
keeping at least one prompt token, as the first answer token is predicted from it) or is
dropped (``"drop"``); ``max_prompt_length`` cuts every prompt from the left first. Both are
counted in ``PrefStats``. The two answers of a pair always travel in the same micro-batch: rows
``0..B-1`` are the chosen answers and rows ``B..2B-1`` the rejected ones, in the same order.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from gptlab.data.chat import encode_record, read_records
from gptlab.data.loader import to_device
from gptlab.errors import UserError
from gptlab.tokenizer import Tokenizer

PREF_TRUNCATION = ("keep_end", "drop")
_PAIR_FIELDS = ("prompt", "chosen", "rejected", "margin")


@dataclass
class PrefDataConfig:
    """The ``data`` table of the preference stages. ``max_length`` is ``train.seq_len``."""

    train: str = "data/world/prefs/train.jsonl"
    val: str | None = None  # a held-out JSONL file for the eval_ metrics; None: no validation
    max_prompt_length: int | None = None  # cut every prompt from its left to this many tokens
    truncation: str = "keep_end"  # over-long pair: keep_end (cut the prompt from the left) | drop

    def __post_init__(self):
        if self.truncation not in PREF_TRUNCATION:
            raise ValueError(f"data.truncation must be 'keep_end' or 'drop', got {self.truncation!r}")
        if self.max_prompt_length is not None and self.max_prompt_length < 1:
            raise ValueError(f"data.max_prompt_length must be >= 1, got {self.max_prompt_length}")


@dataclass
class Pair:
    """One rendered preference pair. ``*_mask[i] == 1`` where the answer's token i is trained."""

    index: int  # the record's position among its file's records: reference log-probs are keyed by it
    prompt: list[int]
    chosen: list[int]
    rejected: list[int]
    chosen_mask: list[int]
    rejected_mask: list[int]
    margin: float = 0.0
    meta: dict = field(default_factory=dict)

    @property
    def length(self) -> int:
        """Tokens of the longer of the two sequences."""
        return len(self.prompt) + max(len(self.chosen), len(self.rejected))


@dataclass
class PrefStats:
    """What became of the records of one file."""

    records: int = 0
    kept: int = 0
    truncated: int = 0  # kept, prompt cut from the left
    dropped: int = 0  # longer than max_length even with a one-token prompt, or truncation="drop"

    def to_dict(self) -> dict:
        return asdict(self)

    def warning(self, path: str | os.PathLike, max_length: int) -> str | None:
        """One line about dropped and truncated pairs, or None when every pair was used whole."""
        parts = []
        if self.dropped:
            parts.append(f"dropped {self.dropped} longer than {max_length} tokens")
        if self.truncated:
            parts.append(f"cut the prompt of {self.truncated} from the left")
        if not parts:
            return None
        return f"{path}: of {self.records} preference pairs, " + "; ".join(parts) + f"; {self.kept} used"


def encode_answer(tokenizer: Tokenizer, prompt, answer) -> tuple[list[int], list[int], int]:
    """(ids, trained mask, prompt length) of one answer after its prompt. A prompt is a string or a
    list of messages; an answer a string, an assistant message or a list of messages (a string
    after a message prompt is the assistant's reply)."""
    if isinstance(prompt, list) and isinstance(answer, str):
        answer = [{"role": "assistant", "content": answer}]
    elif isinstance(prompt, list) and isinstance(answer, dict):
        answer = [answer]
    example = encode_record(tokenizer, {"prompt": prompt, "completion": answer})
    trained = [i for i, m in enumerate(example.mask) if m]
    if not trained:
        raise UserError("an answer has no assistant reply to score: give it one")
    start = trained[0]
    return example.ids, example.mask, start


def encode_pair(tokenizer: Tokenizer, record: dict, index: int) -> Pair:
    """Render one record (see the module docstring); a malformed one is a UserError."""
    if not isinstance(record, dict) or "chosen" not in record or "rejected" not in record:
        raise UserError("a preference record needs 'chosen' and 'rejected' (and a 'prompt', or a shared prefix)")
    prompt, chosen, rejected = _explicit(record)
    if chosen == rejected:
        raise UserError("'chosen' and 'rejected' are the same answer: a preference pair must differ")
    margin = record.get("margin", 0.0)
    if isinstance(margin, bool) or not isinstance(margin, (int, float)):
        raise UserError(f"'margin' must be a number, got {margin!r}")
    chosen_ids, chosen_mask, start = encode_answer(tokenizer, prompt, chosen)
    rejected_ids, rejected_mask, rejected_start = encode_answer(tokenizer, prompt, rejected)
    if rejected_start != start or rejected_ids[:start] != chosen_ids[:start]:
        raise UserError("the two answers do not render after the same prompt: give them the same form")
    meta = {k: v for k, v in record.items() if k not in _PAIR_FIELDS and isinstance(v, (str, int, float, bool))}
    return Pair(
        index,
        chosen_ids[:start],
        chosen_ids[start:],
        rejected_ids[start:],
        chosen_mask[start:],
        rejected_mask[start:],
        float(margin),
        meta,
    )


def _explicit(record: dict) -> tuple:
    """(prompt, chosen, rejected), the implicit-prompt form split at the answers' shared prefix."""
    chosen, rejected = record["chosen"], record["rejected"]
    for name, value in (("chosen", chosen), ("rejected", rejected)):
        if not isinstance(value, (str, list)):
            raise UserError(f"'{name}' must be a string or a list of messages, got {type(value).__name__}")
    if "prompt" in record:
        prompt = record["prompt"]
        if not isinstance(prompt, (str, list)):
            raise UserError(f"'prompt' must be a string or a list of messages, got {type(prompt).__name__}")
        if isinstance(prompt, str) and not (isinstance(chosen, str) and isinstance(rejected, str)):
            raise UserError("a string 'prompt' needs string 'chosen' and 'rejected' answers")
        return prompt, chosen, rejected
    if type(chosen) is not type(rejected):
        raise UserError("'chosen' and 'rejected' must both be strings or both be lists of messages")
    shared = 0
    while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
        shared += 1
    if isinstance(chosen, str):
        shared = chosen.rfind(" ", 0, shared + 1) + 1 if shared < len(chosen) else shared  # at a word boundary
    return chosen[:shared], chosen[shared:], rejected[shared:]


def fit_pair(pair: Pair, max_length: int, max_prompt_length: int | None, truncation: str) -> tuple[Pair | None, str]:
    """(the pair as trained, "kept" | "truncated" | "dropped")."""
    prompt = pair.prompt
    if max_prompt_length is not None and len(prompt) > max_prompt_length:
        if truncation == "drop":
            return None, "dropped"
        prompt = prompt[-max_prompt_length:]
    room = max_length - max(len(pair.chosen), len(pair.rejected))
    if len(prompt) > room:
        if truncation == "drop" or room < 1:
            return None, "dropped"
        prompt = prompt[-room:]
    if len(prompt) == len(pair.prompt):
        return pair, "kept"
    return Pair(
        pair.index, prompt, pair.chosen, pair.rejected, pair.chosen_mask, pair.rejected_mask, pair.margin, pair.meta
    ), "truncated"


def load_pref_data(
    path: str | os.PathLike,
    tokenizer: Tokenizer,
    max_length: int,
    max_prompt_length: int | None = None,
    truncation: str = "keep_end",
) -> tuple[list[Pair], PrefStats]:
    """Every usable pair of a JSONL file, rendered and fitted to ``max_length`` tokens. A malformed
    record is a UserError naming the file and line; dropped ones are only counted."""
    if truncation not in PREF_TRUNCATION:
        raise UserError(f"truncation must be 'keep_end' or 'drop', got {truncation!r}")
    pairs, stats = [], PrefStats()
    for number, record in read_records(path):
        try:
            pair = encode_pair(tokenizer, record, stats.records)
        except UserError as e:
            raise UserError(f"{path}:{number}: {e}") from None
        stats.records += 1
        pair, outcome = fit_pair(pair, max_length, max_prompt_length, truncation)
        if pair is None:
            stats.dropped += 1
            continue
        stats.truncated += outcome == "truncated"
        stats.kept += 1
        pairs.append(pair)
    return pairs, stats


def load_preferences(
    data: PrefDataConfig, tokenizer: Tokenizer, max_length: int, warn: bool = True
) -> tuple[list[Pair], list[Pair], dict[str, PrefStats]]:
    """(train pairs, val pairs, stats per split) of a stage's ``data`` table; with ``warn``, one line
    on stderr per file that lost or cut pairs. No train pair left is a UserError."""
    stats: dict[str, PrefStats] = {}
    splits = {"train": data.train, "val": data.val}
    loaded = {"train": [], "val": []}
    for split, path in splits.items():
        if path is None:
            continue
        loaded[split], stats[split] = load_pref_data(
            path, tokenizer, max_length, data.max_prompt_length, data.truncation
        )
        warning = stats[split].warning(path, max_length)
        if warning and warn:
            print(f"gptlab: warning: {warning}", file=sys.stderr, flush=True)
    if not loaded["train"]:
        why = stats["train"].warning(data.train, max_length) or f"{data.train} holds no pairs"
        raise UserError(f"no preference pair to train on ({why}); raise train.seq_len or give shorter pairs")
    return loaded["train"], loaded["val"], stats


def collate_pairs(pairs: Sequence[Pair], pad_id: int) -> dict:
    """The tensors of a micro-batch of pairs (see the module docstring for the row order):
    ``input_ids``, ``attention_mask`` and ``completion_mask`` (2B, T), right-padded to the longest
    row; ``margin`` and ``index`` (B,)."""
    rows = [(p.prompt + p.chosen, p.chosen_mask, len(p.prompt)) for p in pairs]
    rows += [(p.prompt + p.rejected, p.rejected_mask, len(p.prompt)) for p in pairs]
    width = max(len(ids) for ids, _, _ in rows)
    ids = np.full((len(rows), width), pad_id, dtype=np.int64)
    real = np.zeros((len(rows), width), dtype=np.int64)
    completion = np.zeros((len(rows), width), dtype=np.int64)
    for row, (tokens, mask, start) in enumerate(rows):
        ids[row, : len(tokens)] = tokens
        real[row, : len(tokens)] = 1
        completion[row, start : len(tokens)] = mask
    return {
        "input_ids": torch.from_numpy(ids),
        "attention_mask": torch.from_numpy(real),
        "completion_mask": torch.from_numpy(completion),
        "margin": torch.tensor([p.margin for p in pairs], dtype=torch.float32),
        "index": torch.tensor([p.index for p in pairs], dtype=torch.long),
    }


class PairBatches:
    """The preference batch source: endless, deterministic, exactly resumable, rank-aware.

    Epoch ``e`` shuffles the pairs with ``(seed, e)``. Call ``k`` reads the next
    ``micro_batch_size * world_size`` pairs of that endless sequence and rank ``r`` keeps its own
    ``micro_batch_size`` of them, so what a step sees does not depend on the number of ranks.
    The state is (epoch, position).
    """

    def __init__(
        self,
        pairs: list[Pair],
        *,
        micro_batch_size: int,
        pad_id: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        device: torch.device | str = "cpu",
    ):
        if not pairs:
            raise UserError("no preference pair to train on: give at least one")
        self.pairs, self.micro, self.pad_id = pairs, micro_batch_size, pad_id
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.device = torch.device(device)
        self.epoch = self.position = 0
        self._order: tuple[int, np.ndarray] | None = None

    def order_of(self, epoch: int) -> np.ndarray:
        if self._order is None or self._order[0] != epoch:
            self._order = (epoch, np.random.default_rng([self.seed, epoch]).permutation(len(self.pairs)))
        return self._order[1]

    def next_batch(self) -> dict:
        taken = []
        for _ in range(self.micro * self.world_size):
            taken.append(self.pairs[self.order_of(self.epoch)[self.position]])
            self.position += 1
            if self.position == len(self.pairs):
                self.epoch, self.position = self.epoch + 1, 0
        mine = taken[self.rank * self.micro : (self.rank + 1) * self.micro]
        return to_device(collate_pairs(mine, self.pad_id), self.device)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


def eval_pair_batches(
    pairs: list[Pair], *, micro_batch_size: int, pad_id: int, max_batches: int, rank: int = 0, world_size: int = 1
) -> list[dict]:
    """Up to ``max_batches`` batches for this rank over the pairs in file order (no shuffle), so the
    eval_ metrics compare across steps and runs. Every rank gets as many batches (a sharded
    model's forward is collective), so a remainder of pairs is left out."""
    usable = pairs[: len(pairs) // world_size * world_size]
    mine = usable[rank::world_size][: max_batches * micro_batch_size]
    return [collate_pairs(mine[i : i + micro_batch_size], pad_id) for i in range(0, len(mine), micro_batch_size)]
