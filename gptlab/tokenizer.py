"""Byte-level BPE tokenizer on top of the Hugging Face ``tokenizers`` library.

The library does the work (training, parallel encoding, serialisation); this module fixes the
recipe and the folder layout:

- Digits are split one per token before byte-level BPE (as Llama's tokenizer does), so
  arithmetic stays learnable for small models.
- No normalizer and a full 256-byte alphabet, so every Unicode string round-trips exactly.
- Special tokens get the first ids; BOS is added by the post-processor, so ``encode`` gives
  what ``transformers.AutoTokenizer`` gives for the saved folder.
- ``save_pretrained`` writes a folder that ``AutoTokenizer.from_pretrained`` loads as it is.
- One chat template: ``<|bos|>``, then ``<|role|>content<|end|>`` per message; the generation
  prompt is ``<|assistant|>``. ``render_chat`` builds it in Python from token ids (training needs
  the assistant mask as explicit spans); ``CHAT_TEMPLATE`` is the same thing in Jinja for
  transformers' ``apply_chat_template``, and the tests hold the two equal token for token.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as _HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from gptlab.errors import UserError, first_line
from gptlab.fileio import read_text, write_json_atomic, write_text_atomic

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
SYSTEM, USER, ASSISTANT, END = "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"
SPECIAL_TOKENS = (BOS, EOS, PAD, SYSTEM, USER, ASSISTANT, END)  # ids 0, 1, 2, ... in this order
MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)
MAX_VOCAB_SIZE = 1 << 32  # token ids are 32-bit, in the tokenizers library and in the shards
# What transformers writes when a tokenizer has no length limit of its own.
UNLIMITED_LENGTH = int(1e30)
CHAT_ROLES = ("system", "user", "assistant")
CHAT_TEMPLATE_FILE = "chat_template.jinja"

# The Jinja twin of ``Tokenizer.render_chat``. Every piece of template text is a special token, so
# a tokenizer (which splits special tokens out first) encodes each message's content on its own,
# exactly as render_chat does. The {% generation %} span (content + <|end|>) is what transformers
# reports in ``return_assistant_tokens_mask``.
CHAT_TEMPLATE = """\
{#- gptlab chat template: <|bos|>, then <|role|>content<|end|> per message; the reply follows <|assistant|>. -#}
{{- '<|bos|>' -}}
{%- for message in messages -%}
    {%- if message['role'] == 'assistant' -%}
        {{- '<|assistant|>' -}}
        {%- generation -%}
            {{- message['content'] + '<|end|>' -}}
        {%- endgeneration -%}
    {%- elif message['role'] in ['system', 'user'] -%}
        {{- '<|' + message['role'] + '|>' + message['content'] + '<|end|>' -}}
    {%- else -%}
        {{- raise_exception("unknown role '" + message['role'] + "': use system, user or assistant") -}}
    {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- '<|assistant|>' -}}
{%- endif -%}
"""


@dataclass
class RenderedChat:
    """A conversation as token ids, with what training needs to know about them.

    ``assistant_mask[i]`` is 1 where token i is part of an assistant reply (its content and its
    ``<|end|>``, not the ``<|assistant|>`` header): the tokens SFT learns to predict.
    ``message_ends[k]`` is the number of ids up to and including message k, so a prefix of whole
    messages is ``ids[:message_ends[k]]``.
    """

    ids: list[int]
    assistant_mask: list[int]
    message_ends: list[int]


class Tokenizer:
    """A ``tokenizers.Tokenizer`` plus the special tokens and config a checkpoint folder needs."""

    def __init__(self, tokenizer: _HFTokenizer, config: dict[str, Any] | None = None):
        self._tok = tokenizer
        # tokenizer_config.json as loaded; kept so a re-save preserves fields gptlab does not
        # manage (a chat_template, for instance).
        self._config = dict(config or {})
        self.bos_token = _token_name(self._config.get("bos_token"))
        self.eos_token = _token_name(self._config.get("eos_token"))
        self.pad_token = _token_name(self._config.get("pad_token"))
        if not config:  # a bare tokenizer.json: recognise gptlab's own special tokens
            specials = {t.content for t in tokenizer.get_added_tokens_decoder().values() if t.special}
            self.bos_token = BOS if BOS in specials else None
            self.eos_token = EOS if EOS in specials else None
            self.pad_token = PAD if PAD in specials else None

    # ----------------------------------------------------------------------------- training

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int, show_progress: bool = False) -> Tokenizer:
        """Train a byte-level BPE tokenizer on an iterable of texts (to train on files, pass
        ``gptlab.data.iter_documents(paths)``)."""
        if isinstance(texts, (str, os.PathLike)):  # a string is iterable too: one text per character
            raise TypeError("Tokenizer.train takes an iterable of texts; read files with gptlab.data.iter_documents")
        if vocab_size < MIN_VOCAB_SIZE:
            raise UserError(
                f"vocab_size {vocab_size} is too small: byte-level BPE needs 256 byte tokens plus "
                f"{len(SPECIAL_TOKENS)} special tokens; use a vocab_size of at least {MIN_VOCAB_SIZE}"
            )
        if vocab_size > MAX_VOCAB_SIZE:
            raise UserError(
                f"vocab_size {vocab_size} is too large: token ids are 32-bit integers; use at most {MAX_VOCAB_SIZE} "
                "(models use 32k to 256k)"
            )
        texts = iter(texts)
        first = next(texts, None)
        if first is None:
            raise UserError("no texts to train the tokenizer on: the corpus is empty")
        tok = _HFTokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
            ]
        )
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=list(SPECIAL_TOKENS),
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=show_progress,
        )
        tok.train_from_iterator(itertools.chain([first], texts), trainer=trainer)
        tok.post_processor = processors.TemplateProcessing(
            single=f"{BOS} $A",
            pair=f"{BOS} $A {BOS} $B",
            special_tokens=[(BOS, tok.token_to_id(BOS))],
        )
        config = {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD}
        return cls(tok, config)

    # ----------------------------------------------------------------------------- folders

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> Tokenizer:
        """Load a folder holding ``tokenizer.json`` (gptlab's or Hugging Face's) and, if present,
        ``tokenizer_config.json`` / ``special_tokens_map.json`` naming the special tokens."""
        directory = Path(directory)
        if not directory.is_dir():
            raise UserError(f"tokenizer folder {directory} does not exist: train one with `gptlab tokenizer`")
        path = directory / "tokenizer.json"
        if not path.is_file():
            raise UserError(f"{directory} holds no tokenizer.json: point to a gptlab or Hugging Face tokenizer folder")
        try:
            tok = _HFTokenizer.from_file(str(path))
        except Exception as e:  # the library raises a bare Exception for every parse error
            raise UserError(f"cannot read {path} ({first_line(e)}): the file is corrupt or not a tokenizer") from None
        config: dict[str, Any] = {}
        for name in ("special_tokens_map.json", "tokenizer_config.json"):  # the latter wins
            if (directory / name).is_file():
                config.update(_read_json(directory / name))
        if (directory / CHAT_TEMPLATE_FILE).is_file():  # transformers gives the file priority too
            config["chat_template"] = read_text(directory / CHAT_TEMPLATE_FILE)
        return cls(tok, config)

    def save_pretrained(self, directory: str | os.PathLike, model_max_length: int | None = None) -> None:
        """Write ``tokenizer.json``, ``tokenizer_config.json`` and, when there is a chat template,
        ``chat_template.jinja`` (transformers reads the file first, the config key is for older readers).

        A tokenizer with gptlab's chat tokens always gets gptlab's template (the one ``render_chat``
        renders); any other keeps the template it was loaded with. Each file is written to a
        temporary name and renamed, so a reader never sees half a file.
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        specials = {
            name: token
            for name, token in (
                ("bos_token", self.bos_token),
                ("eos_token", self.eos_token),
                ("pad_token", self.pad_token),
            )
            if token is not None
        }
        config = dict(self._config)
        config.update(specials)
        config.update(
            tokenizer_class="PreTrainedTokenizerFast",
            # Documented, not acted upon: the post-processor in tokenizer.json adds BOS.
            add_bos_token=self._adds_bos(),
            add_eos_token=False,
            clean_up_tokenization_spaces=False,
            model_max_length=model_max_length or config.get("model_max_length", UNLIMITED_LENGTH),
        )
        template = self.chat_template
        if template is not None:
            config["chat_template"] = template
        write_text_atomic(directory / "tokenizer.json", self._tok.to_str(pretty=True))
        write_json_atomic(directory / "tokenizer_config.json", config)
        if template is not None:
            write_text_atomic(directory / CHAT_TEMPLATE_FILE, template)

    # ----------------------------------------------------------------------------- chat

    @property
    def chat_template(self) -> str | None:
        """The Jinja chat template a saved folder carries (see ``save_pretrained``)."""
        if self._chat_ids() is not None:
            return CHAT_TEMPLATE
        template = self._config.get("chat_template")
        return template if isinstance(template, str) else None

    def render_chat(self, messages: Sequence[dict], add_generation_prompt: bool = False) -> RenderedChat:
        """Token ids and assistant mask of ``messages`` (dicts with ``role`` and ``content``).

        Built from ids rather than by encoding the rendered string, so the spans are exact by
        construction; it equals what transformers makes of ``CHAT_TEMPLATE``. As there, special
        tokens written inside a message's content are read as special tokens.
        """
        ids_of = self._chat_ids()
        if ids_of is None:
            raise UserError(
                f"this tokenizer has no chat tokens ({', '.join((BOS, SYSTEM, USER, ASSISTANT, END))}): "
                "chat needs a tokenizer trained by gptlab (`gptlab tokenizer`)"
            )
        ids, mask, ends = [ids_of[BOS]], [0], []
        headers = {"system": ids_of[SYSTEM], "user": ids_of[USER], "assistant": ids_of[ASSISTANT]}
        for index, message in enumerate(messages):
            role, content = _check_message(message, index)
            body = self.encode(content, add_special_tokens=False) + [ids_of[END]]
            ids.append(headers[role])
            mask.append(0)
            ids += body
            mask += [int(role == "assistant")] * len(body)
            ends.append(len(ids))
        if add_generation_prompt:
            ids.append(ids_of[ASSISTANT])
            mask.append(0)
        return RenderedChat(ids, mask, ends)

    def apply_chat_template(self, messages: Sequence[dict], add_generation_prompt: bool = False) -> list[int]:
        """The token ids of ``messages``; with ``add_generation_prompt`` the prompt for the next reply
        (transformers' ``apply_chat_template(messages, tokenize=True)`` gives the same ids)."""
        return self.render_chat(messages, add_generation_prompt).ids

    @property
    def end_id(self) -> int | None:
        """The end-of-turn token, where a chat reply stops."""
        return self._tok.token_to_id(END)

    def _chat_ids(self) -> dict[str, int] | None:
        ids = {token: self._tok.token_to_id(token) for token in (BOS, SYSTEM, USER, ASSISTANT, END)}
        return None if None in ids.values() else ids

    # ----------------------------------------------------------------------------- use

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: list[str], add_special_tokens: bool = True) -> list[list[int]]:
        """Encode many texts at once; the library spreads them over all cores."""
        return [e.ids for e in self._tok.encode_batch_fast(texts, add_special_tokens=add_special_tokens)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, id: int) -> str | None:
        return self._tok.id_to_token(id)

    @property
    def vocab_size(self) -> int:
        """Number of ids, special tokens included (the model's embedding rows)."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def bos_id(self) -> int | None:
        return None if self.bos_token is None else self._tok.token_to_id(self.bos_token)

    @property
    def eos_id(self) -> int | None:
        return None if self.eos_token is None else self._tok.token_to_id(self.eos_token)

    @property
    def pad_id(self) -> int | None:
        return None if self.pad_token is None else self._tok.token_to_id(self.pad_token)

    @property
    def fingerprint(self) -> str:
        """sha256 of the canonical tokenizer.json (sorted keys, no whitespace): shards and
        checkpoints record it to detect a tokenizer that differs from the one they were made with."""
        canonical = json.dumps(
            json.loads(self._tok.to_str()), sort_keys=True, separators=(",", ":"), ensure_ascii=False
        )
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()

    def _adds_bos(self) -> bool:
        return self.bos_id is not None and self._tok.encode("", add_special_tokens=True).ids[:1] == [self.bos_id]

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, bos={self.bos_token!r}, eos={self.eos_token!r})"


def _check_message(message: Any, index: int) -> tuple[str, str]:
    """(role, content) of a chat message, or a UserError naming what is wrong with it."""
    if not isinstance(message, dict):
        raise UserError(f"message {index} is not an object with 'role' and 'content'")
    role, content = message.get("role"), message.get("content")
    if role not in CHAT_ROLES:
        raise UserError(f"message {index} has unknown role {role!r}: use system, user or assistant")
    if not isinstance(content, str):
        raise UserError(f"message {index} ({role}) has no text 'content' (got {type(content).__name__})")
    return role, content


def _token_name(value: Any) -> str | None:
    """Special tokens appear in configs as a string or as an AddedToken dict with 'content'."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(read_text(path))
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"cannot read {path} ({first_line(e)}): the file is corrupt") from None
    if not isinstance(data, dict):
        raise UserError(f"{path} does not hold a JSON object: the file is corrupt")
    return data
