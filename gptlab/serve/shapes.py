"""Response bodies in OpenAI's shapes: token texts, text offsets and the two log-prob layouts
(the legacy completions' ``tokens``/``token_logprobs``/``top_logprobs``/``text_offset`` lists and
chat's ``content`` entries).

A token's text is its own decoding (special tokens by name). Its offset is where its text begins
in the response's text: for an echoed string prompt, the prompt as sent, where the BOS the
tokenizer added has no text, so the offsets split a prompt at any character position a client
sent it with (``gptlab eval --backend openai`` splits context from continuation that way).
"""

from __future__ import annotations

from gptlab.engine.batching import TokenLogprob
from gptlab.tokenizer import Tokenizer

REPLACEMENT_CHAR = "\ufffd"


class TokenTexts:
    """The text of single tokens of one tokenizer, decoded once each."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self._texts: dict[int, str] = {}

    def __call__(self, token: int) -> str:
        text = self._texts.get(token)
        if text is None:
            text = self._texts[token] = self.tokenizer.decode([token])
        return text


def text_offsets(tokenizer: Tokenizer, ids: list[int], start: int = 0, skip_special_tokens: bool = False) -> list[int]:
    """Where each token's text begins in the decoding of ``ids``, plus ``start``.

    Token by token when the pieces join to the whole (byte-level BPE on complete characters);
    otherwise from the decoding of each prefix, a character cut in half counting as not begun
    (a token that ends inside a character starts where that character starts)."""

    def decode(part: list[int]) -> str:
        return tokenizer.decode(part, skip_special_tokens=skip_special_tokens)

    pieces = [decode([token]) for token in ids]
    if REPLACEMENT_CHAR not in "".join(pieces) and "".join(pieces) == decode(ids):
        offsets, at = [], start
        for piece in pieces:
            offsets.append(at)
            at += len(piece)
        return offsets
    return [start + len(decode(ids[:k]).rstrip(REPLACEMENT_CHAR)) for k in range(len(ids))]


def completion_logprobs(
    texts: TokenTexts, tokens: list[int], entries: list[TokenLogprob | None], offsets: list[int]
) -> dict:
    """The legacy completions' log-probs: the chosen token is always among a position's
    ``top_logprobs`` (so there may be k + 1 of them, as OpenAI documents); tokens whose texts are
    the same (byte tokens read as U+FFFD) share one entry, the most likely one's. None where a
    token has no log-prob (an echoed prompt's first)."""
    top = []
    for entry in entries:
        if entry is None:
            top.append(None)
            continue
        alternatives: dict[str, float] = {}
        for token, logprob in [*entry.top, (entry.token, entry.logprob)]:  # most likely first: it keeps a shared text
            alternatives.setdefault(texts(token), logprob)
        top.append(alternatives)
    return {
        "tokens": [texts(t) for t in tokens],
        "token_logprobs": [None if e is None else e.logprob for e in entries],
        "top_logprobs": top,
        "text_offset": offsets,
    }


def chat_logprobs(texts: TokenTexts, entries: list[TokenLogprob]) -> dict:
    """Chat's log-probs: one entry per generated token with its ``top_logprobs`` alternatives."""

    def item(token: int, logprob: float) -> dict:
        text = texts(token)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    return {"content": [item(e.token, e.logprob) | {"top_logprobs": [item(t, lp) for t, lp in e.top]} for e in entries]}


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }
