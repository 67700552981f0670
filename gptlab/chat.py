"""A multi-turn conversation with a model: `gptlab chat` streams it to the terminal, and the demo,
the server and the arena hold their conversations through ``ChatSession`` too.

The prompt is the chat template over the whole history plus the generation prompt; the reply
stops at ``<|end|>`` or EOS. When the history no longer leaves room for a reply of
``max_new_tokens`` in the model's block size, the oldest exchanges are dropped (the system
message stays) with a notice, as a chat interface with a finite context has to.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Iterator
from typing import BinaryIO, TextIO

from gptlab.engine import Engine, Sampling
from gptlab.errors import UserError
from gptlab.fileio import check_text, decoded_lines
from gptlab.tokenizer import Tokenizer


class ChatSession:
    """The history of one conversation and the sampling settings of its replies."""

    def __init__(
        self,
        engine: Engine,
        system: str | None = None,
        max_new_tokens: int | None = None,
        temperature: float = 0.8,
        seed: int | None = None,
        notify: Callable[[str], None] = lambda message: None,
    ):
        """``max_new_tokens``: the longest reply; default ``default_reply_tokens(engine)``."""
        Sampling(temperature=temperature, seed=seed).check()
        tokenizer = engine.tokenizer
        block_size = engine.model.config.block_size
        if max_new_tokens is None:
            max_new_tokens = default_reply_tokens(engine)
        if max_new_tokens < 1:
            raise UserError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        self.budget = block_size - max_new_tokens  # prompt tokens that leave room for a full reply
        self.messages: list[dict] = [{"role": "system", "content": system}] if system else []
        _check_room(tokenizer, self.messages, block_size, max_new_tokens)
        self.engine, self.tokenizer = engine, tokenizer
        self.max_new_tokens, self.temperature, self.seed, self.notify = max_new_tokens, temperature, seed, notify
        self.turns = 0
        self.stop_ids = reply_stop_ids(tokenizer)

    def reply(self, text: str) -> Iterator[str]:
        """Add a user message and stream the assistant's reply, which joins the history when done."""
        messages, dropped = fit_history(
            self.tokenizer, self.messages + [{"role": "user", "content": text}], self.budget
        )
        prompt = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        if len(prompt) > self.budget:
            self.notify(
                f"this message is too long for the model ({len(prompt)} prompt tokens, at most {self.budget} "
                "with --max-new-tokens); it was not sent"
            )
            return
        if dropped:
            self.notify(f"dropped the {dropped} oldest messages to fit the model's block size")
        seed = None if self.seed is None else self.seed + self.turns  # reproducible, yet not the same draw each turn
        self.turns += 1
        pieces = []
        for piece in self.engine.stream_text(
            prompt, max_new_tokens=self.max_new_tokens, stop_ids=self.stop_ids, temperature=self.temperature, seed=seed
        ):
            pieces.append(piece)
            yield piece
        self.messages = messages + [{"role": "assistant", "content": "".join(pieces)}]


def default_reply_tokens(engine: Engine) -> int:
    """The longest reply when none is asked for: half the model's block size (the other half for the
    conversation), at most 256."""
    return min(256, engine.model.config.block_size // 2)


def reply_stop_ids(tokenizer: Tokenizer) -> list[int]:
    """Where a reply ends: the end-of-turn token, or EOS."""
    return [t for t in (tokenizer.end_id, tokenizer.eos_id) if t is not None]


def chat_replies(
    engine: Engine,
    prompts: list[list[dict]],
    max_new_tokens: int,
    temperature: float = 0.0,
    batch_size: int = 32,
    seed: int | None = None,
) -> list[str]:
    """One reply to each conversation of ``prompts`` (lists of messages), generated ``batch_size``
    conversations at a time: each through the chat template with its generation prompt, ending at
    the end-of-turn token or EOS (left out, as are special tokens). Greedy by default; with a
    ``temperature`` and a ``seed``, batch ``i`` samples with seed ``seed + i``, so the replies
    depend on the batch size but not on anything run before."""
    tokenizer = engine.tokenizer
    stops = reply_stop_ids(tokenizer)
    rendered = [tokenizer.apply_chat_template(p, add_generation_prompt=True) for p in prompts]
    replies = []
    for batch, start in enumerate(range(0, len(rendered), batch_size)):
        rows = engine.generate(
            rendered[start : start + batch_size],
            max_new_tokens,
            temperature=temperature,
            seed=None if seed is None else seed + batch,
            stop_ids=stops,
        )
        kept = (row[:-1] if row and row[-1] in stops else row for row in rows)
        replies += [tokenizer.decode(ids, skip_special_tokens=True) for ids in kept]
    return replies


def _check_room(tokenizer: Tokenizer, system: list[dict], block_size: int, max_new_tokens: int) -> None:
    """Refuse, naming what is too long, a system message or a reply length that leaves no room in
    the model's block size for a user message (counted as an empty one: its header and template)."""
    shortest = len(
        tokenizer.apply_chat_template(system + [{"role": "user", "content": ""}], add_generation_prompt=True)
    )
    if shortest >= block_size:
        what = "the system message takes" if system else "the chat template alone takes"
        fix = "shorten --system" if system else "use a model with a larger block size"
        raise UserError(
            f"{what} {shortest} tokens with an empty user message, leaving no room for a reply in the model's "
            f"block_size {block_size}; {fix}"
        )
    if shortest + max_new_tokens > block_size:
        with_system = f" (the system message and the chat template take {shortest})" if system else ""
        raise UserError(
            f"max_new_tokens {max_new_tokens} leaves no room for a user message in the model's block_size "
            f"{block_size}{with_system}; use --max-new-tokens {block_size - shortest} or less"
        )


def fit_history(tokenizer: Tokenizer, messages: list[dict], budget: int) -> tuple[list[dict], int]:
    """The most recent part of a chat whose prompt (with the generation prompt) fits ``budget``
    tokens: leading system messages stay, the oldest exchanges go first, whole (a user message
    and the replies after it). Returns (messages, number dropped); the last message is never
    dropped, so the caller checks that what is left fits."""
    system = 0
    while system < len(messages) and messages[system]["role"] == "system":
        system += 1
    head, rest = messages[:system], list(messages[system:])
    dropped = 0
    while len(rest) > 1 and len(tokenizer.apply_chat_template(head + rest, add_generation_prompt=True)) > budget:
        rest.pop(0)
        dropped += 1
        while len(rest) > 1 and rest[0]["role"] != "user":
            rest.pop(0)
            dropped += 1
    return head + rest, dropped


def run_chat(session: ChatSession, lines: Iterable[str], out: TextIO | None = None) -> None:
    """Answer each non-blank line as a user message: the reply as it streams, then a newline.
    A message that could not be sent gets an empty line, so replies stay in step with the input.
    ``out``: default the current ``sys.stdout`` (looked up at the call, so a redirect is followed)."""
    out = out if out is not None else sys.stdout
    for line in lines:
        text = line.rstrip("\r\n")
        if not text.strip():
            continue
        for piece in session.reply(text):
            out.write(piece)
            out.flush()
        out.write("\n")
        out.flush()


def typed_lines(prompt: str = "> ", notify: Callable[[str], None] = lambda message: None) -> Iterator[str]:
    """Lines typed at a terminal (with line editing), until Ctrl-D; a line that is not UTF-8 (a
    terminal set to another encoding) is not sent, with a notice, and the conversation goes on."""
    while True:
        try:
            line = input(prompt)
        except EOFError:
            print()
            return
        try:
            check_text(line, "that line")
        except UserError as e:
            notify(f"{e}; it was not sent")
            continue
        yield line


def piped_lines(stream: BinaryIO, source: str = "stdin") -> Iterator[str]:
    """The lines of a piped conversation, decoded as UTF-8: a line that is not ends the chat with
    one error naming the line, before anything more is sent."""
    for _, line in decoded_lines(stream, source):
        yield line
