"""Rollouts for the RL stages (PPO, GRPO): prompts from JSONL, answers sampled with the engine from
the weights being trained, and the batch source that hands them to the training loop.

Prompts, one JSON object per line (TRL's prompt-only formats, and TinyWorld's files as they are):

- ``{"prompt": [messages]}``: rendered with the chat template and its generation prompt
  (``...<|assistant|>``); the answer is one assistant reply, ending at ``<|end|>``;
- ``{"prompt": "text"}``: ``<|bos|> text``, the answer ending at ``<|eos|>`` (as SFT renders text);
- ``{"messages": [...]}`` (an SFT file): the messages before the last assistant reply;
- ``{"question": "text"}`` (a GSM8K-style file such as TinyWorld's ``bench/arith``): one user message.

The record's other fields (TinyWorld's ``family``, a GSM8K ``answer``) reach the reward functions
as keyword arguments, as TRL passes a dataset's columns. A prompt longer than ``train.seq_len -
max_new_tokens`` tokens (or ``data.max_prompt_length``) is cut from its left.

A rollout is a batch of sequences ``[left padding | prompt | answer | right padding]``: every
answer starts in the same column, so per-token tensors are (rows, answer length) in *response
layout* (``gptlab.align.rl``). The engine samples at ``temperature`` / ``top_p``, stopping after
the end-of-turn token (or EOS), and returns the log-prob of each sampled token. Rollout ``k`` on
rank ``r`` is seeded from (run seed, k, r), and its prompts are the next ones of an endless
shuffled order seeded from (run seed, epoch), so a resumed run draws the same rollouts as one that
ran straight through.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from gptlab.data.chat import read_records
from gptlab.engine import Engine
from gptlab.errors import UserError
from gptlab.logprobs import IGNORE, padded_inputs, token_logprobs
from gptlab.model import GPT, disable_dropout
from gptlab.tokenizer import Tokenizer
from gptlab.train.loop import Runtime

PROMPT_FIELDS = ("prompt", "messages", "question")


@dataclass
class PromptDataConfig:
    """The ``data`` table of the RL stages."""

    prompts: str = "data/world/sft/train.jsonl"
    max_prompt_length: int | None = None  # cut every prompt from its left to this many tokens
    families: list[str] | None = None  # keep only records whose "family" is one of these (TinyWorld's carry one)

    def __post_init__(self):
        if self.max_prompt_length is not None and self.max_prompt_length < 1:
            raise ValueError(f"data.max_prompt_length must be >= 1, got {self.max_prompt_length}")
        if self.families is not None and not self.families:
            raise ValueError("data.families is empty: name at least one family, or leave it unset for all records")


@dataclass
class Prompt:
    """One prompt: as the file gives it (for the reward functions), rendered, and its other fields."""

    index: int
    prompt: str | list[dict]
    ids: list[int]
    columns: dict = field(default_factory=dict)

    @property
    def conversational(self) -> bool:
        return isinstance(self.prompt, list)


@dataclass
class PromptStats:
    records: int = 0
    skipped: int = 0  # of another family than data.families
    truncated: int = 0  # cut from the left to fit

    def to_dict(self) -> dict:
        return asdict(self)


def record_prompt(record: dict) -> str | list[dict]:
    """The prompt of a record (see the module docstring), or a UserError saying what is missing."""
    if "prompt" in record:
        prompt = record["prompt"]
        if isinstance(prompt, str) or (isinstance(prompt, list) and prompt):
            return prompt
        raise UserError("'prompt' must be a string or a non-empty list of messages")
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            raise UserError("'messages' must be a non-empty list of {'role', 'content'} objects")
        replies = [i for i, m in enumerate(messages) if isinstance(m, dict) and m.get("role") == "assistant"]
        prompt = messages[: replies[-1]] if replies else messages
        if not prompt:
            raise UserError("'messages' holds no message before its assistant reply")
        return prompt
    if "question" in record:
        if not isinstance(record["question"], str):
            raise UserError("'question' must be a string")
        return [{"role": "user", "content": record["question"]}]
    raise UserError("expected a 'prompt' (a string or a list of messages), 'messages' or 'question'")


def encode_prompt(tokenizer: Tokenizer, prompt: str | list[dict]) -> list[int]:
    """The ids the policy continues: the chat template with its generation prompt, or BOS + text."""
    if isinstance(prompt, list):
        return tokenizer.apply_chat_template(prompt, add_generation_prompt=True)
    bos = [tokenizer.bos_id] if tokenizer.bos_id is not None else []
    return bos + tokenizer.encode(prompt, add_special_tokens=False)


def load_prompts(
    path: str | os.PathLike,
    tokenizer: Tokenizer,
    max_tokens: int,
    families: list[str] | None = None,
    warn: bool = True,
) -> tuple[list[Prompt], PromptStats]:
    """Every prompt of a JSONL file (of ``families``, when given), rendered and cut from the left to
    ``max_tokens``. A malformed record is a UserError naming the file and line; a file with no
    prompt is one too."""
    prompts, stats = [], PromptStats()
    for number, record in read_records(path):
        if families is not None and record.get("family") not in families:
            stats.skipped += 1
            continue
        try:
            prompt = record_prompt(record)
            ids = encode_prompt(tokenizer, prompt)
        except UserError as e:
            raise UserError(f"{path}:{number}: {e}") from None
        if len(ids) > max_tokens:
            ids, stats.truncated = ids[-max_tokens:], stats.truncated + 1
        columns = {key: value for key, value in record.items() if key not in PROMPT_FIELDS}
        prompts.append(Prompt(stats.records, prompt, ids, columns))
        stats.records += 1
    if not prompts:
        of = f" of the families {', '.join(families)}" if families is not None else ""
        raise UserError(f"{path} holds no prompts{of}; give one JSON object per line with a 'prompt'")
    if stats.truncated and warn:
        print(
            f"gptlab: warning: {path}: cut {stats.truncated} of {stats.records} prompts from the left to "
            f"{max_tokens} tokens",
            file=sys.stderr,
            flush=True,
        )
    return prompts, stats


# ----------------------------------------------------------------------------- sampling


@dataclass(frozen=True)
class RolloutSampling:
    """How answers are sampled; ``temperature`` also divides the logits whenever log-probs are taken."""

    max_new_tokens: int
    temperature: float = 1.0
    top_p: float | None = None


def check_sampling(max_new_tokens: int, temperature: float, top_p: float | None) -> None:
    """The sampling keys a stage config shares (raised as ValueError: the config system names them)."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if not 0 < temperature < float("inf"):
        raise ValueError(f"temperature must be a positive finite number (RL samples), got {temperature}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")


def rollout_seed(seed: int, rollout: int, rank: int) -> int:
    """The engine's seed for rollout ``rollout`` on rank ``rank`` of a run seeded ``seed``."""
    return int(np.random.SeedSequence([seed, rollout, rank]).generate_state(1, dtype=np.uint64)[0])


@dataclass
class Rollout:
    """Sampled answers (``n`` rows per prompt, in the prompts' order) as tensors: ``input_ids`` and
    ``attention_mask`` (N, P + L), the answers starting at column ``prompt_width`` P; ``response_mask``
    (N, L); ``ended`` (N,): whether the answer stopped at a stop token; ``logprobs`` (N, L): the
    engine's log-probs of the sampled tokens (of the raw logits), 0 on padding."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    response_mask: torch.Tensor
    ended: torch.Tensor
    logprobs: torch.Tensor
    prompt_width: int
    prompts: list[Prompt]
    responses: list[list[int]]

    def batch(self) -> dict:
        """The tensors a forward pass reads."""
        return {
            "input_ids": self.input_ids,
            "attention_mask": self.attention_mask,
            "response_mask": self.response_mask,
            "prompt_width": self.prompt_width,
        }


def sample_rollout(
    engine: Engine, prompts: list[Prompt], n: int, sampling: RolloutSampling, seed: int, stop_ids: list[int]
) -> Rollout:
    """``n`` answers to each prompt from the engine's model (its current weights)."""
    device = next(engine.model.parameters()).device
    tokens, logprobs = engine.generate(
        [p.ids for p in prompts],
        sampling.max_new_tokens,
        temperature=sampling.temperature,
        top_p=sampling.top_p,
        seed=seed,
        stop_ids=stop_ids,
        return_logprobs=True,
        n=n,
    )
    rows = [prompt for prompt in prompts for _ in range(n)]
    width, length = max(len(p.ids) for p in prompts), max(map(len, tokens))
    ids = torch.zeros(len(rows), width + length, dtype=torch.long)
    real = torch.zeros_like(ids)
    response_logprobs = torch.zeros(len(rows), length)
    for row, (prompt, answer, answer_logprobs) in enumerate(zip(rows, tokens, logprobs)):
        ids[row, width - len(prompt.ids) : width] = torch.tensor(prompt.ids)
        ids[row, width : width + len(answer)] = torch.tensor(answer)
        real[row, width - len(prompt.ids) : width + len(answer)] = 1
        response_logprobs[row, : len(answer)] = torch.tensor(answer_logprobs)
    stops = set(stop_ids)
    return Rollout(
        ids.to(device),
        real.to(device),
        real[:, width:].float().to(device),
        torch.tensor([bool(answer) and answer[-1] in stops for answer in tokens], device=device),
        response_logprobs.to(device),
        width,
        rows,
        tokens,
    )


def stop_ids_of(tokenizer: Tokenizer) -> list[int]:
    """Where an answer ends: the end-of-turn token and EOS (an answer to a text prompt ends at EOS)."""
    return [t for t in (tokenizer.end_id, tokenizer.eos_id) if t is not None]


def completion_texts(tokenizer: Tokenizer, rollout: Rollout, stop_ids: list[int]) -> list[str]:
    """Each answer's text, without its stop token and special tokens (as TRL decodes completions)."""
    stops = set(stop_ids)
    texts = []
    for answer in rollout.responses:
        kept = answer[:-1] if answer and answer[-1] in stops else answer
        texts.append(tokenizer.decode(kept, skip_special_tokens=True))
    return texts


# ----------------------------------------------------------------------------- log-probs


def forward_inputs(batch: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(position ids, attention mask) of a rollout batch: positions count real tokens, so a row
    reads the same whatever its padding."""
    return padded_inputs(batch["attention_mask"])


def response_logits(logits: torch.Tensor, batch: dict, temperature: float) -> torch.Tensor:
    """(B, L, V): the logits that predict the answer's tokens (position t predicts t + 1),
    divided by the sampling temperature (TRL's convention)."""
    start = batch["prompt_width"] - 1
    length = batch["response_mask"].size(1)
    return logits[:, start : start + length].float() / temperature


def response_logprobs(logits: torch.Tensor, batch: dict) -> torch.Tensor:
    """(B, L): log-probs of the answer's tokens under ``logits`` (see ``response_logits``), 0 on padding."""
    width = batch["prompt_width"]
    answers = batch["input_ids"][:, width : width + batch["response_mask"].size(1)]
    return token_logprobs(logits, torch.where(batch["response_mask"].bool(), answers, IGNORE))


def policy_logprobs(model: torch.nn.Module, batch: dict, temperature: float) -> torch.Tensor:
    """A causal LM's log-probs of a rollout's answer tokens (B, L) at ``temperature``."""
    positions, mask = forward_inputs(batch)
    logits = model(batch["input_ids"], position_ids=positions, attn_mask=mask)
    return response_logprobs(response_logits(logits, batch, temperature), batch)


class FrozenPolicy:
    """A model that never changes (the reference): eval mode, no gradients, never updated."""

    def __init__(self, model: torch.nn.Module):
        self.model = model.eval().requires_grad_(False)

    @torch.no_grad()
    def logprobs(self, batch: dict, temperature: float) -> torch.Tensor:
        return policy_logprobs(self.model, batch, temperature)


# ----------------------------------------------------------------------------- the batch source

Collect = Callable[[list[Prompt], int], dict]


class RolloutBatches:
    """The RL stages' batch source: a rollout, then ``epochs`` passes over it in ``minibatches``
    optimizer steps, each of ``grad_accum`` micro-batches; then the next rollout.

    A rollout takes the next ``prompts_per_rollout`` prompts of the endless order (epoch ``e``
    shuffled with ``(seed, e)``); rank ``r`` keeps its contiguous share and ``collect(prompts,
    rollout index)`` samples and scores them into a buffer: ``{"rows": {name: tensor (N, ...)},
    "prompt_width": P, "metrics": {name: float}}``. Each pass visits the buffer's rows in an order
    seeded from (seed, rollout, pass, rank). Every micro-batch carries the rollout's metrics and
    ``tokens_share``: its optimizer step's answer tokens over all ranks, divided by the number of
    micro-batches and ranks (for losses normalised by the step's token count).

    Checkpoints fall between rollouts (the stages require ``train.save_every`` and
    ``train.max_steps`` to be multiples of a rollout's steps), so the state is three counters: a
    resumed run samples its next rollout from the same weights, prompts and seed.
    """

    def __init__(
        self,
        prompts: list[Prompt],
        collect: Collect,
        *,
        prompts_per_rollout: int,
        rows_per_step: int,
        micro_batch_size: int,
        minibatches: int,
        epochs: int,
        seed: int,
        runtime: Runtime,
    ):
        self.prompts, self.collect = prompts, collect
        self.prompts_per_rollout, self.rows_per_step, self.micro = prompts_per_rollout, rows_per_step, micro_batch_size
        self.minibatches, self.epochs, self.seed, self.runtime = minibatches, epochs, seed, runtime
        self.rollouts = 0  # rollouts collected so far
        self.prompt_epoch = self.prompt_position = 0
        self.queue: list[dict] = []  # the current rollout's micro-batches not handed out yet
        self._order: tuple[int, np.ndarray] | None = None

    def next_batch(self) -> dict:
        if not self.queue:
            self.queue = self._schedule(self.collect(self._next_prompts(), self.rollouts))
            self.rollouts += 1
        return self.queue.pop(0)

    def _next_prompts(self) -> list[Prompt]:
        taken = []
        for _ in range(self.prompts_per_rollout):
            if self._order is None or self._order[0] != self.prompt_epoch:
                permutation = np.random.default_rng([self.seed, self.prompt_epoch]).permutation(len(self.prompts))
                self._order = (self.prompt_epoch, permutation)
            taken.append(self.prompts[self._order[1][self.prompt_position]])
            self.prompt_position += 1
            if self.prompt_position == len(self.prompts):
                self.prompt_epoch, self.prompt_position = self.prompt_epoch + 1, 0
        share = self.prompts_per_rollout // self.runtime.world_size
        return taken[self.runtime.rank * share : (self.runtime.rank + 1) * share]

    def _schedule(self, buffer: dict) -> list[dict]:
        """The rollout's micro-batches in the order the loop takes them."""
        rows, mask = buffer["rows"], buffer["rows"]["response_mask"]
        local_rows = self.rows_per_step // self.runtime.world_size
        steps = []
        for epoch in range(self.epochs):
            order = torch.from_numpy(
                np.random.default_rng([self.seed, self.rollouts, epoch, self.runtime.rank]).permutation(len(mask))
            )
            steps += [order[i * local_rows : (i + 1) * local_rows] for i in range(self.minibatches)]
        # Each step's answer tokens over all ranks: one reduction for the whole rollout.
        counts = torch.stack([mask[step].sum() for step in steps]).to(self.runtime.device, torch.float32)
        counts = self.runtime.mean(counts) * self.runtime.world_size
        micro_per_step = local_rows // self.micro
        metrics = {name: torch.tensor(value, device=self.runtime.device) for name, value in buffer["metrics"].items()}
        queue = []
        for step, count in zip(steps, counts):
            share = count / (micro_per_step * self.runtime.world_size)
            for i in range(micro_per_step):
                picked = step[i * self.micro : (i + 1) * self.micro]
                batch = trimmed({name: value[picked] for name, value in rows.items()}, buffer["prompt_width"])
                queue.append({**batch, "metrics": metrics, "tokens_share": share})
        return queue

    def state_dict(self) -> dict:
        if self.queue:
            raise RuntimeError("a rollout's batches are still queued: checkpoints must fall between rollouts")
        return {"rollouts": self.rollouts, "prompt_epoch": self.prompt_epoch, "prompt_position": self.prompt_position}

    def load_state_dict(self, state: dict) -> None:
        self.rollouts = int(state["rollouts"])
        self.prompt_epoch, self.prompt_position = int(state["prompt_epoch"]), int(state["prompt_position"])
        self.queue = []


def trimmed(rows: dict, prompt_width: int) -> dict:
    """A micro-batch without the columns that are padding in all of its rows: the left padding its
    shortest-padded prompt does not need, and answer columns past its longest answer."""
    real = rows["attention_mask"].bool()
    lead = int(real.float().argmax(-1).min()) if real.size(1) else 0
    length = max(1, int(rows["response_mask"].sum(-1).max()))
    batch = {}
    for name, value in rows.items():
        if name in ("input_ids", "attention_mask"):
            batch[name] = value[:, lead : prompt_width + length]
        elif value.dim() == 2:
            batch[name] = value[:, :length]
        else:
            batch[name] = value
    batch["prompt_width"] = prompt_width - lead
    return batch


def check_rollout_shape(batch_size: int, world_size: int, minibatches: int, group_size: int) -> int:
    """Prompts per rollout (over all ranks), refusing shapes that cannot be split evenly."""
    rows = batch_size * minibatches
    if rows % (group_size * world_size):
        raise UserError(
            f"a rollout of {rows} answers (train.batch_size {batch_size} x {minibatches} steps) cannot be split into "
            f"groups of {group_size} answers over {world_size} processes; choose a train.batch_size that makes it "
            f"a multiple of {group_size * world_size}"
        )
    return rows // group_size


def check_whole_rollouts(max_steps: int, save_every: int, steps_per_rollout: int, why: str) -> None:
    """Checkpoints must fall between rollouts: a resumed run then samples from the weights an
    uninterrupted one sampled from. ``why`` names the keys that set ``steps_per_rollout``."""
    for key, value in (("train.max_steps", max_steps), ("train.save_every", save_every)):
        if value % steps_per_rollout:
            lower = value // steps_per_rollout * steps_per_rollout
            choices = f"{lower} or {lower + steps_per_rollout}" if lower else str(steps_per_rollout)
            raise ValueError(
                f"{key} {value} is not a multiple of a rollout's {steps_per_rollout} optimizer steps ({why}): "
                f"checkpoints fall between rollouts, so a resumed run samples as one that ran straight; use {choices}"
            )


# ----------------------------------------------------------------------------- the policy


def load_policy(init: str, seq_len: int, max_new_tokens: int, max_prompt_length: int | None):
    """(the policy, its tokenizer, the most prompt tokens a rollout keeps) from ``init``, refusing a
    folder whose tokenizer does not fit its model, a ``seq_len`` beyond the model's window and an
    answer length that leaves no room for a prompt. Dropout is off, as in TRL's RL trainers."""
    model = disable_dropout(GPT.from_pretrained(init, dtype=torch.float32))
    tokenizer = Tokenizer.from_pretrained(init)
    block_size = model.config.block_size
    if seq_len > block_size:
        raise UserError(
            f"train.seq_len {seq_len} is longer than the model's block_size {block_size}; "
            f"lower train.seq_len to at most {block_size}"
        )
    if tokenizer.vocab_size > model.config.vocab_size:
        raise UserError(
            f"the tokenizer in {init} has {tokenizer.vocab_size} tokens but the model only "
            f"{model.config.vocab_size}: the folder mixes files from different runs"
        )
    room = seq_len - max_new_tokens
    if room < 1:
        raise UserError(
            f"max_new_tokens {max_new_tokens} leaves no room for a prompt in train.seq_len {seq_len} (prompt + answer "
            "tokens); lower max_new_tokens"
        )
    return model, tokenizer, min(room, max_prompt_length or room)


def load_frozen(path: str, role: str, tokenizer: Tokenizer, model_class=GPT) -> torch.nn.Module:
    """A model read beside the policy (``role``: what it is for), which reads the policy's token ids,
    so it must have been trained with the policy's tokenizer."""
    model = disable_dropout(model_class.from_pretrained(path, dtype=torch.float32))
    if Tokenizer.from_pretrained(path).fingerprint != tokenizer.fingerprint:
        raise UserError(
            f"the {role} {path} has another tokenizer than the policy: it reads the policy's token ids; give a "
            "model trained with the policy's tokenizer"
        )
    return model


def refuse_fsdp(parallelism: str, stage: str) -> None:
    if parallelism == "fsdp":
        raise UserError(
            f"{stage} does not run under train.parallelism=fsdp yet (the engine samples from whole weights); "
            "use train.parallelism=ddp"
        )
