"""From a checked request body to scheduler requests, and from their outputs to OpenAI's responses.

A prompt is tokenized with the tokenizer's own special tokens (BOS for gptlab's), as vLLM and
transformers do, except that a text which already begins with BOS gets no second one (as
lm-evaluation-harness encodes, so a chat context rendered to text reads back as the same ids).
Token-id prompts are taken as they are. Chat messages go through the model's chat template with
the generation prompt; the reply stops at the end-of-turn token or EOS. Completions stop at EOS.

Each of ``n`` choices is its own sequence; with a ``seed``, choice ``i`` draws with ``seed + i``,
so a seeded request gives the same choices again whatever else the server is doing.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from starlette.requests import Request as HttpRequest
from starlette.responses import StreamingResponse

from gptlab.engine import Sampling
from gptlab.engine.batching import Output, Request, TokenLogprob
from gptlab.errors import UserError
from gptlab.serve.protocol import ApiError, ChatRequest, CompletionRequest, invalid
from gptlab.serve.shapes import TokenTexts, chat_logprobs, completion_logprobs, text_offsets, usage
from gptlab.serve.worker import ModelWorker, Sequence

COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's (and vLLM's) default for /v1/completions
DEFAULT_TEMPERATURE = 1.0  # OpenAI's default


@dataclass
class ServedModel:
    """A model the server answers for: its scheduler thread and what requests are checked against."""

    name: str
    worker: ModelWorker
    texts: TokenTexts
    block_size: int
    vocab_size: int
    created: int

    @property
    def tokenizer(self):
        return self.texts.tokenizer


@dataclass(frozen=True)
class Limits:
    """The server's own limits (``--max-prompt-tokens``, ``--max-new-tokens``); None: the model's window."""

    max_prompt_tokens: int | None = None
    max_new_tokens: int | None = None


@dataclass
class Prompt:
    ids: list[int]
    text: str  # what ``echo`` returns: the prompt as sent (token ids: their decoding)
    added: int = 0  # special tokens the tokenizer put before the text (BOS): they have no text


@dataclass
class Result:
    """Everything one sequence produced."""

    tokens: list[int] = field(default_factory=list)
    text: str = ""
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob | None] | None = None
    finish_reason: str | None = None

    def add(self, output: Output) -> None:
        self.tokens += output.token_ids
        self.text += output.text
        self.logprobs += output.logprobs or []
        if output.prompt_logprobs is not None:
            self.prompt_logprobs = output.prompt_logprobs
        self.finish_reason = output.finish_reason


# --------------------------------------------------------------------------- requests


def encode_text(model: ServedModel, text: str) -> Prompt:
    tokenizer = model.tokenizer
    bos = tokenizer.bos_token
    if bos and text.startswith(bos):
        return Prompt(tokenizer.encode(text, add_special_tokens=False), text)
    ids = tokenizer.encode(text)
    return Prompt(ids, text, added=len(ids) - len(tokenizer.encode(text, add_special_tokens=False)))


def completion_prompts(model: ServedModel, body: CompletionRequest, limits: Limits) -> list[Prompt]:
    prompts = []
    for prompt in body.prompts():
        if isinstance(prompt, str):
            prompts.append(encode_text(model, prompt))
            continue
        if min(prompt) < 0 or max(prompt) >= model.vocab_size:
            raise invalid("prompt", f"a token-id prompt has ids outside the model's vocabulary [0, {model.vocab_size})")
        prompts.append(Prompt(list(prompt), model.tokenizer.decode(prompt)))
    for prompt in prompts:
        check_prompt_length(model, limits, len(prompt.ids), "prompt")
    return prompts


def chat_prompt(model: ServedModel, body: ChatRequest, limits: Limits) -> Prompt:
    try:
        ids = model.tokenizer.apply_chat_template(body.chat_messages(), add_generation_prompt=True)
    except UserError as e:
        raise invalid("messages", f"model {model.name}: {e}") from None
    check_prompt_length(model, limits, len(ids), "messages")
    return Prompt(ids, "")


def check_prompt_length(model: ServedModel, limits: Limits, length: int, param: str) -> None:
    if not length:
        raise invalid(param, "the prompt is empty (this tokenizer adds no BOS): give some text or token ids")
    if limits.max_prompt_tokens is not None and length > limits.max_prompt_tokens:
        raise invalid(
            param,
            f"the prompt is {length} tokens, over this server's limit of {limits.max_prompt_tokens} "
            "(--max-prompt-tokens); shorten it",
            code="context_length_exceeded",
        )
    if length > model.block_size:
        raise invalid(
            param,
            f"the prompt is {length} tokens, over model {model.name}'s context of {model.block_size}; shorten it",
            code="context_length_exceeded",
        )


def reply_budget(model: ServedModel, limits: Limits, longest: int, asked: int | None, default: int | None) -> int:
    """The new tokens each sequence may generate: what was asked, checked against the server's
    limit and the room the longest prompt leaves in the model's window; if nothing was asked,
    ``default`` (None: all the room), within both."""
    room = model.block_size - longest
    cap = limits.max_new_tokens
    if asked is None:
        budget = room if default is None else min(default, room)
        return budget if cap is None else min(budget, cap)
    if cap is not None and asked > cap:
        raise invalid("max_tokens", f"max_tokens {asked} is over this server's limit of {cap} (--max-new-tokens)")
    if asked > room:
        raise invalid(
            "max_tokens",
            f"a prompt of {longest} tokens + max_tokens {asked} exceeds model {model.name}'s context of "
            f"{model.block_size}; lower max_tokens or shorten the prompt",
            code="context_length_exceeded",
        )
    return asked


def sampling_of(body: CompletionRequest | ChatRequest, seed: int | None) -> Sampling:
    sampling = Sampling(
        temperature=DEFAULT_TEMPERATURE if body.temperature is None else body.temperature,
        top_k=body.top_k_or_none(),
        top_p=body.top_p,
        repetition_penalty=1.0 if body.repetition_penalty is None else body.repetition_penalty,
        seed=seed,
    )
    try:
        sampling.check()
    except UserError as e:  # the message begins with the setting's name
        raise invalid(str(e).split()[0], str(e)) from None
    return sampling


def sequences_for(
    worker: ModelWorker,
    body: CompletionRequest | ChatRequest,
    prompts: list[Prompt],
    max_new_tokens: int,
    stop_ids: tuple[int, ...],
    logprobs: int | None,
    prompt_logprobs: bool,
    queue: asyncio.Queue | None = None,
) -> list[Sequence]:
    """``n`` sequences per prompt, choice index ``prompt * n + i`` (OpenAI's order), on one queue
    (a new one, or ``queue``: the arena reads two models' answers from one)."""
    queue = asyncio.Queue() if queue is None else queue
    arrived = time.monotonic()
    stop = body.stop_strings()
    sequences = []
    for p, prompt in enumerate(prompts):
        for i in range(body.n):
            request = Request(
                prompt=prompt.ids,
                max_new_tokens=max_new_tokens,
                sampling=sampling_of(body, None if body.seed is None else body.seed + i),
                stop_ids=() if body.ignore_eos else stop_ids,
                stop=stop,
                logprobs=logprobs,
                prompt_logprobs=prompt_logprobs,
            )
            sequences.append(Sequence(worker, request, queue, p * body.n + i, arrived))
    return sequences


def chat_sequences(
    model: ServedModel, body: ChatRequest, limits: Limits, queue: asyncio.Queue | None = None
) -> tuple[Prompt, list[Sequence]]:
    """The prompt and the ``n`` sequences of a chat request, checked against the limits (not admitted
    yet); each stops at the end-of-turn token or EOS."""
    prompt = chat_prompt(model, body, limits)
    budget = reply_budget(model, limits, len(prompt.ids), body.reply_limit(), None)
    if budget < 1:
        raise invalid("messages", f"the conversation fills model {model.name}'s context of {model.block_size} tokens")
    tokenizer = model.tokenizer
    stop_ids = tuple(t for t in (tokenizer.end_id, tokenizer.eos_id) if t is not None)
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    return prompt, sequences_for(model.worker, body, [prompt], budget, stop_ids, logprobs, False, queue)


def admit(worker: ModelWorker, sequences: list[Sequence]) -> None:
    if len(sequences) > worker.capacity:
        raise invalid(
            "n", f"this request asks for {len(sequences)} sequences; the server holds at most {worker.capacity}"
        )
    if not worker.admit(sequences):
        raise ApiError(
            429,
            f"model {worker.name} is busy ({worker.active} sequences running or queued); retry shortly",
            code="queue_full",
        )


# --------------------------------------------------------------------------- outputs


def failure(error: Exception) -> ApiError:
    if isinstance(error, UserError):
        return ApiError(400, str(error))
    return ApiError(500, f"the model failed on this request ({type(error).__name__}); see the server's log")


async def outputs(sequences: list[Sequence]) -> AsyncIterator[tuple[Sequence, Output]]:
    """The sequences' outputs as they come, until each has finished; an error raises ``ApiError``."""
    queue = sequences[0].queue
    pending = len(sequences)
    while pending:
        sequence, item = await queue.get()
        if isinstance(item, Exception):
            raise failure(item)
        if item.finish_reason is not None:
            pending -= 1
        yield sequence, item


async def results(http: HttpRequest, sequences: list[Sequence]) -> list[Result] | None:
    """Each sequence's result, in index order; None if the client went away first (its sequences
    are then cancelled, as they are on any way out)."""

    async def collect() -> list[Result]:
        gathered = [Result() for _ in sequences]
        async for sequence, output in outputs(sequences):
            gathered[sequence.index].add(output)
        return gathered

    async def client_gone() -> None:
        while (await http.receive())["type"] != "http.disconnect":
            pass

    work, gone = asyncio.ensure_future(collect()), asyncio.ensure_future(client_gone())
    try:
        await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not work.done():
            work.cancel()
        cancel(sequences)
    # A cancelled task is not cancelled() until the loop has run it once more: ask whether it finished.
    return work.result() if work.done() and not work.cancelled() else None


async def server_sent_events(sequences: list[Sequence], chunks: AsyncIterator[dict]) -> AsyncIterator[str]:
    """``data: {json}`` events, then ``data: [DONE]``; an error mid-stream becomes an error event.
    A client that disconnects cancels the stream's task, and so its sequences."""
    try:
        async for chunk in chunks:
            yield f"data: {json.dumps(chunk)}\n\n"
    except ApiError as e:
        yield f"data: {json.dumps(e.body())}\n\n"
    finally:
        cancel(sequences)
    yield "data: [DONE]\n\n"


def event_stream(sequences: list[Sequence], chunks: AsyncIterator[dict]) -> StreamingResponse:
    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}  # no proxy buffering of the stream
    return StreamingResponse(server_sent_events(sequences, chunks), media_type="text/event-stream", headers=headers)


def cancel(sequences: list[Sequence]) -> None:
    """Cancel the sequences not finished yet, each through its own model's worker (an arena battle's
    two sequences belong to two models: a scheduler knows only its own sequence ids)."""
    for worker in {id(s.worker): s.worker for s in sequences}.values():
        worker.cancel([s for s in sequences if s.worker is worker])


def response_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


# --------------------------------------------------------------------------- completions


def completion_logprobs_of(model: ServedModel, prompt: Prompt, result: Result, echo: bool, start: int) -> dict:
    """Log-probs of the (echoed prompt's and) generated tokens; offsets from ``start`` in the text."""
    tokens, entries, offsets = [], [], []
    if echo:
        tokens += prompt.ids
        entries += result.prompt_logprobs or [None] * len(prompt.ids)
        offsets += [0] * prompt.added + text_offsets(model.tokenizer, prompt.ids[prompt.added :], start)
        start += len(prompt.text)
    tokens += result.tokens
    entries += result.logprobs
    offsets += text_offsets(model.tokenizer, result.tokens, start, skip_special_tokens=True)
    return completion_logprobs(model.texts, tokens, entries, offsets)


def completion_response(
    model: ServedModel, body: CompletionRequest, prompts: list[Prompt], gathered: list[Result]
) -> dict:
    choices = []
    for index, result in enumerate(gathered):
        prompt = prompts[index // body.n]
        choice = {"index": index, "text": (prompt.text if body.echo else "") + result.text, "logprobs": None}
        if body.logprobs is not None:
            choice["logprobs"] = completion_logprobs_of(model, prompt, result, body.echo, 0)
        choices.append(choice | {"finish_reason": result.finish_reason})
    return {
        "id": response_id("cmpl"),
        "object": "text_completion",
        "created": int(time.time()),
        "model": model.name,
        "choices": choices,
        "usage": usage(sum(len(p.ids) for p in prompts), sum(len(r.tokens) for r in gathered)),
    }


async def completion_chunks(
    model: ServedModel, body: CompletionRequest, prompts: list[Prompt], sequences: list[Sequence]
) -> AsyncIterator[dict]:
    head = {"id": response_id("cmpl"), "object": "text_completion", "created": int(time.time()), "model": model.name}
    with_usage = body.stream_options is not None and body.stream_options.include_usage
    written = [0] * len(sequences)  # characters sent per choice: where the next token's offset starts
    started: set[int] = set()
    generated = 0
    async for sequence, output in outputs(sequences):
        prompt, first = prompts[sequence.index // body.n], body.echo and sequence.index not in started
        started.add(sequence.index)
        piece = Result()
        piece.add(output)
        text = (prompt.text if first else "") + output.text
        logprobs = None
        if body.logprobs is not None:
            logprobs = completion_logprobs_of(model, prompt, piece, first, written[sequence.index])
        written[sequence.index] += len(text)
        generated += len(output.token_ids)
        if not (text or output.token_ids or output.finish_reason):
            continue
        choice = {"index": sequence.index, "text": text, "logprobs": logprobs, "finish_reason": output.finish_reason}
        yield head | {"choices": [choice]} | ({"usage": None} if with_usage else {})
    if with_usage:
        yield head | {"choices": [], "usage": usage(sum(len(p.ids) for p in prompts), generated)}


# --------------------------------------------------------------------------- chat


def chat_response(model: ServedModel, body: ChatRequest, prompt: Prompt, gathered: list[Result]) -> dict:
    choices = []
    for index, result in enumerate(gathered):
        logprobs = chat_logprobs(model.texts, result.logprobs) if body.logprobs else None
        choices.append(
            {
                "index": index,
                "message": {"role": "assistant", "content": result.text},
                "logprobs": logprobs,
                "finish_reason": result.finish_reason,
            }
        )
    return {
        "id": response_id("chatcmpl"),
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model.name,
        "choices": choices,
        "usage": usage(len(prompt.ids), sum(len(r.tokens) for r in gathered)),
    }


async def chat_chunks(
    model: ServedModel, body: ChatRequest, prompt: Prompt, sequences: list[Sequence]
) -> AsyncIterator[dict]:
    head = {"id": response_id("chatcmpl"), "object": "chat.completion.chunk", "created": int(time.time())}
    head["model"] = model.name
    with_usage = body.stream_options is not None and body.stream_options.include_usage
    extra = {"usage": None} if with_usage else {}

    def chunk(index: int, delta: dict, logprobs=None, finish_reason=None) -> dict:
        choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
        return head | {"choices": [choice]} | extra

    for sequence in sequences:
        yield chunk(sequence.index, {"role": "assistant", "content": ""})
    generated = 0
    async for sequence, output in outputs(sequences):
        generated += len(output.token_ids)
        logprobs = chat_logprobs(model.texts, output.logprobs or []) if body.logprobs and output.token_ids else None
        if output.text or logprobs:
            yield chunk(sequence.index, {"content": output.text}, logprobs)
        if output.finish_reason is not None:
            yield chunk(sequence.index, {}, finish_reason=output.finish_reason)
    if with_usage:
        yield head | {"choices": [], "usage": usage(len(prompt.ids), generated)}
