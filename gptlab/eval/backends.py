"""The model contract: lm-evaluation-harness's three requests, over three kinds of model.

- ``loglikelihood([(context, continuation)]) -> [(logprob, is_greedy)]``
- ``loglikelihood_rolling([text]) -> [logprob]``
- ``generate_until([GenerationRequest]) -> [text]``

Encoding follows lm-eval's ``hf`` backend with its defaults, so the numbers are the numbers
people compare against: trailing context whitespace moves into the continuation; the
continuation's tokens are ``tok(context + continuation)[len(tok(context)):]``, the tokenizer
adding its own special tokens (BOS for gptlab's) unless the text already starts with BOS; a
pair longer than the model is cut from the left. Where ``tok(context)`` is not a prefix of
``tok(context + continuation)`` (a token merging across the seam) that slice is not the
continuation: such pairs are counted (``counters["seam_merges"]``) and warned about, as are
truncations (``counters["truncated"]``).

Scoring is where the speed is. Requests that share a (truncated) context become one packed row:
the context once, then each continuation's tokens as its own segment that attends to the
context and to itself only (an explicit mask and position ids), so a 4-choice question costs
one context pass whatever the continuation lengths; one-token continuations (MMLU's " A".." D")
need no segment at all: all four are read from the context's last position. Rows that share a
long prefix (the description and shots of an MMLU subject) batch together and the gptlab
backend runs that prefix once into a KV cache; other rows batch by length, longest first. Rows
are right-padded, and the head runs only at scored positions. Neither padding nor the shared
prefix changes what a real token computes, so results do not depend on the batch size beyond
float rounding.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from gptlab.engine import Engine
from gptlab.errors import UserError, first_line
from gptlab.logprobs import scored_targets, segment_mask
from gptlab.model import KVCache
from gptlab.tokenizer import END, UNLIMITED_LENGTH

_DEFAULT_MAX_LENGTH = 2048  # lm-eval's fallback when neither config nor tokenizer gives a length
# Rows sharing fewer context tokens than this are not worth a separate prefix pass.
MIN_SHARED_PREFIX = 32


@dataclass(frozen=True)
class GenerationRequest:
    """Greedy continuation of ``context``, cut before the first of ``until``."""

    context: str
    until: tuple[str, ...] = ("\n",)
    max_new_tokens: int = 32


class Backend(ABC):
    """A model answering the three requests. ``counters`` accumulates encoding events the
    harness reports per task (truncations, seam merges)."""

    name: str = "backend"

    def __init__(self) -> None:
        self.counters: Counter[str] = Counter()

    @property
    def end_of_turn(self) -> tuple[str, ...]:
        """Stop strings of a chat reply."""
        return ()

    def chat_context(self, messages: Sequence[dict]) -> str:
        """The conversation through the model's chat template, ending in the generation prompt."""
        raise UserError(f"the {self.name} backend has no chat template to ask through: drop --chat")

    @abstractmethod
    def loglikelihood(self, requests: Sequence[tuple[str, str]], batch_size: int = 32) -> list[tuple[float, bool]]:
        """Per (context, continuation): log P(continuation | context) and whether greedy
        decoding would produce exactly the continuation's tokens."""

    @abstractmethod
    def loglikelihood_rolling(self, texts: Sequence[str], batch_size: int = 32) -> list[float]:
        """Per text: its total log-likelihood, scored in windows of the model's length."""

    @abstractmethod
    def generate_until(self, requests: Sequence[GenerationRequest], batch_size: int = 32) -> list[str]:
        """Per request: the greedy continuation, cut before the first stop string."""


def cut_at_stops(text: str, until: Sequence[str]) -> str:
    """Text before the first occurrence of each stop string (lm-eval's order: one after another)."""
    for stop in until:
        if stop:
            text = text.split(stop)[0]
    return text


def move_trailing_space(context: str, continuation: str) -> tuple[str, str]:
    """Trailing whitespace of the context belongs to the continuation (" A", not "A" after "x ")."""
    n = len(context) - len(context.rstrip())
    if n == 0:
        return context, continuation
    return context[:-n], context[-n:] + continuation


# --------------------------------------------------------------------------- token-level scoring


@dataclass
class _Row:
    """One packed model input: a context and the continuations that share it."""

    context: list[int]
    continuations: list[tuple[int, list[int]]] = field(default_factory=list)  # (request index, tokens)

    @property
    def length(self) -> int:
        return len(self.context) + sum(len(c) - 1 for _, c in self.continuations)


def rolling_windows(tokens: list[int], prefix: int, max_length: int) -> Iterator[tuple[list[int], list[int]]]:
    """(context, continuation) windows that score every token once, each with as much preceding
    context as fits (lm-eval's rolling windows with context_len=1, made disjoint)."""
    if not tokens:
        return
    first = min(max_length, len(tokens))
    yield [prefix], tokens[:first]
    start = first
    while start < len(tokens):
        end = min(start + max_length, len(tokens))
        yield tokens[end - max_length - 1 : start], tokens[start:end]
        start = end


class TokenBackend(Backend):
    """The shared encoding and scoring of backends whose tokenizer and model run here.

    A subclass provides the tokenizer (``_encode``, ``_decode``, ``_token_texts``), the model
    (``_logits_at``, ``_generate``) and ``max_length``.
    """

    max_length: int
    bos_text: str | None
    prefix_token_id: int  # the context of an empty context: BOS, else EOS (lm-eval's choice)
    eos_id: int | None

    def __init__(self) -> None:
        super().__init__()
        self._token_text_cache: list[str] | None = None

    # ----- what a subclass provides

    @abstractmethod
    def _encode(self, texts: list[str], add_special_tokens: bool) -> list[list[int]]: ...

    @abstractmethod
    def _decode(self, ids: list[int]) -> str:
        """Text of ids, special tokens left out."""

    @abstractmethod
    def _token_texts(self) -> list[str]:
        """The text of every single token id."""

    @abstractmethod
    def _logits_at(
        self,
        ids: torch.Tensor,
        positions: torch.Tensor,
        mask: torch.Tensor | None,
        rows: torch.Tensor,
        cols: torch.Tensor,
    ) -> torch.Tensor:
        """Logits (N, vocab), on the model's device, at the given (row, column) positions of one
        forward. ``mask`` is None (plain causal) or boolean (B, 1, T, T), True where a query may attend."""

    @abstractmethod
    def _generate(self, prompts: list[list[int]], max_new_tokens: int, stop_ids: list[int]) -> list[list[int]]:
        """Greedy new tokens per prompt, a row ending with its first stop id (kept: a token like
        ".\n" holds text before the stop, which the stop strings then cut)."""

    # ----- encoding

    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        """Tokens of each text with the tokenizer's special tokens, except for a text that
        already starts with BOS (lm-eval's ``tok_encode``)."""
        texts = list(texts)
        with_bos = [bool(self.bos_text) and t.startswith(self.bos_text) for t in texts]
        out: list[list[int] | None] = [None] * len(texts)
        for flag, add in ((True, False), (False, True)):
            index = [i for i, b in enumerate(with_bos) if b == flag]
            if index:
                for i, ids in zip(index, self._encode([texts[i] for i in index], add)):
                    out[i] = ids
        return out  # type: ignore[return-value]

    def encode_pairs(self, requests: Sequence[tuple[str, str]]) -> list[tuple[list[int], list[int]]]:
        """(context tokens, continuation tokens) per request, as lm-eval's ``_encode_pair``."""
        moved = [move_trailing_space(c, x) for c, x in requests]
        texts = sorted({c for c, _ in moved if c} | {c + x for c, x in moved if c})
        tokens = dict(zip(texts, self.encode(texts)))
        empties = [x for c, x in moved if not c]
        bare = dict(zip(empties, self._encode(empties, False))) if empties else {}
        pairs: list[tuple[list[int], list[int]]] = []
        merges = 0
        for context, continuation in moved:
            if not context:
                cont = bare[continuation]
                pairs.append(
                    (cont[:1], cont[1:]) if cont[:1] == [self.prefix_token_id] else ([self.prefix_token_id], cont)
                )
                continue
            ctx, whole = tokens[context], tokens[context + continuation]
            merges += whole[: len(ctx)] != ctx
            cont = whole[len(ctx) :]
            if not cont:
                raise UserError(
                    f"continuation {continuation!r} disappears into the context {context[-30:]!r} when tokenized; "
                    "end the context with a delimiter (a space or a newline) the tokenizer keeps apart"
                )
            pairs.append((ctx, cont))
        self.counters["seam_merges"] += merges
        return pairs

    # ----- the three requests

    def loglikelihood(self, requests, batch_size=32):
        return self.score_tokens(self.encode_pairs(requests), batch_size)

    def loglikelihood_rolling(self, texts, batch_size=32):
        pairs, owners = [], []
        for i, ids in enumerate(self._encode(list(texts), False) if texts else []):
            for window in rolling_windows(ids, self.prefix_token_id, self.max_length):
                pairs.append(window)
                owners.append(i)
        totals = [0.0] * len(texts)
        for owner, (logprob, _) in zip(owners, self.score_tokens(pairs, batch_size)):
            totals[owner] += logprob
        return totals

    def generate_until(self, requests, batch_size=32):
        out = [""] * len(requests)
        groups: dict[tuple[tuple[str, ...], int], list[int]] = {}
        for i, r in enumerate(requests):
            groups.setdefault((tuple(r.until), r.max_new_tokens), []).append(i)
        for (until, max_new_tokens), index in groups.items():
            texts = self._generate_group([requests[i].context for i in index], until, max_new_tokens, batch_size)
            for i, text in zip(index, texts):
                out[i] = text
        return out

    def _generate_group(
        self, contexts: list[str], until: tuple[str, ...], max_new_tokens: int, batch_size: int
    ) -> list[str]:
        # At least half the window stays for the prompt, however large the budget asked.
        max_new_tokens = max(1, min(max_new_tokens, self.max_length // 2))
        budget = self.max_length - max_new_tokens
        prompts = self.encode(contexts)
        self.counters["truncated"] += sum(len(p) > budget for p in prompts)
        prompts = [p[-budget:] for p in prompts]
        stop_ids = self._stop_ids(until)
        order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
        out = [""] * len(prompts)
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            for i, new in zip(chunk, self._generate([prompts[i] for i in chunk], max_new_tokens, stop_ids)):
                out[i] = cut_at_stops(self._decode(new), until)
        return out

    def _stop_ids(self, until: tuple[str, ...]) -> list[int]:
        """EOS and every token whose text contains a stop string: a row stops as soon as it has
        written one; stops spread over several tokens are cut from the text afterwards."""
        if self._token_text_cache is None:
            self._token_text_cache = self._token_texts()
        ids = [i for i, text in enumerate(self._token_text_cache) if any(s and s in text for s in until)]
        return ids + ([self.eos_id] if self.eos_id is not None else [])

    # ----- scoring

    def score_tokens(
        self, pairs: Sequence[tuple[list[int], list[int]]], batch_size: int = 32
    ) -> list[tuple[float, bool]]:
        """(log-likelihood, is_greedy) of each continuation given its context, in input order."""
        if batch_size < 1:
            raise UserError(f"batch size must be >= 1, got {batch_size}")
        results: list[tuple[float, bool]] = [(0.0, True)] * len(pairs)
        for rows, prefix in self._batches(self._pack(pairs), batch_size):
            self._score_rows(rows, prefix, results)
        return results

    def _batches(self, rows: list[_Row], batch_size: int) -> Iterator[tuple[list[_Row], int]]:
        """(rows, shared prefix length) per model call.

        Sorted by their tokens, rows that share a long context prefix (a subject's few-shot
        block) sit side by side: they batch together and the prefix runs once. The others batch
        by length, longest first, so padding stays small.
        """
        runs: list[list[_Row]] = []
        for row in sorted(rows, key=lambda r: r.context):
            if runs and len(os.path.commonprefix([runs[-1][-1].context, row.context])) >= MIN_SHARED_PREFIX:
                runs[-1].append(row)
            else:
                runs.append([row])
        for run in (r for r in runs if len(r) > 1):
            for start in range(0, len(run), batch_size):
                batch = run[start : start + batch_size]
                # Sorted rows: the first and last share what all share. Every row keeps at least
                # its last context token after the prefix: the first prediction is read there.
                shared = len(os.path.commonprefix([batch[0].context, batch[-1].context]))
                shared = min(shared, min(len(r.context) for r in batch) - 1)
                yield batch, shared if shared >= MIN_SHARED_PREFIX else 0
        singles = sorted((r for run in runs if len(run) == 1 for r in run), key=lambda r: (-r.length, r.context))
        for start in range(0, len(singles), batch_size):
            yield singles[start : start + batch_size], 0

    def _pack(self, pairs: Sequence[tuple[list[int], list[int]]]) -> list[_Row]:
        """Group requests by their (left-truncated) context, then fill rows of at most max_length."""
        limit = self.max_length
        groups: dict[tuple[int, ...], list[tuple[int, list[int]]]] = {}
        truncated = 0
        for i, (ctx, cont) in enumerate(pairs):
            if len(cont) > limit:
                raise UserError(
                    f"a continuation of {len(cont)} tokens does not fit the model's length {limit}; shorten the targets"
                )
            # The model reads ctx + cont[:-1]: keep its last max_length tokens (lm-eval's cut).
            excess = len(ctx) + len(cont) - 1 - limit
            if excess > 0:
                truncated += 1
                ctx = ctx[excess:]
            groups.setdefault(tuple(ctx), []).append((i, cont))
        self.counters["truncated"] += truncated
        rows: list[_Row] = []
        for ctx, conts in groups.items():
            row = _Row(list(ctx))
            for item in conts:
                if row.continuations and row.length + len(item[1]) - 1 > limit:
                    rows.append(row)
                    row = _Row(list(ctx))
                row.continuations.append(item)
            rows.append(row)
        return rows

    def _score_rows(self, rows: list[_Row], prefix: int, results: list[tuple[float, bool]]) -> None:
        """Score one batch of rows (right-padded) into ``results``; the first ``prefix`` tokens are
        the same in every row."""
        width = max(r.length for r in rows)
        ids = torch.zeros(len(rows), width, dtype=torch.long)
        positions = torch.zeros(len(rows), width, dtype=torch.long)
        segments = torch.full((len(rows), width), -1, dtype=torch.long)  # -1 pad, 0 context, s continuation s
        targets: list[tuple[int, int, int, int]] = []  # (row, column, token, request)
        needs_mask = False
        for b, row in enumerate(rows):
            n = len(row.context)
            ids[b, :n] = torch.tensor(row.context)
            positions[b, :n] = torch.arange(n)
            segments[b, :n] = 0
            offset, bodies = n, 0
            for s, (request, cont) in enumerate(row.continuations, 1):
                body = cont[:-1]
                ids[b, offset : offset + len(body)] = torch.tensor(body, dtype=torch.long)
                positions[b, offset : offset + len(body)] = torch.arange(n, n + len(body))
                segments[b, offset : offset + len(body)] = s
                columns = [n - 1] + list(range(offset, offset + len(body)))
                targets.extend((b, col, tok, request) for col, tok in zip(columns, cont))
                offset += len(body)
                bodies += bool(body)
            needs_mask |= bodies > 1
        rows_t = torch.tensor([t[0] for t in targets])
        cols_t = torch.tensor([t[1] for t in targets])
        tokens_t = torch.tensor([t[2] for t in targets])
        if prefix:
            logits = self._logits_after_prefix(ids, positions, _context_mask(segments), prefix, rows_t, cols_t)
        else:
            mask = _context_mask(segments) if needs_mask else None
            logits = self._logits_at(ids, positions, mask, rows_t, cols_t)
        # Scored where the logits are: only two numbers per target leave the device, not a vocabulary.
        picked, greedy = scored_targets(logits, tokens_t.to(logits.device))
        picked, greedy = picked.tolist(), greedy.tolist()
        sums: dict[int, list] = {}
        for (_, _, _, request), lp, g in zip(targets, picked, greedy):
            total = sums.setdefault(request, [0.0, True])
            total[0] += lp
            total[1] = total[1] and g
        for request, (lp, g) in sums.items():
            results[request] = (lp, g)

    def _logits_after_prefix(
        self,
        ids: torch.Tensor,
        positions: torch.Tensor,
        mask: torch.Tensor,
        prefix: int,
        rows: torch.Tensor,
        cols: torch.Tensor,
    ) -> torch.Tensor:
        """``_logits_at`` for rows whose first ``prefix`` tokens are equal. A backend with a KV
        cache runs them once; this default runs every row whole."""
        return self._logits_at(ids, positions, mask, rows, cols)


def _context_mask(segments: torch.Tensor) -> torch.Tensor:
    """The mask of a scored row: a continuation (segment s > 0) sees the context (0) and itself,
    never another continuation; the padding (-1) sees the context and itself."""
    return segment_mask(segments, shared=0)


# --------------------------------------------------------------------------- gptlab models


class GptlabBackend(TokenBackend):
    """A gptlab ``GPT`` and ``Tokenizer``, in memory (``GptlabBackend(model, tok)``) or from a
    model folder (``GptlabBackend.from_pretrained(dir)``). Generation uses the KV-cache engine:
    ``engine``, when the caller already holds one for this model, else a new one."""

    name = "gptlab"

    def __init__(self, model, tokenizer, engine: Engine | None = None) -> None:
        super().__init__()
        if tokenizer.vocab_size > model.config.vocab_size:
            raise UserError(
                f"the tokenizer has {tokenizer.vocab_size} tokens but the model only {model.config.vocab_size}: "
                "they do not belong together"
            )
        self.model = model
        self.tokenizer = tokenizer
        self.engine = engine or Engine(model, tokenizer)  # one engine, so its packed CPU weights are made once
        self.max_length = model.config.block_size
        self.bos_text = tokenizer.bos_token
        self.eos_id = tokenizer.eos_id
        prefix = tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.eos_id
        if prefix is None:
            raise UserError("the tokenizer has neither a BOS nor an EOS token to condition an empty context on")
        self.prefix_token_id = prefix

    @classmethod
    def from_engine(cls, engine: Engine) -> GptlabBackend:
        """The engine's model and tokenizer, generating through that engine."""
        return cls(engine.model, engine.tokenizer, engine)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, device: str = "cpu", dtype=None) -> GptlabBackend:
        return cls.from_engine(Engine.from_pretrained(path, device=device, dtype=dtype))

    def _encode(self, texts, add_special_tokens):
        return self.tokenizer.encode_batch(texts, add_special_tokens=add_special_tokens)

    @property
    def end_of_turn(self):
        return (END,) if self.tokenizer.end_id is not None else ()

    def chat_context(self, messages):
        if self.tokenizer.chat_template is None:
            raise UserError("this model's tokenizer has no chat template: drop --chat")
        # Special tokens stay as text; encode() reads them back as the same ids, BOS included.
        return self.tokenizer.decode(self.tokenizer.apply_chat_template(messages, add_generation_prompt=True))

    def _decode(self, ids):
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _token_texts(self):
        return [self.tokenizer.decode([i]) for i in range(self.tokenizer.vocab_size)]

    def _logits_at(self, ids, positions, mask, rows, cols):
        device = self._device()
        with self.engine.eval_mode(), self.engine.packed(), torch.inference_mode():
            hidden = self.model.hidden(ids.to(device), positions.to(device), None if mask is None else mask.to(device))
            return self.model.lm_head(hidden[rows.to(device), cols.to(device)])

    def _logits_after_prefix(self, ids, positions, mask, prefix, rows, cols):
        device, model = self._device(), self.model
        batch, width = ids.shape
        with self.engine.eval_mode(), self.engine.packed(), torch.inference_mode():
            dtype = next(model.parameters()).dtype
            shared = KVCache(model.config, 1, prefix, device, dtype)
            model.hidden(ids[:1, :prefix].to(device), positions[:1, :prefix].to(device), None, shared)
            cache = KVCache(model.config, batch, width, device, dtype)
            cache.copy_rows_from(shared, batch)
            hidden = model.hidden(
                ids[:, prefix:].to(device), positions[:, prefix:].to(device), mask[:, :, prefix:].to(device), cache
            )
            return model.lm_head(hidden[rows.to(device), (cols - prefix).to(device)])

    def _device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _generate(self, prompts, max_new_tokens, stop_ids):
        return self.engine.generate(prompts, max_new_tokens, temperature=0, stop_ids=stop_ids)


# --------------------------------------------------------------------------- Hugging Face models


class HFBackend(TokenBackend):
    """Any local causal LM folder through ``transformers`` (never downloads)."""

    name = "hf"

    def __init__(self, path: str | os.PathLike, device: str = "cpu", dtype: torch.dtype | None = None) -> None:
        super().__init__()
        try:
            from transformers import AutoModelForCausalLM, AutoTokenizer
        except ImportError:
            raise UserError("the hf backend needs transformers: pip install transformers") from None
        path = Path(path)
        if not (path / "config.json").is_file():
            raise UserError(f"{path} is not a Hugging Face model folder (no config.json)")
        try:
            self.model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True).eval()
            self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError) as e:
            raise UserError(f"transformers cannot load {path}: {first_line(e)}") from None
        self.model.to(device=device, dtype=dtype or (torch.float32 if device == "cpu" else None))
        self.device = device
        tok = self.tokenizer
        self.max_length = self._resolve_max_length()
        self.bos_text = tok.bos_token
        self.eos_id = tok.eos_token_id
        self.prefix_token_id = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id

    @property
    def end_of_turn(self):
        ids = self.model.generation_config.eos_token_id
        ids = [ids] if isinstance(ids, int) else list(ids or [])
        return tuple(self.tokenizer.convert_ids_to_tokens(ids))

    def chat_context(self, messages):
        if not self.tokenizer.chat_template:
            raise UserError("this model's tokenizer has no chat template: drop --chat")
        return self.tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)

    def _resolve_max_length(self) -> int:
        """As lm-eval: the config's context length, else the tokenizer's, else 2048."""
        for attr in ("n_positions", "max_position_embeddings", "n_ctx"):
            value = getattr(self.model.config, attr, None)
            if value:
                return int(value)
        limit = getattr(self.tokenizer, "model_max_length", None)
        return int(limit) if limit and limit < UNLIMITED_LENGTH else _DEFAULT_MAX_LENGTH

    def _encode(self, texts, add_special_tokens):
        return self.tokenizer(texts, add_special_tokens=add_special_tokens)["input_ids"]

    def _decode(self, ids):
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _token_texts(self):
        return self.tokenizer.batch_decode([[i] for i in range(len(self.tokenizer))])

    def _logits_at(self, ids, positions, mask, rows, cols):
        attention = None
        if mask is not None:  # an additive 4D mask: transformers passes a 4D mask through as it is
            attention = torch.zeros(mask.shape, dtype=self.model.dtype).masked_fill(
                ~mask, torch.finfo(self.model.dtype).min
            )
            attention = attention.to(self.device)
        with torch.inference_mode():
            logits = self.model(
                input_ids=ids.to(self.device), position_ids=positions.to(self.device), attention_mask=attention
            ).logits
        return logits[rows.to(self.device), cols.to(self.device)]

    def _generate(self, prompts, max_new_tokens, stop_ids):
        pad = self.tokenizer.pad_token_id
        pad = pad if pad is not None else (self.eos_id if self.eos_id is not None else 0)
        width = max(len(p) for p in prompts)
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=self.device)
        attention = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=self.device)
        with torch.inference_mode():
            out = self.model.generate(
                input_ids=ids,
                attention_mask=attention,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=stop_ids or None,
                pad_token_id=pad,
            )
        stops = set(stop_ids)
        new = []
        for row in out[:, width:].tolist():
            end = next((j + 1 for j, t in enumerate(row) if t in stops), len(row))  # the pads after a stop go
            new.append(row[:end])
        return new


# --------------------------------------------------------------------------- OpenAI-compatible servers


class OpenAIBackend(Backend):
    """An OpenAI-compatible ``/v1/completions`` endpoint (``gptlab serve``, vLLM, ...), through the
    ``openai`` client (``pip install gptlab[openai]``). It talks only to the server the user names.

    Log-likelihoods come from ``echo`` with ``max_tokens=0`` and ``logprobs``: the server's own
    tokens, split at the context's end by their text offsets, so no local tokenizer is needed.
    """

    name = "openai"

    def __init__(self, base_url: str, model: str, api_key: str | None = None, timeout: float = 600.0) -> None:
        super().__init__()
        try:
            import openai
        except ImportError:
            raise UserError("the openai backend needs the openai client: pip install 'gptlab[openai]'") from None
        base_url = base_url.rstrip("/")
        self.url = base_url if base_url.endswith("/v1") else base_url + "/v1"
        self.model = model
        self._refused, self._unreachable = openai.APIStatusError, openai.APIConnectionError
        self.client = openai.OpenAI(
            base_url=self.url,
            api_key=api_key or os.environ.get("OPENAI_API_KEY") or "none",
            timeout=timeout,
            max_retries=0,
        )

    def _complete(self, **body) -> list[dict]:
        """The response's choices in index order, as plain dicts."""
        try:
            response = self.client.completions.create(model=self.model, **body)
        except self._refused as e:  # the server's own reason (OpenAI's shape), e.g. a prompt over its window
            reason = e.body.get("message") if isinstance(e.body, dict) else None
            raise UserError(f"{self.url}/completions answered {e.status_code}: {str(reason or e)[:300]}") from None
        except self._unreachable as e:
            raise UserError(f"{self.url}/completions failed ({str(e)[:200]}): is the server running?") from None
        return sorted((c.model_dump() for c in response.choices), key=lambda c: c["index"])

    def _echo(self, prompts: list[str]) -> list[dict]:
        choices = self._complete(prompt=prompts, max_tokens=0, echo=True, logprobs=1, temperature=0)
        return [c["logprobs"] for c in choices]

    def loglikelihood(self, requests, batch_size=32):
        moved = [move_trailing_space(c, x) for c, x in requests]
        out = []
        for start in range(0, len(moved), batch_size):
            chunk = moved[start : start + batch_size]
            for (context, _), lp in zip(chunk, self._echo([c + x for c, x in chunk])):
                # The first token of an echoed prompt has no log-prob (null): nothing conditions it.
                picked = [
                    i
                    for i, offset in enumerate(lp["text_offset"])
                    if offset >= len(context) and lp["token_logprobs"][i] is not None
                ]
                total = sum(lp["token_logprobs"][i] for i in picked)
                # Greedy where no alternative is more likely; compared by log-prob, not by token text, as
                # different tokens can read the same (the bytes of a split character all read U+FFFD).
                greedy = all(lp["token_logprobs"][i] >= max(lp["top_logprobs"][i].values()) for i in picked)
                out.append((total, greedy))
        return out

    def loglikelihood_rolling(self, texts, batch_size=32):
        out = []
        for start in range(0, len(texts), batch_size):
            for lp in self._echo(list(texts[start : start + batch_size])):
                out.append(sum(x for x in lp["token_logprobs"] if x is not None))
        return out

    def generate_until(self, requests, batch_size=32):
        out = []
        for r in requests:  # stop strings and budgets may differ per request
            choices = self._complete(
                prompt=r.context, max_tokens=r.max_new_tokens, temperature=0, stop=list(r.until)[:4]
            )
            out.append(cut_at_stops(choices[0]["text"], r.until))
        return out


def load_backend(kind: str, model: str, device: str = "cpu", base_url: str | None = None) -> Backend:
    """The backend ``gptlab eval --backend`` names, for a model folder (or a served model's name)."""
    if kind == "gptlab":
        return GptlabBackend.from_pretrained(model, device=check_device(device))
    if kind == "hf":
        return HFBackend(model, device=check_device(device))
    if kind == "openai":
        if not base_url:
            raise UserError("the openai backend needs --base-url (e.g. http://127.0.0.1:8000/v1)")
        return OpenAIBackend(base_url, model)
    raise UserError(f"unknown backend {kind!r}: use gptlab, hf or openai")


def check_device(device: str) -> str:
    """``--device`` as given, refused in one line when torch cannot parse it or this machine lacks it."""
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        raise UserError(f"--device {device!r} is not a device: use cpu, cuda, cuda:N or mps") from None
    if parsed.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise UserError(f"--device {device}: no CUDA device is visible on this machine; use --device cpu")
        if parsed.index is not None and parsed.index >= count:
            raise UserError(
                f"--device {device}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}; pick one"
            )
    elif parsed.type == "mps":
        if not torch.backends.mps.is_available():
            raise UserError(f"--device {device}: MPS is not available on this machine; use --device cpu")
    elif parsed.type != "cpu":
        raise UserError(f"--device {device}: gptlab evaluates on cpu, cuda, cuda:N or mps")
    return device
