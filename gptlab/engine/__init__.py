"""Inference: one batched prefill, then one-token decode steps over a preallocated KV cache.

Prompts of different lengths share a batch by LEFT padding: every row's last prompt token
sits in the same column, so one decode step serves all rows. Each row gets its own position
ids (0..len-1 over its real tokens) and a key mask that hides its pad slots, so a padded row
computes exactly what it would alone. The pad mask is built once for the whole cache length
and sliced each step; a batch without padding passes no mask at all (the faster kernels).

One decode loop (``Engine._steps``) serves everything: ``stream`` yields its steps, ``generate``
collects them, and the text helpers decode them.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import torch.nn as nn

from gptlab.errors import UserError
from gptlab.logprobs import token_logprobs
from gptlab.model import GPT, KVCache, additive_mask, attention_dtype

REPLACEMENT_CHAR = "\ufffd"


@dataclass(frozen=True)
class Sampling:
    """How each next token is chosen (see ``Engine.stream``)."""

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float = 1.0
    seed: int | None = None

    def check(self) -> None:
        """Refuse settings that sample nonsense (a NaN or infinite temperature divides the logits
        into NaNs or a uniform draw) in one line naming the setting."""
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise UserError(f"temperature must be a finite number >= 0 (0 is greedy), got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise UserError(f"top_k must be >= 1 or None, got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise UserError(f"top_p must be in (0, 1] or None, got {self.top_p}")
        if not (math.isfinite(self.repetition_penalty) and self.repetition_penalty > 0):
            raise UserError(
                f"repetition_penalty must be a finite number > 0 (1 is none), got {self.repetition_penalty}"
            )
        if self.seed is not None and not -(1 << 63) <= self.seed < 1 << 64:  # what torch.Generator takes
            raise UserError(f"seed must be a whole number from -2**63 to 2**64 - 1, got {self.seed}")


def sample_next(
    logits: torch.Tensor,
    temperature: float,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Next token ids (B,) from logits (B, V), applying temperature, then top-k, then top-p (HF's order).

    Filtering keeps the candidates as (value, vocab index) pairs rather than writing -inf into
    the full vocabulary, so a token outside the allowed set can never be drawn, even on ties.
    """
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    index = None
    if top_k is not None and top_k < logits.size(-1):
        logits, index = logits.topk(top_k, dim=-1)  # sorted, largest first
    elif top_p is not None and top_p < 1.0:
        logits, index = logits.sort(dim=-1, descending=True)
    if top_p is not None and top_p < 1.0:
        probs = logits.softmax(dim=-1)
        # Keep the smallest prefix whose mass reaches top_p: drop a token once the mass before
        # it already reaches top_p. The first token has zero mass before it, so it always stays.
        mass_before = probs.cumsum(dim=-1) - probs
        logits = logits.masked_fill(mass_before >= top_p, float("-inf"))
    choice = torch.multinomial(logits.softmax(dim=-1), 1, generator=generator)
    return (index.gather(-1, choice) if index is not None else choice).squeeze(-1)


class TextStream:
    """One sequence's new text, released token by token: incremental detokenization and stop strings.

    Decoding token by token would cut multi-byte UTF-8 characters in half, so ``push`` decodes a
    short window of recent ids and releases only the stable new suffix, holding back a trailing
    U+FFFD until the character completes (the windowed scheme of vLLM's detokenizer, whose cost
    per token does not grow with the length of the text). Text ends before the first of the
    ``stop`` strings (as OpenAI's and vLLM's ``stop``), and text that could still turn into one is
    held back until it cannot. The pieces that ``push`` and ``finish`` return join to the decoded
    text, cut at the stop string.
    """

    def __init__(self, tokenizer, stop: str | Sequence[str] = (), skip_special_tokens: bool = False):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.stops = [s for s in ([stop] if isinstance(stop, str) else stop) if s]
        self.ids: list[int] = []
        self.start = self.done = 0  # ids[start:done] were released and give context to the next decode
        self.held = ""  # decoded but not yet released: it may begin a stop string
        self.stopped = False  # a stop string was found: nothing more is released

    def push(self, token: int) -> str:
        """The text that ``token`` releases ('' while a character or a possible stop string is incomplete)."""
        if self.stopped:
            return ""
        self.ids.append(token)
        emitted = self._decode(self.ids[self.start : self.done])
        current = self._decode(self.ids[self.start :])
        if len(current) <= len(emitted) or current.endswith(REPLACEMENT_CHAR):
            return ""
        self.held += current[len(emitted) :]
        self.start, self.done = self.done, len(self.ids)
        ready, self.held, self.stopped = _split_at_stops(self.held, self.stops)
        return ready

    def finish(self) -> str:
        """The rest, once no token follows: held text, and bytes that never completed a character
        rendered as the full decode would."""
        if self.stopped:
            return ""
        tail = self._decode(self.ids[self.start :])[len(self._decode(self.ids[self.start : self.done])) :]
        ready, held, self.stopped = _split_at_stops(self.held + tail, self.stops)
        self.held = ""
        return ready + held

    def _decode(self, ids: list[int]) -> str:
        if self.skip_special_tokens:
            return self.tokenizer.decode(ids, skip_special_tokens=True)
        return self.tokenizer.decode(ids)


def _onednn_linear(packed, key, module, x):
    weight = module.weight
    # Plain layer when training, when the weight changed since packing (in place, or swapped by
    # .to()), or when autocast hands it another dtype.
    if torch.is_grad_enabled() or (weight.data_ptr(), weight._version) != key or x.dtype != packed.dtype:
        return nn.functional.linear(x, weight, module.bias)
    return torch.ops.mkldnn._linear_pointwise(x, packed, module.bias, "none", [], "")


class PackedLinears:
    """CPU inference through oneDNN, with every linear weight prepacked into its blocked layout.

    PyTorch multiplies fp32 on the CPU through MKL; on this project's AMD EPYC machines oneDNN's
    prepacked matmul is 1.5-3.6x faster for decode-sized batches (benchmarks/RESULTS.md) and
    agrees with it to fp32 rounding. The price is a second copy of the linear weights for as
    long as this object lives. Weights under ``MIN_WEIGHTS`` elements stay on MKL: oneDNN's
    fixed cost per call (~15 us) outweighs its speed on them.

    ``with packed():`` routes the model's linear layers through the packed copies. A weight that
    changed since it was packed (its storage or version counter moved: an optimizer step, a
    load, ``.to()``) is packed again on entry, and inside the block falls back to the plain
    layer, as does any call with gradients enabled. On other devices, dtypes or builds it does
    nothing.
    """

    MIN_WEIGHTS = 1 << 17

    def __init__(self, model: nn.Module):
        self.model = model
        self.linears = [m for m in model.modules() if isinstance(m, nn.Linear) and m.weight.numel() >= self.MIN_WEIGHTS]
        self.packs: dict[nn.Linear, tuple[tuple, torch.Tensor]] = {}

    def _usable(self) -> bool:
        weight = self.model.lm_head.weight
        if weight.device.type != "cpu" or not torch.backends.mkldnn.is_available():
            return False
        if not hasattr(torch.ops.mkldnn, "_linear_pointwise"):
            return False
        if weight.dtype == torch.bfloat16:
            return torch.ops.mkldnn._is_mkldnn_bf16_supported()
        return weight.dtype == torch.float32

    @contextmanager
    def __call__(self) -> Iterator[None]:
        if not self._usable():
            yield
            return
        for module in self.linears:
            weight = module.weight
            key = (weight.data_ptr(), weight._version, weight.dtype, tuple(weight.shape))
            if module not in self.packs or self.packs[module][0] != key:
                self.packs[module] = (key, torch.ops.mkldnn._reorder_linear_weight(weight.detach()))
            packed = self.packs[module][1]
            module.__dict__["forward"] = partial(_onednn_linear, packed, key[:2], module)
        try:
            yield
        finally:
            for module in self.linears:
                module.__dict__.pop("forward", None)


class StaticKVCache(KVCache):
    """A KV cache whose decode steps keep every shape fixed, as a CUDA graph needs.

    While ``fixed_shape`` is set (by ``StaticDecodeStep``), a step writes at the slot held in
    the device tensor ``index`` and attends over the whole cache (the step's mask hides the
    slots not written yet), so no Python number reaches it. Otherwise, for the prompt, it is a
    ``KVCache``.
    """

    def __init__(self, config, batch_size: int, max_len: int, device, dtype):
        super().__init__(config, batch_size, max_len, device, dtype)
        self.index = torch.zeros(1, dtype=torch.long, device=device)
        self.fixed_shape = False

    def update(self, layer: int, kv):
        if not self.fixed_shape:
            return super().update(layer, kv)
        both = self.kv[layer]
        both.index_copy_(3, self.index, kv)
        return both.unbind()


class StaticDecodeStep:
    """The model's one-token decode step over a ``StaticKVCache``, with inputs in fixed buffers.

    On CUDA the step is captured once as a CUDA graph and replayed: small-batch decode on a GPU
    is bound by the launch cost of its hundreds of small kernels (issue [model] quotes 86 new
    tokens/s for transformers' eager cache on a 124M model on an H200), which a replay pays once.
    Elsewhere it runs eagerly, which is how the tests check it against the dynamic path.

    A replay reads nothing but its buffers (token ids, positions, the cache's slot index, the
    rows' real-key mask) and the model's weights in place, so one step serves every generation
    of its batch size and cache length until the weights move (``fits``), one generation at a
    time: ``start`` claims it and ``finish`` frees it.
    """

    CAPTURE_DEVICES = ("cuda",)

    def __init__(self, model: GPT, batch: int, max_len: int):
        param = next(model.parameters())
        device = param.device
        self.model = model
        self.cache = StaticKVCache(model.config, batch, max_len, device, param.dtype)
        self.real_key = additive_mask(torch.ones(batch, 1, 1, max_len, dtype=torch.bool, device=device), param.dtype)
        self.ids = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.positions = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.slots = torch.arange(max_len, device=device)
        self.weights = _weights_key(model)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: torch.Tensor | None = None
        self.in_use = False

    def fits(self, model: GPT, batch: int, max_len: int) -> bool:
        """Whether this step can serve a new generation: same shapes, no generation using it, and
        the weights it captured still the model's (a ``.to()`` or a reassigned parameter moves them)."""
        same_shape = self.cache.kv.size(2) == batch and self.cache.max_len == max_len
        return same_shape and not self.in_use and model is self.model and _weights_key(model) == self.weights

    def start(self, real_key: torch.Tensor | None) -> StaticKVCache:
        """Begin a generation: an empty cache, whose pad slots ``real_key`` (B, 1, 1, S <= max_len;
        additive) masks; None: no padding. Returns the cache for the prompt's prefill."""
        self.in_use = True
        self.cache.pos = 0
        # Masked slots still enter attention's weighted sum (with weight 0), so a non-finite value
        # an earlier generation left there would poison this one.
        self.cache.kv.zero_()
        self.real_key.zero_()
        if real_key is not None:
            self.real_key[..., : real_key.size(-1)].copy_(real_key)
        return self.cache

    def finish(self) -> None:
        self.in_use = False

    def _forward(self, slot: int) -> torch.Tensor:
        # The written slots, this one included, of the rows' real keys: one mask for all layers.
        mask = torch.where(self.slots <= self.cache.index, self.real_key, float("-inf"))
        self.cache.pos, self.cache.fixed_shape = slot, True  # pos: for hidden()'s length check only
        try:
            hidden = self.model.hidden(self.ids, self.positions, mask, self.cache)
        finally:
            self.cache.fixed_shape = False
        return self.model.lm_head(hidden[:, -1]).float()

    def __call__(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Logits (B, V) of the next token after ``ids`` (B, 1), written at slot ``cache.pos``."""
        slot = self.cache.pos
        self.ids.copy_(ids)
        self.positions.copy_(positions)
        self.cache.index.fill_(slot)
        device = self.cache.kv.device
        if self.graph is not None:
            self.graph.replay()
        elif device.type in self.CAPTURE_DEVICES:
            self._capture(slot)
        else:
            self.logits = self._forward(slot)
        self.cache.pos = slot + 1
        return self.logits

    def _capture(self, slot: int) -> None:
        with torch.cuda.device(self.cache.kv.device):  # streams and capture follow the current device, not the model's
            # Warm-up on a side stream first, as capture requires; every run writes the same keys
            # and values into the same slot, so the cache ends as one step would leave it.
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(2):
                    self._forward(slot)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self.logits = self._forward(slot)
            self.graph = graph
            graph.replay()


class _HostCopy:
    """Tensors (or None) on their way to the host. From a CUDA device they are copied asynchronously
    into pinned memory and an event marks the copy's end, so reading them waits for the copy
    alone, not for the work queued after it (the next decode step)."""

    def __init__(self, *tensors: torch.Tensor | None):
        self.tensors = [t.to("cpu", non_blocking=True) if t is not None else None for t in tensors]
        self.copied = None
        device = next((t.device for t in tensors if t is not None), None)
        if device is not None and device.type == "cuda":
            self.copied = torch.cuda.Event()
            self.copied.record(torch.cuda.current_stream(device))

    def lists(self) -> list[list | None]:
        if self.copied is not None:
            self.copied.synchronize()
        return [t.tolist() if t is not None else None for t in self.tensors]


def _weights_key(model: nn.Module) -> tuple:
    """Where and in what dtype every tensor a captured step reads from the model lives."""
    return tuple((t.data_ptr(), t.dtype) for t in (*model.parameters(), *model.buffers()))


class Engine:
    """Generates from a ``GPT`` on its own device and dtype; a tokenizer is needed only for text.

    The tokenizer is duck-typed: ``encode(text) -> list[int]`` (adding BOS), ``decode(ids) -> str``
    (the ``Scheduler`` also passes Hugging Face's ``skip_special_tokens=True``) and ``eos_id``. An
    Engine serves one thread: its generations may interleave as streams, but not run from several
    threads at once.

    With ``cuda_graphs=True``, decode steps on CUDA replay a CUDA graph over a fixed-shape cache.
    The most recent cache and graph are kept for the next generation of the same batch size and
    rounded length, so the engine holds that cache's memory until another shape replaces it; a
    stream that starts while another holds it gets a cache of its own. It is opt-in until it has
    been checked and timed on a GPU (on CPU the tests run the fixed-shape step eagerly and through
    a stand-in for replay). Otherwise the cache grows step by step.
    """

    STATIC_DECODE_DEVICES = ("cuda",)
    AHEAD_DEVICES = ("cuda",)  # asynchronous: a step launched ahead overlaps the host; elsewhere it would only be waste
    STATIC_CACHE_ROUNDING = 64  # attention reads every slot of a fixed-shape cache: keep the slack small

    def __init__(self, model: GPT, tokenizer=None, cuda_graphs: bool = False):
        self.model = model
        self.tokenizer = tokenizer
        self.cuda_graphs = cuda_graphs
        self.packed = PackedLinears(model)
        self._last_static_step: StaticDecodeStep | None = None

    @classmethod
    def from_pretrained(
        cls, path: str | os.PathLike, device: str = "cpu", dtype=None, cuda_graphs: bool = False
    ) -> Engine:
        """The model of a folder, in eval mode, with the tokenizer that text needs."""
        from gptlab.tokenizer import Tokenizer

        path = Path(path)
        model = GPT.from_pretrained(path, device=device, dtype=dtype).eval()
        if not (path / "tokenizer.json").is_file():
            raise UserError(
                f"{path} has no tokenizer.json, so text cannot be encoded; copy the tokenizer files into the "
                "model folder (gptlab pretrain and sft save them there)"
            )
        return cls(model, Tokenizer.from_pretrained(path), cuda_graphs=cuda_graphs)

    def stream(
        self,
        prompts: list[list[int]],
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        stop_ids: list[int] | None = None,
        return_logprobs: bool = False,
        n: int = 1,
        repetition_penalty: float = 1.0,
    ) -> Iterator[list[int | None]] | Iterator[tuple[list[int | None], list[float | None]]]:
        """Yield, after each decode step, one entry per row: its new token, or None once it has stopped.

        There are ``n`` rows per prompt, which share one prefill of it: rows ``i*n`` to ``i*n + n-1``
        continue prompt ``i`` (transformers' ``num_return_sequences`` order).
        A row stops after emitting one of ``stop_ids`` (that token is emitted, as in Hugging Face)
        or after ``max_new_tokens``; the stream ends when every row has stopped.
        Each next token is chosen as transformers does: ``repetition_penalty`` (CTRL's: the logit of
        every token already in the row's prompt or continuation is divided by it when positive and
        multiplied by it when negative), then temperature, top-k, top-p. ``temperature == 0`` is
        greedy decoding and ignores ``seed``, ``top_k`` and ``top_p``.
        With ``return_logprobs`` each step yields ``(tokens, logprobs)``: the log-softmax of the
        raw logits (before the penalty, temperature and filtering) at each emitted token.
        Arguments are checked now; the model runs as the stream is consumed.
        """
        sampling = Sampling(temperature, top_k, top_p, repetition_penalty, seed)
        self._check(prompts, max_new_tokens, n, sampling)
        steps = self._steps(prompts, max_new_tokens, stop_ids, return_logprobs, n, sampling)
        return steps if return_logprobs else (tokens for tokens, _ in steps)

    def generate(
        self,
        prompts: list[list[int]],
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        stop_ids: list[int] | None = None,
        return_logprobs: bool = False,
        n: int = 1,
        repetition_penalty: float = 1.0,
    ) -> list[list[int]] | tuple[list[list[int]], list[list[float]]]:
        """The new tokens of each row, ``n`` per prompt (a stop id, when reached, is the last of
        them); see ``stream``. With ``return_logprobs``, returns ``(tokens, logprobs)`` with one
        log-prob per new token.
        """
        sampling = Sampling(temperature, top_k, top_p, repetition_penalty, seed)
        self._check(prompts, max_new_tokens, n, sampling)
        tokens: list[list[int]] = [[] for _ in range(len(prompts) * n)]
        logprobs: list[list[float]] = [[] for _ in range(len(prompts) * n)]
        for step_tokens, step_logprobs in self._steps(prompts, max_new_tokens, stop_ids, return_logprobs, n, sampling):
            for row, token in enumerate(step_tokens):
                if token is not None:
                    tokens[row].append(token)
                    if return_logprobs:
                        logprobs[row].append(step_logprobs[row])
        return (tokens, logprobs) if return_logprobs else tokens

    def generate_text(self, text: str | list[int], **kwargs) -> str:
        """Continue ``text`` and return the new text; see ``stream_text``."""
        return "".join(self.stream_text(text, **kwargs))

    def stream_text(
        self,
        text: str | list[int],
        max_new_tokens: int,
        stop_ids: list[int] | None = None,
        stop: str | Sequence[str] = (),
        **kwargs,
    ) -> Iterator[str]:
        """Yield the new text in pieces as it is generated; the pieces join to the decoded continuation.

        ``text`` is encoded with BOS; a list of ids is the prompt as it is (a rendered chat, say).
        Generation ends at a token of ``stop_ids`` (default: EOS), which is not rendered, or at
        the first of the ``stop`` strings, which is left out with everything after it (as OpenAI's
        and vLLM's ``stop``); text that could still turn into a stop string is held back until it
        cannot.

        The text comes out of a ``TextStream``, the same per-sequence stream the continuous-batching
        scheduler uses.
        """
        tok = self._require_tokenizer()
        if kwargs.get("n", 1) != 1:
            raise UserError("the text helpers continue one prompt once; for several samples use generate(..., n=...)")
        stop_ids = [tok.eos_id] if stop_ids is None else stop_ids
        stops = set(stop_ids)
        text_stream = TextStream(tok, stop)
        prompt = tok.encode(text) if isinstance(text, str) else list(text)
        steps = self.stream([prompt], max_new_tokens, stop_ids=stop_ids, **kwargs)
        try:
            for (token,) in steps:
                if token in stops:
                    break
                piece = text_stream.push(token)
                if piece:
                    yield piece
                if text_stream.stopped:
                    return
        finally:
            steps.close()  # a stop string ends the model's stream too
        rest = text_stream.finish()
        if rest:
            yield rest

    def _require_tokenizer(self):
        if self.tokenizer is None:
            raise UserError("text generation needs a tokenizer: create the Engine as Engine(model, tokenizer)")
        return self.tokenizer

    def _check(self, prompts, max_new_tokens: int, n: int, sampling: Sampling) -> None:
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise UserError(f"n (samples per prompt) must be a positive integer, got {n!r}")
        check_prompts(self.model.config, prompts, max_new_tokens, sampling)

    def _steps(self, prompts, max_new_tokens, stop_ids, return_logprobs, n, sampling):
        """The decode loop: yields (tokens, logprobs) per step; logprobs entries are None unless asked for.

        On the ``AHEAD_DEVICES`` the next step is launched before the host reads this step's
        tokens, so the device computes while Python yields them; when no row is left running, that
        step's result is dropped.
        """
        if not prompts or max_new_tokens == 0:
            return
        param = next(self.model.parameters())
        device, batch, rows = param.device, len(prompts), len(prompts) * n
        ids, positions, prefill_mask, real_key = _left_padded(prompts, max_new_tokens, device)
        if real_key is not None:  # additive once: each step passes a slice of it to every layer
            real_key = additive_mask(real_key, attention_dtype(param))
        longest = ids.size(1)
        length = longest + max_new_tokens
        seen = None
        if sampling.repetition_penalty != 1.0:
            seen = _prompt_tokens_seen(prompts, self.model.config.vocab_size, device)
        # The prompt runs once; its n rows of samples start from copies of its keys and values.
        per_sample = (lambda t: t.repeat_interleave(n, dim=0)) if n > 1 else (lambda t: t)
        prompt_positions = positions[:, :longest]
        positions = per_sample(positions)
        seen = per_sample(seen) if seen is not None else None
        real_key = per_sample(real_key) if real_key is not None else None
        generator = None
        if sampling.temperature > 0 and sampling.seed is not None:
            generator = torch.Generator(device=device).manual_seed(sampling.seed)
        stops = set(stop_ids or ())
        prompt_cache = KVCache(self.model.config, batch, longest, device, param.dtype) if n > 1 else None
        static_step = None
        # Autocast's cached weight casts would be freed under a captured graph, so it runs eagerly.
        if (
            self.cuda_graphs
            and device.type in self.STATIC_DECODE_DEVICES
            and not torch.is_autocast_enabled(device.type)
        ):
            static_step = self._static_step(rows, length)
            cache = static_step.start(real_key)  # claims the step: nothing that can fail comes before the try
        else:
            cache = KVCache(self.model.config, rows, length, device, param.dtype)

        def decode(token):
            end = cache.pos + 1
            mask = real_key[..., :end] if real_key is not None else None
            logits = self._logits(token[:, None], positions[:, end - 1 : end], mask, cache, static_step)
            return self._pick(logits, sampling, generator, seen, return_logprobs)

        ahead = device.type in self.AHEAD_DEVICES
        running = [True] * rows
        try:
            with self.packed():  # spans the yields: safe, as packed layers fall back when grads or weights change
                logits = self._logits(
                    ids, prompt_positions, prefill_mask, prompt_cache if prompt_cache is not None else cache
                )
                if prompt_cache is not None:
                    cache.copy_rows_from(prompt_cache, n)
                    prompt_cache = None  # not held while the rows decode
                    logits = per_sample(logits)
                chosen = self._pick(logits, sampling, generator, seen, return_logprobs)
                for step in range(max_new_tokens):
                    last = step == max_new_tokens - 1
                    on_host = _HostCopy(*chosen)
                    if ahead and not last:
                        chosen = decode(chosen[0])
                    tokens, logprobs = on_host.lists()
                    logprobs = logprobs if return_logprobs else [None] * rows
                    yield (
                        [t if alive else None for t, alive in zip(tokens, running)],
                        [lp if alive else None for lp, alive in zip(logprobs, running)],
                    )
                    running = [alive and t not in stops for t, alive in zip(tokens, running)]
                    if last or not any(running):
                        return
                    if not ahead:
                        chosen = decode(chosen[0])
        finally:  # also when the caller stops consuming the stream early
            if static_step is not None:
                static_step.finish()

    def _static_step(self, batch: int, length: int) -> StaticDecodeStep:
        """The fixed-shape step for ``batch`` rows of up to ``length`` tokens: the last one when it
        fits, so its graph is replayed rather than captured again. Cache lengths are rounded up to
        a multiple of ``STATIC_CACHE_ROUNDING`` so that prompts of similar lengths share one."""
        rounding = self.STATIC_CACHE_ROUNDING
        max_len = min(self.model.config.block_size, -(-length // rounding) * rounding)
        last = self._last_static_step
        if last is not None and last.fits(self.model, batch, max_len):
            return last
        if last is not None and last.in_use:  # another stream is decoding with it: this one gets its own
            return StaticDecodeStep(self.model, batch, max_len)
        self._last_static_step = None  # the old cache and graph go before the new ones are made
        self._last_static_step = StaticDecodeStep(self.model, batch, max_len)
        return self._last_static_step

    @contextmanager
    def eval_mode(self) -> Iterator[None]:
        """Dropout off while the model generates or scores; a model used in the middle of training
        goes back to training mode afterwards."""
        training = self.model.training
        if training:
            self.model.eval()
        try:
            yield
        finally:
            if training:
                self.model.train()

    @torch.inference_mode()
    def _logits(self, ids, positions, attn_mask, cache, static_step=None) -> torch.Tensor:
        """Run ``ids`` through the model into ``cache``; the last position's logits (B, V) in fp32.
        A ``static_step`` runs one-token steps instead (its own mask covers ``attn_mask``)."""
        with self.eval_mode():
            if static_step is not None:
                return static_step(ids, positions)
            hidden = self.model.hidden(ids, positions, attn_mask, cache)
            return self.model.lm_head(hidden[:, -1]).float()

    @torch.inference_mode()
    def _pick(self, logits, sampling: Sampling, generator, seen, return_logprobs):
        """Each row's next token (B,) and its raw log-prob (B,) or None; ``seen`` (B, V) marks the
        tokens the repetition penalty applies to, and learns the new ones."""
        scores = penalized(logits, seen, sampling.repetition_penalty) if seen is not None else logits
        token = sample_next(scores, sampling.temperature, sampling.top_k, sampling.top_p, generator)
        if seen is not None:
            seen.scatter_(1, token[:, None], True)
        if not return_logprobs:
            return token, None
        return token, token_logprobs(logits, token)


def check_prompts(config, prompts, max_new_tokens: int, sampling: Sampling, max_len: int | None = None) -> None:
    """Refuse, in one line, what a generation cannot run: a negative ``max_new_tokens``, bad
    ``sampling``, prompts that are not lists of the vocabulary's ids, or a prompt that with its new
    tokens would not fit ``max_len`` (default: the model's block_size)."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise UserError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    sampling.check()
    if isinstance(prompts, torch.Tensor) or any(isinstance(p, torch.Tensor) for p in prompts):
        raise UserError("prompts are lists of token ids, one list per prompt; pass tensor.tolist()")
    for row, prompt in enumerate(prompts):
        if not prompt:
            raise UserError(f"prompt {row} is empty: give at least one token (e.g. BOS)")
        if not all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            raise UserError(f"prompt {row} holds something other than integer token ids")
        if min(prompt) < 0 or max(prompt) >= config.vocab_size:
            raise UserError(f"prompt {row} has token ids outside the model's vocabulary [0, {config.vocab_size})")
    longest = max((len(p) for p in prompts), default=0)
    max_len = config.block_size if max_len is None else max_len
    limit = f"the model's block_size {max_len}" if max_len == config.block_size else f"the cache's {max_len} slots"
    if longest + max_new_tokens > max_len:
        raise UserError(
            f"prompt of {longest} tokens + max_new_tokens {max_new_tokens} exceeds {limit}: "
            "shorten the prompt or lower max_new_tokens"
        )


def penalized(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL's repetition penalty, as transformers applies it: the logit of every token marked in
    ``seen`` (same shape) is divided by ``penalty`` when positive and multiplied by it when negative."""
    return torch.where(seen, torch.where(logits < 0, logits * penalty, logits / penalty), logits)


def _left_padded(prompts, max_new_tokens: int, device) -> tuple:
    """The prompts as one left-padded batch: ids (B, P), the position of every cache slot (B, P +
    max_new_tokens), 0 at each row's first real token, and, when some row is padded, the prefill
    mask (B, 1, P, P) and the real-key mask (B, 1, 1, S) that decode steps slice; both None
    without padding (plain causal attention, no mask tensors)."""
    longest = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (longest - len(p)) + list(p) for p in prompts], device=device)
    pad = torch.tensor([longest - len(p) for p in prompts], device=device)
    slots = torch.arange(longest + max_new_tokens, device=device)
    positions = (slots - pad[:, None]).clamp(min=0)
    if not bool((pad > 0).any()):
        return ids, positions, None, None
    real_key = (slots >= pad[:, None])[:, None, None, :]
    causal = torch.ones(longest, longest, dtype=torch.bool, device=device).tril()
    # A pad query attends only to itself: a fully masked row would give NaN, which the pad's keys
    # and values would then carry into later layers.
    eye = torch.eye(longest, dtype=torch.bool, device=device)
    return ids, positions, causal & (real_key[..., :longest] | eye), real_key


def _prompt_tokens_seen(prompts, vocab_size: int, device) -> torch.Tensor:
    """(B, V): the tokens of each prompt, which the repetition penalty applies to."""
    seen = torch.zeros(len(prompts), vocab_size, dtype=torch.bool, device=device)
    rows = torch.tensor([row for row, prompt in enumerate(prompts) for _ in prompt], dtype=torch.long, device=device)
    tokens = torch.tensor([token for prompt in prompts for token in prompt], dtype=torch.long, device=device)
    seen[rows, tokens] = True
    return seen


def _split_at_stops(text: str, stops: Sequence[str]) -> tuple[str, str, bool]:
    """(text that can be emitted, text held back, whether a stop string was found). Before the
    first stop string everything is emitted and the rest dropped; otherwise the longest end of
    ``text`` that begins some stop string is held back."""
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    if found:
        return text[: min(found)], "", True
    held = max((k for s in stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
    return text[: len(text) - held], text[len(text) - held :], False
