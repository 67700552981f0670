"""Continuous batching: sequences join and leave a running batch, one decode step at a time.

The cache (``SlotCache``) holds ``max_batch`` rows of the model's full length, allocated once; a
sequence owns a row (its slot) from its prefill until it finishes, and every row has its own
length. A step runs ONE decode over the rows: each writes its key and value at its own position
and attends, through a mask, only to the slots it has filled. Rows are handed out lowest first,
so the step covers rows ``0 .. top`` where ``top`` is the highest row in use; a free row inside
that range computes a throwaway token at slot 0, which its next prefill overwrites. Attention reads
only the slots up to the longest running sequence's length, not the whole cache: with 8 rows of a
34M Llama (prompts of 32-53 tokens, block_size 1024, 1 thread on the 2-core CPU) a step over all
1024 slots gave 88 new tokens/s and one over the used span 236 (1 row: 5.0 and 6.6, on a loaded
machine). A leaving row's slots are zeroed, so nothing it left can reach the next sequence there.

Shared with the fixed-batch ``Engine`` (one mechanism per concern): request checks
(``check_prompts``, ``Sampling.check``), the choice of a token (``penalized``, ``sample_next``),
log-probs (``gptlab.logprobs``), text (``TextStream``), the oneDNN linear layers
(``Engine.packed``) and eval mode. What stays separate is the fixed batch's decode loop itself
(``Engine._steps``): its rows share one position, so it attends with no mask at all when the
prompts are equally long (the faster attention kernels), draws a seeded batch from ONE generator
(its outputs for a seed are fixed by the tests and the transformers parity checks), shares one
prefill among ``n`` samples, and replays a CUDA graph of a fixed-shape step. Running it on slots
would change its seeded samples and add a mask to every step, for nothing a fixed batch needs.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import torch

from gptlab.engine import Engine, Sampling, TextStream, check_prompts, penalized, sample_next
from gptlab.errors import UserError
from gptlab.logprobs import top_logprobs
from gptlab.model import KVCache

GREEDY = Sampling(temperature=0.0)


@dataclass(frozen=True)
class Request:
    """One sequence to generate; see the module ``Scheduler``."""

    prompt: list[int]  # token ids, non-empty, exactly as the model should see them
    max_new_tokens: int  # >= 0; 0 finishes at once with "length" (prompt log-probs if asked)
    sampling: Sampling = GREEDY  # a seeded request draws from its own generator: the same alone or batched
    stop_ids: tuple[int, ...] = ()  # ends after emitting one ("stop"): in token_ids, adds no text
    stop: tuple[str, ...] = ()  # stop strings: the text ends before the first one ("stop")
    logprobs: int | None = None  # None: none; k >= 0: each new token's log-prob and its k most likely alternatives
    prompt_logprobs: bool = False  # also every prompt token's log-prob (+ k alternatives), the first one None
    skip_special_tokens: bool = True  # text without special tokens, as vLLM's default (token_ids keep them)


@dataclass
class TokenLogprob:
    token: int
    logprob: float  # log_softmax of the raw logits (before penalty, temperature and filters)
    top: list[tuple[int, float]]  # the k most likely (token, logprob), most likely first


@dataclass
class Output:
    """What one step produced for one sequence."""

    seq_id: int
    token_ids: list[int]  # new tokens (0 or 1 per step)
    text: str  # new text released by this step; the outputs' texts join to the final text
    logprobs: list[TokenLogprob] | None  # one per entry of token_ids, when asked
    prompt_logprobs: list[TokenLogprob | None] | None  # only on a sequence's first output, when asked
    finish_reason: str | None  # None while running; "stop", "length" or "abort"


class SlotCache(KVCache):
    """Keys and values of ``rows`` sequences, each in its own row with its own length.

    The model writes through ``update`` in one of two modes, set before each forward: ``prefill``
    (new prompts, all starting at slot 0, into the given rows) or ``decode`` (one token per row
    0..B-1, each at its own slot, attending over the first ``limit`` slots).
    """

    def __init__(self, config, rows: int, max_len: int, device, dtype):
        super().__init__(config, rows, max_len, device, dtype)
        self.rows: torch.Tensor | None = None  # prefill: the rows written; decode: 0..B-1
        self.slots: torch.Tensor | None = None  # decode: where each row writes
        self.limit = 0

    def prefill(self, rows: torch.Tensor) -> None:
        self.rows, self.slots, self.pos = rows, None, 0

    def decode(self, slots: torch.Tensor, limit: int) -> None:
        self.rows = torch.arange(slots.numel(), device=slots.device)
        self.slots, self.limit = slots, limit
        self.pos = limit - 1  # the model checks pos + 1 against its block_size

    def update(self, layer: int, kv):
        both = self.kv[layer]  # (2, rows, kv heads, slots, head size)
        if self.slots is None:  # a prefill attends only to its own prompt: the keys it was given
            both[:, self.rows, :, : kv.size(3)] = kv
            return kv.unbind()
        # Indexed by row and slot together, one (B, 2, kv heads, head size) entry per row.
        both[:, self.rows, :, self.slots] = kv[:, :, :, 0].transpose(0, 1)
        return both[:, : self.rows.numel(), :, : self.limit].unbind()

    def clear(self, row: int, length: int) -> None:
        """Zero a leaving row's filled slots: a masked slot still enters attention's weighted sum
        (with weight 0), so a non-finite value left there would poison the row's next sequence."""
        self.kv[:, :, row, :, :length].zero_()


@dataclass(eq=False)
class _Sequence:
    seq_id: int
    request: Request
    generator: torch.Generator | None
    text: TextStream | None
    row: int | None = None
    length: int = 0  # slots filled in its row
    written: int = 0  # slots its row holds values in (a padded prefill writes past the prompt)
    last: int = 0  # the token the next decode step feeds
    generated: int = 0
    cancelled: bool = False
    first_output: bool = True
    pending_prompt_logprobs: list[TokenLogprob | None] | None = field(default=None, repr=False)


class Scheduler:
    """Continuous batching over one Engine (its model; its tokenizer for text and stop strings).

    ``add`` queues a request; each ``step`` admits waiting requests into free rows (one batched
    prefill, which also yields their first token), then runs ONE decode step over every row that
    was already running; a sequence that finishes leaves at once and frees its row for the next.
    A request's greedy output is the same whatever else runs beside it, and a seeded one draws
    from its own generator, so it too is. Not thread-safe: one thread owns it.
    """

    def __init__(self, engine: Engine, max_batch: int = 8, max_len: int | None = None):
        config = engine.model.config
        if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
            raise UserError(f"max_batch must be a positive integer, got {max_batch!r}")
        self.max_len = config.block_size if max_len is None else max_len
        if not 1 <= self.max_len <= config.block_size:
            raise UserError(f"max_len must be from 1 to the model's block_size {config.block_size}, got {max_len}")
        param = next(engine.model.parameters())
        self.engine, self.device = engine, param.device
        self.cache = SlotCache(config, max_batch, self.max_len, self.device, param.dtype)
        self.rows: list[_Sequence | None] = [None] * max_batch
        self.queue: deque[_Sequence] = deque()
        self.aborted: list[_Sequence] = []  # cancelled while waiting: reported by the next step
        self.by_id: dict[int, _Sequence] = {}
        self.next_id = 0
        self.generator = torch.Generator(device=self.device)
        self.generator.seed()
        self.seen = torch.zeros(max_batch, config.vocab_size, dtype=torch.bool, device=self.device)
        self.slot_index = torch.arange(self.max_len, device=self.device)

    @property
    def running(self) -> int:
        """Sequences holding a row."""
        return sum(seq is not None for seq in self.rows)

    @property
    def waiting(self) -> int:
        """Sequences queued for a row."""
        return len(self.queue)

    def has_work(self) -> bool:
        return bool(self.queue or self.aborted or self.running)

    def add(self, request: Request) -> int:
        """Check ``request`` (UserError, one line) and queue it; returns its sequence id."""
        self._check(request)
        seed = request.sampling.seed
        generator = None
        if request.sampling.temperature > 0 and seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(seed)
        text = (
            TextStream(self.engine.tokenizer, request.stop, request.skip_special_tokens)
            if self.engine.tokenizer is not None
            else None
        )
        seq = _Sequence(self.next_id, request, generator, text)
        self.next_id += 1
        self.by_id[seq.seq_id] = seq
        self.queue.append(seq)
        return seq.seq_id

    def cancel(self, seq_id: int) -> None:
        """Finish the sequence with "abort" in the next step's outputs, which frees its row; a
        sequence that has already finished (or never was) is left alone."""
        seq = self.by_id.get(seq_id)
        if seq is None or seq.cancelled:
            return
        seq.cancelled = True
        if seq.row is None:
            self.queue.remove(seq)
            self.aborted.append(seq)

    def step(self) -> list[Output]:
        """Cancelled sequences leave; ONE decode step over the rows still running; then waiting
        requests take the free rows (those freed by this step too) and yield their first token.
        So each sequence gets at most one token per step."""
        outputs = [self._finish(seq, "abort") for seq in self.aborted]
        self.aborted = []
        for seq in self.rows:
            if seq is not None and seq.cancelled:
                outputs.append(self._finish(seq, "abort"))
        with torch.inference_mode(), self.engine.eval_mode(), self.engine.packed():
            if self.running:
                outputs += self._decode()
            outputs += self._admit()
        return outputs

    def _check(self, request: Request) -> None:
        if not isinstance(request, Request):
            raise UserError(f"the scheduler takes a Request, got {type(request).__name__}")
        if not isinstance(request.sampling, Sampling):
            raise UserError(f"sampling must be a Sampling, got {type(request.sampling).__name__}")
        check_prompts(
            self.engine.model.config, [request.prompt], request.max_new_tokens, request.sampling, self.max_len
        )
        vocab = self.engine.model.config.vocab_size
        k = request.logprobs
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= vocab):
            raise UserError(f"logprobs must be None or an integer from 0 to the vocabulary size {vocab}, got {k!r}")
        if isinstance(request.stop, str) or not all(isinstance(s, str) for s in request.stop):
            raise UserError("stop must be a tuple of strings")
        if not all(isinstance(t, int) and not isinstance(t, bool) for t in request.stop_ids):
            raise UserError("stop_ids must be a tuple of integer token ids")
        if any(request.stop) and self.engine.tokenizer is None:
            raise UserError("stop strings need a tokenizer: create the Engine as Engine(model, tokenizer)")

    # -- the model -------------------------------------------------------------------------------

    def _admit(self) -> list[Output]:
        """Prefill as many waiting requests as there are free rows, in one right-padded batch
        (causal attention never lets a real token see the padding after it)."""
        outputs, admitted = [], []
        while self.queue and (None in self.rows or self.queue[0].request.max_new_tokens == 0):
            seq = self.queue.popleft()
            if seq.request.max_new_tokens == 0:  # nothing to generate: needs no row
                outputs.append(self._score_only(seq))
                continue
            seq.row = self.rows.index(None)
            self.rows[seq.row] = seq
            admitted.append(seq)
        if not admitted:
            return outputs
        prompts = [seq.request.prompt for seq in admitted]
        longest = max(len(p) for p in prompts)
        ids = torch.tensor([list(p) + [0] * (longest - len(p)) for p in prompts], device=self.device)
        self.cache.prefill(torch.tensor([seq.row for seq in admitted], device=self.device))
        hidden = self.engine.model.hidden(ids, kv_cache=self.cache)
        last = torch.tensor([len(p) - 1 for p in prompts], device=self.device)
        logits = self.engine.model.lm_head(hidden[torch.arange(len(prompts)), last]).float()
        for i, seq in enumerate(admitted):
            seq.length, seq.written = len(seq.request.prompt), longest
            self._mark_seen(seq)
            if seq.request.prompt_logprobs:
                seq.pending_prompt_logprobs = self._prompt_logprobs(seq, hidden[i, : seq.length])
        return outputs + self._emit(admitted, logits)

    def _decode(self) -> list[Output]:
        """One token for every running row. Attention reads the first ``limit`` slots, the longest
        running sequence's, not the whole cache; each row's mask hides the slots past its own."""
        top = max(i for i, seq in enumerate(self.rows) if seq is not None) + 1
        rows = self.rows[:top]
        slots = [seq.length if seq is not None else 0 for seq in rows]
        ids = torch.tensor([[seq.last if seq is not None else 0] for seq in rows], device=self.device)
        positions = torch.tensor(slots, device=self.device)
        limit = max(slots) + 1
        mask = None  # every row sees every slot up to the limit: no mask, the faster kernels
        if min(slots) != limit - 1:
            mask = (self.slot_index[:limit] <= positions[:, None])[:, None, None, :]
        self.cache.decode(positions, limit)
        logits = self.engine._logits(ids, positions[:, None], mask, self.cache)
        live = [seq for seq in rows if seq is not None]
        for seq in live:
            seq.length += 1
        return self._emit(live, logits[[seq.row for seq in live]] if len(live) < top else logits)

    def _score_only(self, seq: _Sequence) -> Output:
        """A request with max_new_tokens 0: its prompt log-probs if asked, from a cacheless forward."""
        if seq.request.prompt_logprobs:
            ids = torch.tensor([seq.request.prompt], device=self.device)
            seq.pending_prompt_logprobs = self._prompt_logprobs(seq, self.engine.model.hidden(ids)[0])
        return self._finish(seq, "length")

    # -- tokens and outputs ----------------------------------------------------------------------

    def _emit(self, seqs: list[_Sequence], logits: torch.Tensor) -> list[Output]:
        """Choose each sequence's next token from its logits row (N, V) and report it."""
        tokens = self._choose(seqs, logits)
        logprobs = self._token_logprobs(seqs, logits, tokens)
        outputs = []
        for seq, token, lps in zip(seqs, tokens.tolist(), logprobs):
            seq.last = token
            seq.generated += 1
            request = seq.request
            stopped = token in request.stop_ids
            text = seq.text.push(token) if seq.text is not None and not stopped else ""
            stopped = stopped or (seq.text is not None and seq.text.stopped)
            reason = "stop" if stopped else "length" if seq.generated >= request.max_new_tokens else None
            outputs.append(self._output(seq, [token], text, lps, reason))
        return outputs

    def _choose(self, seqs: list[_Sequence], logits: torch.Tensor) -> torch.Tensor:
        """Each sequence's next token: its repetition penalty, then its temperature, top-k and
        top-p from its own generator (the scheduler's when unseeded)."""
        scores = logits
        for i, seq in enumerate(seqs):
            penalty = seq.request.sampling.repetition_penalty
            if penalty != 1.0:
                scores = scores.clone() if scores is logits else scores
                scores[i] = penalized(logits[i], self.seen[seq.row], penalty)
        tokens = scores.argmax(dim=-1)
        for i, seq in enumerate(seqs):
            s = seq.request.sampling
            if s.temperature > 0:
                generator = seq.generator or self.generator
                tokens[i] = sample_next(scores[i : i + 1], s.temperature, s.top_k, s.top_p, generator)[0]
        for i, seq in enumerate(seqs):
            if seq.request.sampling.repetition_penalty != 1.0:
                self.seen[seq.row, tokens[i]] = True
        return tokens

    def _mark_seen(self, seq: _Sequence) -> None:
        if seq.request.sampling.repetition_penalty != 1.0:
            self.seen[seq.row] = False
            self.seen[seq.row, torch.tensor(seq.request.prompt, device=self.device)] = True

    def _token_logprobs(self, seqs, logits, tokens) -> list[list[TokenLogprob] | None]:
        wanted = [i for i, seq in enumerate(seqs) if seq.request.logprobs is not None]
        result: list[list[TokenLogprob] | None] = [None] * len(seqs)
        if wanted:
            k = max(seqs[i].request.logprobs for i in wanted)
            index = torch.tensor(wanted, device=self.device)
            entries = _entries(tokens[index], *top_logprobs(logits[index], tokens[index], k))
            for i, entry in zip(wanted, entries):
                entry.top = entry.top[: seqs[i].request.logprobs]
                result[i] = [entry]
        return result

    def _prompt_logprobs(self, seq: _Sequence, hidden: torch.Tensor) -> list[TokenLogprob | None]:
        """Each prompt token's log-prob under the model given the tokens before it (the first: None)."""
        prompt = seq.request.prompt
        logits = self.engine.model.lm_head(hidden[:-1]).float()
        targets = torch.tensor(prompt[1:], device=self.device)
        return [None, *_entries(targets, *top_logprobs(logits, targets, seq.request.logprobs or 0))]

    def _output(self, seq: _Sequence, tokens, text: str, logprobs, reason: str | None) -> Output:
        if reason is not None:
            if seq.text is not None and not seq.text.stopped:
                text += seq.text.finish()
            self._release(seq)
        output = Output(
            seq.seq_id,
            tokens,
            text,
            logprobs if seq.request.logprobs is not None else None,
            seq.pending_prompt_logprobs if seq.first_output and seq.request.prompt_logprobs else None,
            reason,
        )
        seq.first_output, seq.pending_prompt_logprobs = False, None
        return output

    def _finish(self, seq: _Sequence, reason: str) -> Output:
        return self._output(seq, [], "", [] if seq.request.logprobs is not None else None, reason)

    def _release(self, seq: _Sequence) -> None:
        self.by_id.pop(seq.seq_id, None)
        if seq.row is not None:
            self.cache.clear(seq.row, max(seq.length, seq.written))
            self.rows[seq.row] = None
            seq.row = None


def _entries(tokens: torch.Tensor, picked: torch.Tensor, top_values, top_ids) -> list[TokenLogprob]:
    """One TokenLogprob per row of ``top_logprobs``' tensors."""
    return [
        TokenLogprob(token, logprob, list(zip(ids, values)))
        for token, logprob, ids, values in zip(tokens.tolist(), picked.tolist(), top_ids.tolist(), top_values.tolist())
    ]
