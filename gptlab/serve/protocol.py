"""The OpenAI request bodies the server accepts, and its errors in OpenAI's shape.

Bodies are checked by pydantic (numbers strictly: ``true`` is not 1, ``"0.5"`` is not 0.5) and by
hand where a field takes several shapes (``prompt``, ``stop``, ``messages``), so that every refusal
names its parameter. Unknown fields are refused (a misspelt ``temprature`` would otherwise be
ignored); a few OpenAI fields the server does not implement are accepted at their neutral values.
vLLM's extensions ``top_k``, ``repetition_penalty`` and ``ignore_eos`` are accepted too.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, model_validator

MAX_N = 128  # choices per prompt, as OpenAI's limit
MAX_LOGPROBS = 20  # alternatives per token (OpenAI's chat limit; its completions stop at 5)
MAX_STOP = 4  # stop strings, as OpenAI's limit

Number = Annotated[float, Field(strict=True, allow_inf_nan=False)]


class ApiError(Exception):
    """A refusal in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``."""

    TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error", 429: "rate_limit_error"}

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        kind = self.TYPES.get(self.status, "server_error" if self.status >= 500 else "invalid_request_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


def invalid(param: str | None, message: str, code: str | None = None) -> ApiError:
    """A 400 naming ``param``."""
    return ApiError(400, message, param=param, code=code)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: StrictBool = False


class _Body(BaseModel):
    """What both endpoints take."""

    model_config = ConfigDict(extra="forbid")

    model: StrictStr
    n: StrictInt = Field(1, ge=1, le=MAX_N)
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    stop: Any = None
    seed: StrictInt | None = None
    temperature: Number | None = Field(None, ge=0)
    top_p: Number | None = Field(None, gt=0, le=1)
    top_k: StrictInt | None = Field(None, ge=-1)  # vLLM: -1 (or 0) is no top-k
    repetition_penalty: Number | None = Field(None, gt=0)  # vLLM's extension; 1 is none
    ignore_eos: StrictBool = False  # vLLM's extension: generate past EOS (benchmarks)
    # OpenAI fields with no effect here, accepted at their neutral values only.
    user: StrictStr | None = None
    presence_penalty: Number | None = None
    frequency_penalty: Number | None = None
    logit_bias: dict | None = None

    @model_validator(mode="after")
    def _neutral_and_consistent(self):
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name) not in (None, 0):
                raise invalid(name, f"{name} is not supported by this server; leave it out or at 0")
        if self.logit_bias:
            raise invalid("logit_bias", "logit_bias is not supported by this server; leave it out")
        if self.stream_options is not None and not self.stream:
            raise invalid("stream_options", "stream_options is only allowed with stream: true")
        return self

    def stop_strings(self) -> tuple[str, ...]:
        """``stop`` as a tuple of non-empty strings (a string or a list of at most four)."""
        stop = self.stop
        if stop is None:
            return ()
        if isinstance(stop, str):
            stop = [stop]
        if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
            raise invalid("stop", "stop must be a string or a list of strings")
        if len(stop) > MAX_STOP:
            raise invalid("stop", f"stop takes at most {MAX_STOP} strings, got {len(stop)}")
        return tuple(s for s in stop if s)

    def top_k_or_none(self) -> int | None:
        return self.top_k if self.top_k is not None and self.top_k > 0 else None


class CompletionRequest(_Body):
    """``POST /v1/completions``."""

    prompt: Any
    max_tokens: StrictInt | None = Field(None, ge=0)
    echo: StrictBool = False
    logprobs: StrictInt | None = Field(None, ge=0, le=MAX_LOGPROBS)
    best_of: StrictInt | None = None
    suffix: StrictStr | None = None

    @model_validator(mode="after")
    def _unsupported(self):
        if self.best_of not in (None, self.n):
            raise invalid("best_of", "best_of is not supported by this server; leave it out or equal to n")
        if self.suffix:
            raise invalid("suffix", "suffix (insertion) is not supported by this server; leave it out")
        return self

    def prompts(self) -> list[str] | list[list[int]]:
        """``prompt`` as a list of strings or a list of token-id lists, each non-empty."""
        prompt = self.prompt
        shape = "prompt must be a string, a list of strings, a list of token ids or a list of lists of token ids"
        if isinstance(prompt, str):
            return [prompt]
        if not isinstance(prompt, list) or not prompt:
            raise invalid("prompt", shape if prompt != [] else "prompt is empty")
        if all(isinstance(p, str) for p in prompt):
            return prompt
        if all(_is_id(t) for t in prompt):
            return [prompt]
        if all(isinstance(p, list) and all(_is_id(t) for t in p) for p in prompt):
            if any(not p for p in prompt):
                raise invalid("prompt", "a token-id prompt is empty: give at least one token")
            return prompt
        raise invalid("prompt", shape)


class ChatRequest(_Body):
    """``POST /v1/chat/completions``."""

    messages: Any
    max_tokens: StrictInt | None = Field(None, ge=1)
    max_completion_tokens: StrictInt | None = Field(None, ge=1)
    logprobs: StrictBool = False
    top_logprobs: StrictInt | None = Field(None, ge=0, le=MAX_LOGPROBS)
    response_format: dict | None = None

    @model_validator(mode="after")
    def _consistent(self):
        if self.top_logprobs is not None and not self.logprobs:
            raise invalid("top_logprobs", "top_logprobs needs logprobs: true")
        if self.response_format not in (None, {"type": "text"}):
            raise invalid("response_format", "only response_format {'type': 'text'} is supported by this server")
        return self

    def reply_limit(self) -> int | None:
        """The reply's token limit asked for: ``max_completion_tokens``, else the older ``max_tokens``."""
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def chat_messages(self) -> list[dict]:
        """``messages`` as ``{"role", "content"}`` dicts: content as a string or a list of text parts,
        the ``developer`` role read as ``system`` (OpenAI's newer name for it)."""
        messages = self.messages
        if not isinstance(messages, list) or not messages:
            raise invalid("messages", "messages must be a non-empty list of {'role', 'content'} objects")
        return [_message(m, i) for i, m in enumerate(messages)]


def _message(message: Any, index: int) -> dict:
    param = f"messages.{index}"
    if not isinstance(message, dict):
        raise invalid(param, f"message {index} is not an object with 'role' and 'content'")
    extra = set(message) - {"role", "content", "name"}
    if extra:
        raise invalid(param, f"message {index} has fields this server does not support: {', '.join(sorted(extra))}")
    role = "system" if message.get("role") == "developer" else message.get("role")
    if role not in ("system", "user", "assistant"):
        raise invalid(
            f"{param}.role", f"message {index} has role {message.get('role')!r}: use system, user or assistant"
        )
    content = message.get("content")
    if isinstance(content, list):
        if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
            raise invalid(f"{param}.content", f"message {index}: only text content parts are supported")
        content = "".join(p["text"] for p in content)
    if not isinstance(content, str):
        raise invalid(f"{param}.content", f"message {index} has no text content")
    return {"role": role, "content": content}


def _is_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
